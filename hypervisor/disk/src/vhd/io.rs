//! Reads, writes, block allocation, flush and allocation status.

use super::dynamic::UNALLOCATED;
use super::footer::DiskType;
use super::{State, Vhd, io_err};
use crate::{Allocation, AllocationState, BlockDevice, DiskError, SECTOR_SIZE, check_range};

/// Whether bit `sector` of a VHD sector bitmap is set (bits are numbered MSB first).
fn bit(bitmap: &[u8], sector: u64) -> bool {
    bitmap[(sector / 8) as usize] & (0x80 >> (sector % 8)) != 0
}

fn set_bit(bitmap: &mut [u8], sector: u64) {
    bitmap[(sector / 8) as usize] |= 0x80 >> (sector % 8);
}

/// Length of the run of sectors starting at `first` (within `count`) whose bit equals that
/// of `first`.
fn run_len(bitmap: &[u8], first: u64, count: u64) -> u64 {
    let v = bit(bitmap, first);
    (first..first + count)
        .take_while(|&s| bit(bitmap, s) == v)
        .count() as u64
}

impl Vhd {
    /// The BAT entry for the block holding byte `pos` (UNALLOCATED past the table).
    fn entry(&self, st: &State, block: u64) -> u32 {
        st.bat.get(block as usize).copied().unwrap_or(UNALLOCATED)
    }

    fn read_bitmap(&self, base: u64) -> Result<Vec<u8>, DiskError> {
        let d = self.dynamic.as_ref().map_or(0, |d| d.bitmap_size);
        let mut bm = vec![0u8; d as usize];
        self.storage
            .read_at(&mut bm, base)
            .map_err(io_err("read VHD sector bitmap", base))?;
        Ok(bm)
    }

