//! Reads, writes, flushes and allocation status: the [`BlockDevice`] implementation.

use std::sync::atomic::Ordering;

use super::bat::{self, FULLY_PRESENT, PARTIALLY_PRESENT, SB_PRESENT, ZERO};
use super::format::{Guid, LOG_SECTOR, MIB, corrupt, io_err};
use super::{State, Vhdx, header, log};
use crate::{
    Allocation, AllocationState, BlockDevice, DiskError, check_range, check_sector_aligned,
};

const SECTOR: u64 = LOG_SECTOR as u64;
/// Blocks one [`BlockDevice::allocation`] call examines at most.
const MAX_SCAN_BLOCKS: u64 = 65536;

impl Vhdx {
    /// Read `buf` at `offset` with the state locked.
    pub(super) fn read_locked(
        &self,
        st: &State,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<(), DiskError> {
        let bs = st.geo.block_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = pos / bs;
            let inb = pos % bs;
            let n = ((bs - inb) as usize).min(buf.len() - done);
            let chunk = &mut buf[done..done + n];
            let e = st
                .bat
                .get(st.geo.payload_index(block))
                .copied()
                .unwrap_or(0);
            match bat::state(e) {
                FULLY_PRESENT => {
                    let at = bat::offset(e) + inb;
                    self.storage
                        .read_at(chunk, at)
                        .map_err(io_err("read", at))?;
                }
                PARTIALLY_PRESENT => self.read_partial(st, block, e, inb, chunk)?,
                ZERO => chunk.fill(0),
                _ => self.read_parent(chunk, pos)?,
            }
            done += n;
        }
        Ok(())
    }

    /// Read from the parent (zeros where there is none, or past its end).
    fn read_parent(&self, buf: &mut [u8], pos: u64) -> Result<(), DiskError> {
        let Some(p) = &self.parent else {
            buf.fill(0);
            return Ok(());
        };
        let psize = p.size.load(Ordering::Relaxed);
        let k = psize.saturating_sub(pos).min(buf.len() as u64) as usize;
        if k > 0 {
            p.read_at(&mut buf[..k], pos)?;
        }
        buf[k..].fill(0);
        Ok(())
    }

    /// Read `chunk` (at `inb` within block `block`, entry `e`) of a PARTIALLY_PRESENT block.
    fn read_partial(
        &self,
        st: &State,
        block: u64,
        e: u64,
        inb: u64,
        chunk: &mut [u8],
    ) -> Result<(), DiskError> {
        let geo = &st.geo;
        let ls = geo.logical;
        let n = chunk.len() as u64;
        let (bm_off, bit0) = self.bitmap_location(st, block)?;
        let s0 = inb / ls;
        let s1 = (inb + n - 1) / ls;
        let bits = self.read_bits(st, bm_off, bit0 + s0, s1 - s0 + 1)?;
        let bstart = block * geo.block_size;
        let mut k = 0;
        while k < bits.len() {
            let v = bits[k];
            let mut j = k;
            while j < bits.len() && bits[j] == v {
                j += 1;
            }
            let start = inb.max((s0 + k as u64) * ls);
            let end = (inb + n).min((s0 + j as u64) * ls);
            let sub = &mut chunk[(start - inb) as usize..(end - inb) as usize];
            if v {
                let at = bat::offset(e) + start;
                self.storage.read_at(sub, at).map_err(io_err("read", at))?;
            } else {
                self.read_parent(sub, bstart + start)?;
            }
            k = j;
        }
        Ok(())
    }

    /// File offset of the bitmap block covering `block`, and the bit of its first sector.
    pub(super) fn bitmap_location(&self, st: &State, block: u64) -> Result<(u64, u64), DiskError> {
        let geo = &st.geo;
        let chunk = block / geo.chunk_ratio;
        let idx = geo.bitmap_index(chunk);
        let e = st.bat.get(idx).copied().unwrap_or(0);
        if bat::state(e) != SB_PRESENT {
            return Err(corrupt(
                format!("VHDX BAT entry {idx}"),
                st.bat_offset + idx as u64 * 8,
                "sector bitmap missing for a partially present block",
            ));
        }
        Ok((
            bat::offset(e),
            (block % geo.chunk_ratio) * geo.sectors_per_block(),
        ))
    }

    /// Read file bytes with pending (unflushed) sector bitmap and metadata sectors on top.
    pub(super) fn read_meta(&self, st: &State, buf: &mut [u8], at: u64) -> Result<(), DiskError> {
        self.storage.read_at(buf, at).map_err(io_err("read", at))?;
        let end = at + buf.len() as u64;
        for map in [&st.pending_bitmap, &st.pending_meta] {
            for (&off, data) in map.range(at & !(SECTOR - 1)..end) {
                let s = off.max(at);
                let e = (off + SECTOR).min(end);
                if s < e {
                    buf[(s - at) as usize..(e - at) as usize]
                        .copy_from_slice(&data[(s - off) as usize..(e - off) as usize]);
                }
            }
        }
        Ok(())
    }

