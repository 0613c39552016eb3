//! Medium access: READ, WRITE, SYNCHRONIZE CACHE, UNMAP, WRITE SAME(16), START STOP UNIT.

use std::sync::atomic::Ordering;

use crate::cdb::{self, Cdb, be16_at, be32_at, be64_at};
use crate::sense::{Sense, Xfer};
use crate::{BackendOp, MAX_TRANSFER_BYTES, MAX_UNMAP_DESCRIPTORS, MAX_WRITE_SAME_BYTES, ScsiDisk};

/// A parsed READ/WRITE CDB.
struct Rw {
    lba: u64,
    blocks: u32,
    fua: bool,
    /// CDB byte of the transfer length field (for the field pointer).
    len_field: u16,
}

/// Parse READ/WRITE(6)/(10)/(12)/(16). Protection information is not supported, so
/// RDPROTECT/WRPROTECT must be 0; the obsolete RELADR bit must be 0.
fn parse_rw(cdb: &Cdb) -> Result<Rw, Sense> {
    let op = cdb.op();
    if matches!(op, cdb::READ_6 | cdb::WRITE_6) {
        // 21-bit LBA; a transfer length of 0 means 256 blocks.
        let lba = u64::from(cdb.be32(0) & 0x001F_FFFF);
        let blocks = match cdb.u8(4) {
            0 => 256,
            n => u32::from(n),
        };
        return Ok(Rw {
            lba,
            blocks,
            fua: false,
            len_field: 4,
        });
    }
    let flags = cdb.u8(1);
    if flags & 0xE0 != 0 {
        return Err(Sense::invalid_cdb_field(1, Some(7)));
    }
    let fua = flags & 0x08 != 0;
    Ok(match op {
        cdb::READ_10 | cdb::WRITE_10 | cdb::READ_12 | cdb::WRITE_12 if flags & 0x01 != 0 => {
            return Err(Sense::invalid_cdb_field(1, Some(0)));
        }
        cdb::READ_10 | cdb::WRITE_10 => Rw {
            lba: u64::from(cdb.be32(2)),
            blocks: u32::from(cdb.be16(7)),
            fua,
            len_field: 7,
        },
        cdb::READ_12 | cdb::WRITE_12 => Rw {
            lba: u64::from(cdb.be32(2)),
            blocks: cdb.be32(6),
            fua,
            len_field: 6,
        },
        _ => Rw {
            lba: cdb.be64(2),
            blocks: cdb.be32(10),
            fua,
            len_field: 10,
        },
    })
}