    /// Read from the parent, or zeros when there is none (or past its end).
    fn read_parent(&self, buf: &mut [u8], pos: u64) -> Result<(), DiskError> {
        match &self.parent {
            Some(p) if pos + buf.len() as u64 <= p.size() => p.read_at(buf, pos),
            _ => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    fn read_file(&self, buf: &mut [u8], at: u64) -> Result<(), DiskError> {
        self.storage.read_at(buf, at).map_err(io_err("read", at))
    }

    /// Read `buf` at virtual `pos`, where the range lies inside one block.
    fn read_in_block(&self, buf: &mut [u8], pos: u64) -> Result<(), DiskError> {
        let Some(d) = &self.dynamic else {
            return self.read_file(buf, pos);
        };
        let block = pos / d.block_size;
        let in_block = pos % d.block_size;
        let entry = self.entry(&self.read_state(), block);
        if entry == UNALLOCATED {
            return if self.disk_type == DiskType::Differencing {
                self.read_parent(buf, pos)
            } else {
                buf.fill(0);
                Ok(())
            };
        }
        let base = u64::from(entry) * 512;
        let data = base + d.bitmap_size;
        if self.disk_type != DiskType::Differencing {
            return self.read_file(buf, data + in_block);
        }
        let bm = self.read_bitmap(base)?;
        let first = in_block / 512;
        let count = buf.len() as u64 / 512;
        let mut s = 0;
        while s < count {
            let n = run_len(&bm, first + s, count - s);
            let chunk = &mut buf[(s * 512) as usize..((s + n) * 512) as usize];
            if bit(&bm, first + s) {
                self.read_file(chunk, data + (first + s) * 512)?;
            } else {
                self.read_parent(chunk, pos + s * 512)?;
            }
            s += n;
        }
        Ok(())
    }

    /// Write `buf` at virtual `pos`, inside one block of a dynamic/differencing image.
    fn write_in_block(&self, buf: &[u8], pos: u64) -> Result<(), DiskError> {
        let Some(d) = &self.dynamic else {
            return self
                .storage
                .write_at(buf, pos)
                .map_err(io_err("write", pos));
        };
        let block = pos / d.block_size;
        let in_block = pos % d.block_size;
        let diff = self.disk_type == DiskType::Differencing;
        if !diff {
            let entry = self.entry(&self.read_state(), block);
            if entry != UNALLOCATED {
                let at = u64::from(entry) * 512 + d.bitmap_size + in_block;
                return self.storage.write_at(buf, at).map_err(io_err("write", at));
            }
        }
        // Allocation, or a differencing write (bitmap read-modify-write): serialise.
        let mut st = self.write_state();
        let entry = self.entry(&st, block);
        let first = in_block / 512;
        let count = buf.len() as u64 / 512;
        if entry == UNALLOCATED {
            return self.allocate(&mut st, block, buf, in_block);
        }
        let base = u64::from(entry) * 512;
        let at = base + d.bitmap_size + in_block;
        self.storage
            .write_at(buf, at)
            .map_err(io_err("write", at))?;
        if diff {
            let mut bm = self.read_bitmap(base)?;
            if (first..first + count).any(|s| !bit(&bm, s)) {
                (first..first + count).for_each(|s| set_bit(&mut bm, s));
                let lo = (first / 8) as usize;
                let hi = (first + count).div_ceil(8) as usize;
                let at = base + lo as u64;
                self.storage
                    .write_at(&bm[lo..hi], at)
                    .map_err(io_err("write VHD sector bitmap", at))?;
            }
        }
        Ok(())
    }

    /// Append a block for `block` at the end of the file holding `buf` at `in_block`, move
    /// the footer behind it, and record the BAT entry (written to disk at the next flush).
    fn allocate(
        &self,
        st: &mut State,
        block: u64,
        buf: &[u8],
        in_block: u64,
    ) -> Result<(), DiskError> {
        let Some(d) = &self.dynamic else {
            return Ok(());
        };
        let base = st.next_free;
        let sector = u32::try_from(base / 512)
            .ok()
            .filter(|&s| s != UNALLOCATED)
            .ok_or_else(|| DiskError::Unsupported {
                what: format!(
                    "growing a VHD past {base:#x} bytes (BAT entries are 32-bit sector numbers)"
                ),
            })?;
        let mut bm = vec![0u8; d.bitmap_size as usize];
        if self.disk_type == DiskType::Differencing {
            let first = in_block / 512;
            (first..first + buf.len() as u64 / 512).for_each(|s| set_bit(&mut bm, s));
        } else {
            bm.fill(0xff);
        }
        self.storage
            .write_at(&bm, base)
            .map_err(io_err("write VHD sector bitmap", base))?;
        let at = base + d.bitmap_size + in_block;
        self.storage
            .write_at(buf, at)
            .map_err(io_err("write", at))?;
        let end = base + d.bitmap_size + d.block_size;
        self.storage
            .write_at(&st.footer.raw, end)
            .map_err(io_err("write VHD footer", end))?;
        st.bat[block as usize] = sector;
        st.next_free = end;
        st.end_footer_len = super::FOOTER_SIZE;
        st.dirty.insert(block * 4 / 512);
        Ok(())
    }

    /// Call `f(file offset, length)` for the data of `len` bytes at `offset` held in this
    /// file (allocated blocks, whatever their bitmaps say); nothing when out of range.
    fn for_each_present(&self, offset: u64, len: u64, f: impl Fn(u64, u64)) {
        if check_range(offset, len, self.size()).is_err() {
            return;
        }
        let Some(d) = &self.dynamic else {
            return f(offset, len);
        };
        let st = self.read_state();
        let mut pos = offset;
        while pos < offset + len {
            let in_block = pos % d.block_size;
            let n = (d.block_size - in_block).min(offset + len - pos);
            let entry = self.entry(&st, pos / d.block_size);
            if entry != UNALLOCATED {
                f(u64::from(entry) * 512 + d.bitmap_size + in_block, n);
            }
            pos += n;
        }
    }

    /// Write the dirty BAT sectors: sync first so that they never point at data that is not
    /// durable yet.
    pub(super) fn write_bat(&self, st: &mut State) -> Result<(), DiskError> {
        if self.dynamic.is_none() || st.dirty.is_empty() {
            return Ok(());
        }
        self.storage.sync().map_err(io_err("flush", 0))?;
        let dirty = std::mem::take(&mut st.dirty);
        for sector in dirty {
            let lo = (sector * 128) as usize;
            let hi = (lo + 128).min(st.bat.len());
            let bytes: Vec<u8> = st.bat[lo..hi]
                .iter()
                .flat_map(|e| e.to_be_bytes())
                .collect();
            let at = st.table_offset + sector * 512;
            if let Err(e) = self.storage.write_at(&bytes, at) {
                st.dirty.insert(sector);
                return Err(io_err("write VHD BAT", at)(e));
            }
        }
        Ok(())
    }
}

impl Drop for Vhd {
    /// Best effort: persist BAT entries of blocks allocated since the last flush.
    fn drop(&mut self) {
        if !self.read_only {
            let mut st = self.write_state();
            if !st.dirty.is_empty() && self.write_bat(&mut st).is_ok() {
                let _ = self.storage.sync();
            }
        }
    }
}

impl BlockDevice for Vhd {
    fn size(&self) -> u64 {
        self.read_state().size
    }

    fn logical_sector_size(&self) -> u32 {
        SECTOR_SIZE
    }

    fn physical_sector_size(&self) -> u32 {
        SECTOR_SIZE
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    /// One host read per block for dynamic images (per run of equal bitmap bits for
    /// differencing ones); a fixed image is read in one go.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DiskError> {
        check_range(offset, buf.len() as u64, self.size())?;
        let Some(d) = &self.dynamic else {
            return self.read_file(buf, offset);
        };
        crate::check_sector_aligned(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = ((d.block_size - pos % d.block_size) as usize).min(buf.len() - done);
            self.read_in_block(&mut buf[done..done + n], pos)?;
            done += n;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, buf.len() as u64, self.size())?;
        let Some(d) = &self.dynamic else {
            return self
                .storage
                .write_at(buf, offset)
                .map_err(io_err("write", offset));
        };
        crate::check_sector_aligned(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = ((d.block_size - pos % d.block_size) as usize).min(buf.len() - done);
            self.write_in_block(&buf[done..done + n], pos)?;
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), DiskError> {
        if self.read_only {
            return Ok(());
        }
        let mut st = self.write_state();
        self.write_bat(&mut st)?;
        self.storage.sync().map_err(io_err("flush", 0))
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        if !self.read_only {
            self.for_each_present(offset, len, |at, n| self.storage.start_writeback(at, n));
        }
    }

    fn prefetch(&self, offset: u64, len: u64) {
        self.for_each_present(offset, len, |at, n| self.storage.prefetch(at, n));
    }

    /// A successful no-op: VHD has no way to deallocate a block short of rewriting the
    /// image, and zeroing sectors would not free space either.
    fn discard(&self, offset: u64, len: u64) -> Result<(), DiskError> {
        if self.read_only {
            return Err(DiskError::ReadOnly);
        }
        check_range(offset, len, self.size())
    }

    /// Fixed: all data. Dynamic: per block. Differencing: per sector (bitmap bits); clear
    /// bits and unallocated blocks are `Unallocated` (they read from the parent).
    fn allocation(&self, offset: u64, len: u64) -> Result<Allocation, DiskError> {
        check_range(offset, len, self.size())?;
        let Some(d) = &self.dynamic else {
            return Ok(Allocation {
                state: AllocationState::Data,
                len,
            });
        };
        let st = self.read_state();
        let mut state = None;
        let mut done = 0u64;
        while done < len {
            let pos = offset + done;
            let in_block = pos % d.block_size;
            let n = (d.block_size - in_block).min(len - done);
            let entry = self.entry(&st, pos / d.block_size);
            let (s, run) = if entry == UNALLOCATED {
                (AllocationState::Unallocated, n)
            } else if self.disk_type != DiskType::Differencing {
                (AllocationState::Data, n)
            } else {
                let bm = self.read_bitmap(u64::from(entry) * 512)?;
                let first = in_block / 512;
                let count = n.div_ceil(512);
                let s = if bit(&bm, first) {
                    AllocationState::Data
                } else {
                    AllocationState::Unallocated
                };
                (s, (run_len(&bm, first, count) * 512 - pos % 512).min(n))
            };
            match state {
                None => state = Some(s),
                Some(prev) if prev != s => break,
                _ => {}
            }
            done += run;
            if run < n {
                break;
            }
        }
        Ok(Allocation {
            state: state.unwrap_or(AllocationState::Unallocated),
            len: done,
        })
    }
}