    /// `count` bits from bit `first` of the bitmap block at `bm_off`.
    pub(super) fn read_bits(
        &self,
        st: &State,
        bm_off: u64,
        first: u64,
        count: u64,
    ) -> Result<Vec<bool>, DiskError> {
        let b0 = first / 8;
        let b1 = (first + count - 1) / 8;
        let mut bytes = vec![0u8; (b1 - b0 + 1) as usize];
        self.read_meta(st, &mut bytes, bm_off + b0)?;
        Ok((first..first + count)
            .map(|bit| bytes[(bit / 8 - b0) as usize] >> (bit % 8) & 1 != 0)
            .collect())
    }

    /// Set `count` bits from bit `first` of the bitmap block at `bm_off` (as pending sectors).
    fn set_bits(
        &self,
        st: &mut State,
        bm_off: u64,
        first: u64,
        count: u64,
    ) -> Result<(), DiskError> {
        let mut bit = first;
        while bit < first + count {
            let sector_at = bm_off + (bit / 8) / SECTOR * SECTOR;
            if !st.pending_bitmap.contains_key(&sector_at) {
                let mut s = vec![0u8; LOG_SECTOR];
                self.read_meta(st, &mut s, sector_at)?;
                st.pending_bitmap.insert(sector_at, s);
            }
            let s = st.pending_bitmap.get_mut(&sector_at).expect("inserted");
            let sector_first_bit = (sector_at - bm_off) * 8;
            let last = (first + count).min(sector_first_bit + SECTOR * 8);
            while bit < last {
                let byte = (bit - sector_first_bit) / 8;
                s[byte as usize] |= 1 << (bit % 8);
                bit += 1;
            }
        }
        Ok(())
    }

    /// Append `len` bytes (a multiple of 1 MiB) at the end of the file; returns the offset.
    fn allocate(&self, st: &mut State, len: u64) -> Result<u64, DiskError> {
        let off = st.next_free;
        let end = off
            .checked_add(len)
            .ok_or_else(|| corrupt("VHDX file", off, "size overflows"))?;
        self.storage.set_len(end).map_err(io_err("extend", off))?;
        st.next_free = end;
        Ok(off)
    }

    fn set_entry(st: &mut State, idx: usize, e: u64) {
        st.bat[idx] = e;
        st.dirty_bat.insert(idx as u64 * 8 / SECTOR);
    }

    /// The first write of a session writes a header with new write GUIDs (and no log).
    pub(super) fn begin_session(&self, st: &mut State) -> Result<(), DiskError> {
        if st.session_started {
            return Ok(());
        }
        let mut h = st.headers.current.clone();
        h.file_write_guid = Guid::random();
        h.data_write_guid = Guid::random();
        h.log_guid = Guid::ZERO;
        header::update(self.storage.as_ref(), &mut st.headers, h)?;
        st.session_started = true;
        Ok(())
    }