impl ScsiDisk {
    /// Check that `blocks` blocks at `lba` lie on the disk; returns the byte offset and
    /// length. `lba + blocks` may equal the capacity; with 0 blocks the LBA may not pass it.
    fn disk_range(&self, lba: u64, blocks: u64) -> Result<(u64, u64), Sense> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.capacity_blocks() => {
                Ok((lba << self.block_shift, blocks << self.block_shift))
            }
            _ => Err(Sense::lba_out_of_range()),
        }
    }

    /// Range, maximum transfer length and buffer checks shared by READ and WRITE; returns
    /// the byte offset and length (at most [`MAX_TRANSFER_BYTES`]).
    fn rw_range(&self, rw: &Rw, buffer: usize) -> Result<(u64, usize), Sense> {
        let (offset, len) = self.disk_range(rw.lba, u64::from(rw.blocks))?;
        if len > MAX_TRANSFER_BYTES as u64 {
            return Err(Sense::invalid_cdb_field(rw.len_field, None));
        }
        let len = len as usize;
        if len > buffer {
            // The guest's buffer cannot hold the transfer its CDB asks for.
            return Err(Sense::lba_out_of_range());
        }
        Ok((offset, len))
    }

    pub(crate) fn read(&self, cdb: &Cdb, data_in: &mut [u8]) -> Result<Xfer, Sense> {
        let rw = parse_rw(cdb)?;
        let (offset, len) = self.rw_range(&rw, data_in.len())?;
        if len > 0 {
            self.disk
                .read_at(&mut data_in[..len], offset)
                .map_err(|e| self.backend_error(BackendOp::Read, &e))?;
        }
        self.counters.read(len as u64);
        Ok(Xfer::data_in(len))
    }

    pub(crate) fn write(&self, cdb: &Cdb, data_out: &[u8]) -> Result<Xfer, Sense> {
        let rw = parse_rw(cdb)?;
        let (offset, len) = self.rw_range(&rw, data_out.len())?;
        if self.disk.read_only() {
            return Err(Sense::write_protected());
        }
        if len > 0 {
            self.disk
                .write_at(&data_out[..len], offset)
                .map_err(|e| self.backend_error(BackendOp::Write, &e))?;
            // FUA, or write-through after MODE SELECT cleared WCE: durable before GOOD.
            if rw.fua || !self.write_cache.load(Ordering::Relaxed) {
                self.flush()?;
            }
        }
        self.counters.write(len as u64);
        Ok(Xfer::data_out(len))
    }

    fn flush(&self) -> Result<(), Sense> {
        self.disk
            .flush()
            .map_err(|e| self.backend_error(BackendOp::Flush, &e))
    }

    /// SYNCHRONIZE CACHE(10)/(16): the range is checked (0 blocks means "to the end"), then
    /// the whole backend is flushed. IMMED is accepted; the flush completes before GOOD
    /// either way.
    pub(crate) fn synchronize_cache(&self, cdb: &Cdb) -> Result<Xfer, Sense> {
        let (lba, blocks) = if cdb.op() == cdb::SYNCHRONIZE_CACHE_10 {
            (u64::from(cdb.be32(2)), u64::from(cdb.be16(7)))
        } else {
            (cdb.be64(2), u64::from(cdb.be32(10)))
        };
        if blocks == 0 {
            if lba >= self.capacity_blocks() {
                return Err(Sense::lba_out_of_range());
            }
        } else {
            self.disk_range(lba, blocks)?;
        }
        self.flush()?;
        Ok(Xfer::NONE)
    }

    /// START STOP UNIT: the unit is always ready, so START and the power conditions are
    /// accepted as no-ops; stopping (or standby) flushes unless NO_FLUSH. Ejecting (LOEJ) a
    /// fixed disk is refused.
    pub(crate) fn start_stop_unit(&self, cdb: &Cdb) -> Result<Xfer, Sense> {
        let b4 = cdb.u8(4);
        let condition = b4 >> 4;
        let no_flush = b4 & 0x04 != 0;
        let start = b4 & 0x01 != 0;
        // 0 START_VALID, 1 ACTIVE, 2 IDLE, 3 STANDBY, 7 LU_CONTROL, Ah FORCE_IDLE_0,
        // Bh FORCE_STANDBY_0.
        if !matches!(condition, 0x0 | 0x1 | 0x2 | 0x3 | 0x7 | 0xA | 0xB) {
            return Err(Sense::invalid_cdb_field(4, Some(7)));
        }
        if condition == 0 && b4 & 0x02 != 0 {
            return Err(Sense::invalid_cdb_field(4, Some(1)));
        }
        let stopping = (condition == 0 && !start) || matches!(condition, 0x3 | 0xB);
        if stopping && !no_flush && !self.disk.read_only() {
            self.flush()?;
        }
        Ok(Xfer::NONE)
    }

    /// UNMAP: every descriptor is checked before any range is discarded. SBC rules: a
    /// parameter list of 1-7 bytes is a length error; the block descriptor data length is
    /// bounded by the list and a trailing partial descriptor is ignored; too many
    /// descriptors or blocks is an invalid field in the list; a range past the end of the
    /// disk is LBA OUT OF RANGE; 0-block descriptors are no-ops.
    pub(crate) fn unmap(&self, cdb: &Cdb, data_out: &[u8]) -> Result<Xfer, Sense> {
        if cdb.u8(1) & 0x01 != 0 {
            // ANCHOR: anchored unmapping is not supported (ANC_SUP 0).
            return Err(Sense::invalid_cdb_field(1, Some(0)));
        }
        if self.disk.read_only() {
            return Err(Sense::write_protected());
        }
        let len = usize::from(cdb.be16(7));
        if len == 0 {
            return Ok(Xfer::NONE);
        }
        if len < 8 {
            return Err(Sense::param_list_length());
        }
        let list = data_out.get(..len).ok_or_else(Sense::param_list_length)?;
        let bd_len = usize::from(be16_at(list, 2)).min(len - 8);
        let count = bd_len / 16;
        if count > MAX_UNMAP_DESCRIPTORS as usize {
            return Err(Sense::invalid_param_field(2, None));
        }
        let descriptors = || {
            (0..count).map(|i| {
                let at = 8 + 16 * i;
                (at, be64_at(list, at), u64::from(be32_at(list, at + 8)))
            })
        };
        let mut total: u64 = 0;
        for (at, lba, blocks) in descriptors() {
            self.disk_range(lba, blocks)?;
            // Each count is < 2^32 and there are at most 256: no overflow.
            total += blocks;
            if total > u64::from(u32::MAX) {
                return Err(Sense::invalid_param_field(at + 8, None));
            }
        }
        for (_, lba, blocks) in descriptors() {
            if blocks == 0 {
                continue;
            }
            let (offset, bytes) = self.disk_range(lba, blocks)?;
            self.disk
                .discard(offset, bytes)
                .map_err(|e| self.backend_error(BackendOp::Discard, &e))?;
        }
        Ok(Xfer::data_out(len))
    }

    /// WRITE SAME(16): one block of data written to every block of the range (at most
    /// [`MAX_WRITE_SAME_BYTES`]). The UNMAP bit is honoured by writing the data, which is
    /// always allowed (this disk reports LBPRZ 0, so unmapped blocks would not read back
    /// as the data). ANCHOR, NDOB, the obsolete PBDATA/LBDATA bits and WRPROTECT are
    /// refused; so is a block count of 0 (WSNZ 1).
    pub(crate) fn write_same_16(&self, cdb: &Cdb, data_out: &[u8]) -> Result<Xfer, Sense> {
        let flags = cdb.u8(1);
        if flags & 0xE0 != 0 {
            return Err(Sense::invalid_cdb_field(1, Some(7)));
        }
        if flags & 0x10 != 0 {
            return Err(Sense::invalid_cdb_field(1, Some(4)));
        }
        if flags & 0x06 != 0 {
            return Err(Sense::invalid_cdb_field(1, Some(2)));
        }
        if flags & 0x01 != 0 {
            return Err(Sense::invalid_cdb_field(1, Some(0)));
        }
        let lba = cdb.be64(2);
        let blocks = u64::from(cdb.be32(10));
        if blocks == 0 {
            return Err(Sense::invalid_cdb_field(10, None));
        }
        let (offset, bytes) = self.disk_range(lba, blocks)?;
        if bytes > MAX_WRITE_SAME_BYTES {
            return Err(Sense::invalid_cdb_field(10, None));
        }
        if self.disk.read_only() {
            return Err(Sense::write_protected());
        }
        let bs = self.block_size() as usize;
        let block = data_out.get(..bs).ok_or_else(Sense::lba_out_of_range)?;
        // Write the pattern from a buffer of up to 1 MiB of repeated blocks.
        let chunk = (bytes as usize).min(1 << 20);
        let pattern: Vec<u8> = block.iter().copied().cycle().take(chunk).collect();
        let mut done = 0u64;
        while done < bytes {
            let n = (bytes - done).min(chunk as u64) as usize;
            self.disk
                .write_at(&pattern[..n], offset + done)
                .map_err(|e| self.backend_error(BackendOp::Write, &e))?;
            done += n as u64;
        }
        if !self.write_cache.load(Ordering::Relaxed) {
            self.flush()?;
        }
        self.counters.write(bytes);
        Ok(Xfer::data_out(bs))
    }
}