    /// Write `buf` at `offset` (aligned to the logical sector) with the state locked.
    fn write_locked(&self, st: &mut State, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        let bs = st.geo.block_size;
        let has_parent = st.meta.has_parent;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = pos / bs;
            let inb = pos % bs;
            let n = ((bs - inb) as usize).min(buf.len() - done);
            let data = &buf[done..done + n];
            let idx = st.geo.payload_index(block);
            let e = st.bat[idx];
            let state = bat::state(e);
            let off = match state {
                FULLY_PRESENT | PARTIALLY_PRESENT => bat::offset(e),
                _ => self.allocate(st, bs)?,
            };
            let at = off + inb;
            self.storage
                .write_at(data, at)
                .map_err(io_err("write", at))?;
            let whole = inb == 0 && n as u64 == bs;
            let from_parent = has_parent && state != ZERO && state != FULLY_PRESENT;
            if from_parent && !whole {
                if state != PARTIALLY_PRESENT {
                    let chunk = block / st.geo.chunk_ratio;
                    let bidx = st.geo.bitmap_index(chunk);
                    if bat::state(st.bat[bidx]) != SB_PRESENT {
                        let bm = self.allocate(st, MIB)?;
                        Self::set_entry(st, bidx, bat::entry(SB_PRESENT, bm));
                    }
                    Self::set_entry(st, idx, bat::entry(PARTIALLY_PRESENT, off));
                }
                let (bm_off, bit0) = self.bitmap_location(st, block)?;
                let ls = st.geo.logical;
                self.set_bits(st, bm_off, bit0 + inb / ls, n as u64 / ls)?;
            } else if state != FULLY_PRESENT {
                Self::set_entry(st, idx, bat::entry(FULLY_PRESENT, off));
            }
            done += n;
        }
        Ok(())
    }

    /// Make data durable, then commit changed BAT pages, bitmap and metadata sectors.
    pub(super) fn flush_locked(&self, st: &mut State) -> Result<(), DiskError> {
        let s = self.storage.as_ref();
        s.sync().map_err(io_err("flush", 0))?;
        if st.dirty_bat.is_empty() && st.pending_bitmap.is_empty() && st.pending_meta.is_empty() {
            return Ok(());
        }
        let mut sectors: Vec<(u64, Vec<u8>)> =
            std::mem::take(&mut st.pending_bitmap).into_iter().collect();
        for page in std::mem::take(&mut st.dirty_bat) {
            let at = st.bat_offset + page * SECTOR;
            let mut b = vec![0u8; LOG_SECTOR];
            // The page may reach past the entries (and, in odd images, past the file).
            let _ = s.read_at(&mut b, at);
            let first = (page * SECTOR / 8) as usize;
            for (k, e) in st.bat.iter().skip(first).take(LOG_SECTOR / 8).enumerate() {
                b[k * 8..k * 8 + 8].copy_from_slice(&e.to_le_bytes());
            }
            sectors.push((at, b));
        }
        sectors.extend(std::mem::take(&mut st.pending_meta));
        self.commit(st, &sectors)
    }

    /// Write `sectors` (4 KiB each) in place, atomically per log entry.
    pub(super) fn commit(
        &self,
        st: &mut State,
        sectors: &[(u64, Vec<u8>)],
    ) -> Result<(), DiskError> {
        let s = self.storage.as_ref();
        let log_off = st.headers.current.log_offset;
        let max = log::max_data_sectors(u64::from(st.headers.current.log_length)) as usize;
        let write_all = |group: &[(u64, Vec<u8>)]| -> Result<(), DiskError> {
            for (at, data) in group {
                s.write_at(data, *at)
                    .map_err(io_err("write VHDX metadata", *at))?;
            }
            s.sync().map_err(io_err("flush", 0))
        };
        if max == 0 {
            return write_all(sectors);
        }
        let file_len = s.len().map_err(io_err("stat", 0))?;
        for group in sectors.chunks(max) {
            st.log_seq = st.log_seq.wrapping_add(1).max(1);
            let guid = Guid::random();
            let refs: Vec<(u64, &[u8])> = group.iter().map(|(a, d)| (*a, d.as_slice())).collect();
            let entry = log::build_entry(st.log_seq, guid, 0, file_len, &refs);
            s.write_at(&entry, log_off)
                .map_err(io_err("write VHDX log", log_off))?;
            s.sync().map_err(io_err("flush VHDX log", log_off))?;
            let mut h = st.headers.current.clone();
            h.log_guid = guid;
            header::update(s, &mut st.headers, h.clone())?;
            write_all(group)?;
            h.log_guid = Guid::ZERO;
            header::update(s, &mut st.headers, h)?;
        }
        Ok(())
    }

    /// The common case of a write, under the shared lock so that writers proceed in
    /// parallel: every block it touches is FULLY_PRESENT, so no metadata changes, and the
    /// session has started. Returns false (nothing written) when that is not the case.
    pub(super) fn write_present(&self, buf: &[u8], offset: u64) -> Result<bool, DiskError> {
        let st = self.read_state();
        check_range(offset, buf.len() as u64, self.size())?;
        let ls = st.geo.logical;
        let whole_sectors = offset.is_multiple_of(ls) && (buf.len() as u64).is_multiple_of(ls);
        if !st.session_started || buf.is_empty() || (st.meta.has_parent && !whole_sectors) {
            return Ok(false);
        }
        let bs = st.geo.block_size;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            if Self::state_of(&st, pos / bs) != FULLY_PRESENT {
                return Ok(false);
            }
            pos = (pos / bs + 1) * bs;
        }
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let inb = pos % bs;
            let n = ((bs - inb) as usize).min(buf.len() - done);
            let e = st.bat[st.geo.payload_index(pos / bs)];
            let at = bat::offset(e) + inb;
            self.storage
                .write_at(&buf[done..done + n], at)
                .map_err(io_err("write", at))?;
            done += n;
        }
        Ok(true)
    }

    /// Call `f(file offset, length)` for the parts of `len` bytes at `offset` held in this
    /// file (FULLY_PRESENT and PARTIALLY_PRESENT blocks); nothing when out of range.
    fn for_each_present(&self, offset: u64, len: u64, f: impl Fn(u64, u64)) {
        if check_range(offset, len, self.size()).is_err() {
            return;
        }
        let st = self.read_state();
        let bs = st.geo.block_size;
        let mut pos = offset;
        while pos < offset + len {
            let inb = pos % bs;
            let n = (bs - inb).min(offset + len - pos);
            let e = st.bat.get(st.geo.payload_index(pos / bs)).copied();
            if let Some(e) =
                e.filter(|&e| matches!(bat::state(e), FULLY_PRESENT | PARTIALLY_PRESENT))
            {
                f(bat::offset(e) + inb, n);
            }
            pos += n;
        }
    }

    fn state_of(st: &State, block: u64) -> u64 {
        bat::state(
            st.bat
                .get(st.geo.payload_index(block))
                .copied()
                .unwrap_or(0),
        )
    }
}

impl BlockDevice for Vhdx {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    fn logical_sector_size(&self) -> u32 {
        self.logical
    }

    fn physical_sector_size(&self) -> u32 {
        self.physical
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_sector_aligned(offset, buf.len() as u64)?;
        let st = self.read_state();
        check_range(offset, buf.len() as u64, self.size())?;
        self.read_locked(&st, buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_sector_aligned(offset, buf.len() as u64)?;
        if self.write_present(buf, offset)? {
            return Ok(());
        }
        let mut st = self.write_state();
        check_range(offset, buf.len() as u64, self.size())?;
        if buf.is_empty() {
            return Ok(());
        }
        self.begin_session(&mut st)?;
        let ls = st.geo.logical;
        let len = buf.len() as u64;
        if st.meta.has_parent && (!offset.is_multiple_of(ls) || !len.is_multiple_of(ls)) {
            // Sector bitmaps have one bit per logical sector: merge partial sectors first.
            let start = offset / ls * ls;
            let end = (offset + len).div_ceil(ls) * ls;
            let mut tmp = vec![0u8; (end - start) as usize];
            self.read_locked(&st, &mut tmp, start)?;
            tmp[(offset - start) as usize..(offset - start + len) as usize].copy_from_slice(buf);
            return self.write_locked(&mut st, &tmp, start);
        }
        self.write_locked(&mut st, buf, offset)
    }

    fn flush(&self) -> Result<(), DiskError> {
        if self.read_only {
            return Ok(());
        }
        let mut st = self.write_state();
        self.flush_locked(&mut st)
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        if !self.read_only {
            self.for_each_present(offset, len, |at, n| self.storage.start_writeback(at, n));
        }
    }

    fn prefetch(&self, offset: u64, len: u64) {
        self.for_each_present(offset, len, |at, n| self.storage.prefetch(at, n));
    }

    /// Accepted and ignored: VHDX blocks are not freed (the range keeps its contents).
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, len, self.size())
    }

    fn allocation(&self, offset: u64, len: u64) -> Result<Allocation, DiskError> {
        let size = self.size();
        check_range(offset, len, size)?;
        if len == 0 {
            return Ok(Allocation {
                state: AllocationState::Unallocated,
                len: 0,
            });
        }
        let st = self.read_state();
        let bs = st.geo.block_size;
        let classify = |s: u64| match s {
            FULLY_PRESENT => AllocationState::Data,
            ZERO => AllocationState::Zero,
            _ => AllocationState::Unallocated,
        };
        let first_state = Self::state_of(&st, offset / bs);
        if first_state == PARTIALLY_PRESENT {
            let block = offset / bs;
            let inb = offset % bs;
            let n = (bs - inb).min(len);
            let ls = st.geo.logical;
            let (bm_off, bit0) = self.bitmap_location(&st, block)?;
            let s0 = inb / ls;
            let count = (inb + n).div_ceil(ls) - s0;
            let bits = self.read_bits(&st, bm_off, bit0 + s0, count)?;
            let same = bits.iter().take_while(|&&b| b == bits[0]).count() as u64;
            let run = ((s0 + same) * ls).min(inb + n) - inb;
            let state = if bits[0] {
                AllocationState::Data
            } else {
                AllocationState::Unallocated
            };
            return Ok(Allocation {
                state,
                len: run.max(1).min(len),
            });
        }
        let state = classify(first_state);
        let mut end = ((offset / bs) + 1) * bs;
        // One call looks at a bounded number of blocks; callers ask again for the rest.
        let limit = end.saturating_add(MAX_SCAN_BLOCKS * bs);
        while end < offset + len && end < limit {
            let s = Self::state_of(&st, end / bs);
            if s == PARTIALLY_PRESENT || classify(s) != state {
                break;
            }
            end += bs;
        }
        Ok(Allocation {
            state,
            len: end.min(offset + len) - offset,
        })
    }
}
