//! The VHDX metadata log: a circular buffer of 4 KiB sectors holding entries.
//!
//! An entry is a 64-byte header (`loge`: checksum, entry length, tail, sequence number,
//! descriptor count, LogGuid, FlushedFileOffset, LastFileOffset), then 32-byte descriptors
//! filling whole sectors (`desc`: a 4 KiB sector to write, whose first 8 and last 4 bytes
//! live in the descriptor; `zero`: a range to zero), then one `data` sector per data
//! descriptor (4084 payload bytes between the split sequence number). The CRC-32C covers
//! the whole entry with the checksum field zeroed.
//!
//! **Finding the active sequence.** Every sector is tried as the start of a run of valid
//! entries with consecutive sequence numbers; the run whose last entry (the head) has the
//! highest sequence number wins, and replay starts at the entry the head's `tail` names
//! (the whole run if the tail is not in it, which replays already-applied entries again,
//! harmlessly, in order). Entries that fail their CRC are stale or torn and are ignored; an
//! entry that carries the header's LogGuid and a *valid* CRC but is inconsistent (bad
//! length, descriptor or data sector signatures, sequence numbers) is reported as corrupt.

use super::crc;
use super::format::{
    Guid, LOG_SECTOR, MAX_LOG_BYTES, MIB, REGION_TABLE_OFFSETS, corrupt, io_err, le32, le64, put32,
    put64, read_struct, round_up, unsupported,
};
use super::header::Header;
use crate::DiskError;
use crate::storage::Storage;

const ENTRY_SIG: &[u8; 4] = b"loge";
const DESC_SIG: &[u8; 4] = b"desc";
const ZERO_SIG: &[u8; 4] = b"zero";
const DATA_SIG: &[u8; 4] = b"data";
/// How far past the file's end replay may extend it (LastFileOffset sanity bound).
const MAX_REPLAY_GROWTH: u64 = 16 * 1024 * MIB;

/// Sectors taken by the header and `count` descriptors.
pub fn descriptor_sectors(count: u64) -> u64 {
    (count + 2).div_ceil(128)
}

/// The most data sectors one entry can carry in a log of `log_len` bytes.
pub fn max_data_sectors(log_len: u64) -> u64 {
    let total = log_len / LOG_SECTOR as u64;
    let mut n = total.saturating_sub(2);
    while n > 0 && n + descriptor_sectors(n) > total {
        n -= 1;
    }
    n
}

/// One validated entry.
#[derive(Debug, Clone)]
struct Entry {
    /// First sector in the log.
    pos: usize,
    /// Length in sectors.
    sectors: usize,
    seq: u64,
    tail: u64,
    flushed: u64,
    last: u64,
}

/// A write the log asks for.
#[derive(Debug)]
enum Op {
    Data { at: u64, sector: Vec<u8> },
    Zero { at: u64, len: u64 },
}

/// A log that must be replayed: its contents and the entries to apply, in order.
#[derive(Debug)]
pub struct Active {
    log_offset: u64,
    log: Vec<u8>,
    entries: Vec<Entry>,
}

impl Active {
    /// Sequence number of the head entry.
    pub fn head_sequence(&self) -> u64 {
        self.entries.last().map_or(0, |e| e.seq)
    }
}

/// The bytes of `sectors` log sectors from `pos`, wrapping around the end.
fn gather(log: &[u8], pos: usize, sectors: usize) -> Vec<u8> {
    let n = log.len() / LOG_SECTOR;
    let mut out = Vec::with_capacity(sectors * LOG_SECTOR);
    for k in 0..sectors {
        let s = (pos + k) % n;
        out.extend_from_slice(&log[s * LOG_SECTOR..(s + 1) * LOG_SECTOR]);
    }
    out
}

/// The entry at sector `pos`: `Ok(None)` if there is none (or it is stale/torn),
/// `Err` if it is checksummed but inconsistent.
fn parse_entry(
    log: &[u8],
    log_offset: u64,
    pos: usize,
    guid: Guid,
) -> Result<Option<(Entry, Vec<Op>)>, DiskError> {
    let n = log.len() / LOG_SECTOR;
    let h = &log[pos * LOG_SECTOR..pos * LOG_SECTOR + 64];
    if &h[0..4] != ENTRY_SIG || Guid::read(h, 32) != guid {
        return Ok(None);
    }
    let at = log_offset + (pos * LOG_SECTOR) as u64;
    let bad = |reason: String| Err(corrupt("VHDX log entry", at, reason));
    let length = u64::from(le32(h, 8));
    let seq = le64(h, 16);
    let count = u64::from(le32(h, 24));
    if length == 0 || !length.is_multiple_of(LOG_SECTOR as u64) || length > log.len() as u64 {
        return bad(format!(
            "entry length {length:#x} is not a multiple of 4 KiB within the log"
        ));
    }
    let sectors = (length / LOG_SECTOR as u64) as usize;
    let dsec = descriptor_sectors(count);
    if dsec > sectors as u64 {
        return bad(format!(
            "{count} descriptors do not fit a {length:#x}-byte entry"
        ));
    }
    let bytes = gather(log, pos, sectors);
    if !crc::verify(&bytes, 4) {
        return Ok(None); // stale or torn
    }
    if seq == 0 {
        return bad("sequence number 0".into());
    }
    let tail = u64::from(le32(h, 12));
    if !tail.is_multiple_of(LOG_SECTOR as u64) || tail >= log.len() as u64 {
        return bad(format!("tail {tail:#x} is not a sector of the log"));
    }
    let mut ops = Vec::with_capacity(count as usize);
    let mut data_idx = dsec as usize;
    for i in 0..count as usize {
        let d = &bytes[64 + i * 32..96 + i * 32];
        let target = le64(d, 16);
        if le64(d, 24) != seq {
            return bad(format!(
                "descriptor {i} has sequence {} (entry {seq})",
                le64(d, 24)
            ));
        }
        if !target.is_multiple_of(LOG_SECTOR as u64) {
            return bad(format!(
                "descriptor {i} targets unaligned offset {target:#x}"
            ));
        }
        if &d[0..4] == ZERO_SIG {
            let len = le64(d, 8);
            if !len.is_multiple_of(LOG_SECTOR as u64) {
                return bad(format!(
                    "zero descriptor {i} length {len:#x} is not 4 KiB aligned"
                ));
            }
            ops.push(Op::Zero { at: target, len });
        } else if &d[0..4] == DESC_SIG {
            if data_idx >= sectors {
                return bad(format!("data descriptor {i} has no data sector"));
            }
            let s = &bytes[data_idx * LOG_SECTOR..(data_idx + 1) * LOG_SECTOR];
            let sseq = (u64::from(le32(s, 4)) << 32) | u64::from(le32(s, 4092));
            if &s[0..4] != DATA_SIG || sseq != seq {
                return bad(format!(
                    "data sector {data_idx} has a bad signature or sequence"
                ));
            }
            let mut sector = Vec::with_capacity(LOG_SECTOR);
            sector.extend_from_slice(&d[8..16]);
            sector.extend_from_slice(&s[8..4092]);
            sector.extend_from_slice(&d[4..8]);
            ops.push(Op::Data { at: target, sector });
            data_idx += 1;
        } else {
            return bad(format!("descriptor {i} has an unknown signature"));
        }
    }
    let _ = n;
    Ok(Some((
        Entry {
            pos,
            sectors,
            seq,
            tail,
            flushed: le64(h, 48),
            last: le64(h, 56),
        },
        ops,
    )))
}

/// Look for an active sequence in the log named by `header`. `None`: nothing to replay.
pub fn scan(storage: &dyn Storage, header: &Header) -> Result<Option<Active>, DiskError> {
    let len = u64::from(header.log_length);
    if header.log_guid.is_zero() || len == 0 {
        return Ok(None);
    }
    if len > MAX_LOG_BYTES {
        return Err(unsupported(format!(
            "VHDX log of {len} bytes (Parvis replays at most {MAX_LOG_BYTES})"
        )));
    }
    let mut log = vec![0u8; len as usize];
    read_struct(storage, &mut log, header.log_offset, "VHDX log")?;
    let n = log.len() / LOG_SECTOR;
    let mut memo: Vec<Option<Option<Entry>>> = vec![None; n];
    let mut get = |pos: usize| -> Result<Option<Entry>, DiskError> {
        if let Some(e) = &memo[pos] {
            return Ok(e.clone());
        }
        let e = parse_entry(&log, header.log_offset, pos, header.log_guid)?.map(|(e, _)| e);
        memo[pos] = Some(e.clone());
        Ok(e)
    };
    let mut covered = vec![false; n];
    let mut best: Option<Vec<Entry>> = None;
    for start in 0..n {
        if covered[start] {
            continue;
        }
        let Some(first) = get(start)? else { continue };
        let mut used = first.sectors;
        let mut pos = (start + first.sectors) % n;
        let mut chain = vec![first];
        while used < n {
            let Some(next) = get(pos)? else { break };
            let prev = chain.last().expect("non-empty").seq;
            if Some(next.seq) != prev.checked_add(1) || used + next.sectors > n {
                break;
            }
            used += next.sectors;
            pos = (pos + next.sectors) % n;
            chain.push(next);
        }
        for e in &chain {
            covered[e.pos] = true;
        }
        let head = chain.last().expect("non-empty").seq;
        if best
            .as_ref()
            .is_none_or(|b| head > b.last().expect("non-empty").seq)
        {
            best = Some(chain);
        }
    }
    let Some(chain) = best else { return Ok(None) };
    let tail = chain.last().expect("non-empty").tail;
    let start = chain
        .iter()
        .position(|e| (e.pos * LOG_SECTOR) as u64 == tail)
        .unwrap_or(0);
    Ok(Some(Active {
        log_offset: header.log_offset,
        log,
        entries: chain[start..].to_vec(),
    }))
}

/// Apply the active sequence: validate every entry, write its sectors, extend the file to
/// the newest LastFileOffset (rounded up to 1 MiB), and flush. The caller then clears the
/// LogGuid.
pub fn apply(storage: &dyn Storage, header: &Header, active: &Active) -> Result<(), DiskError> {
    let file_len = storage.len().map_err(io_err("stat", 0))?;
    let log_start = header.log_offset;
    let log_end = log_start + u64::from(header.log_length);
    let mut plan = Vec::new();
    let mut new_len = file_len;
    for e in &active.entries {
        let at = active.log_offset + (e.pos * LOG_SECTOR) as u64;
        let bad = |reason: String| corrupt("VHDX log entry", at, reason);
        if e.flushed > file_len {
            return Err(bad(format!(
                "FlushedFileOffset {:#x} is past the end of the {file_len:#x}-byte file (truncated image)",
                e.flushed
            )));
        }
        if e.last > file_len.max(e.flushed).saturating_add(MAX_REPLAY_GROWTH) {
            return Err(bad(format!("LastFileOffset {:#x} is absurd", e.last)));
        }
        let limit = file_len.max(e.last);
        let (_, ops) = parse_entry(&active.log, active.log_offset, e.pos, header.log_guid)?
            .ok_or_else(|| bad("entry changed while replaying".into()))?;
        for op in ops {
            let (t, len) = match &op {
                Op::Data { at, .. } => (*at, LOG_SECTOR as u64),
                Op::Zero { at, len } => (*at, *len),
            };
            let end = t.checked_add(len).filter(|&end| end <= limit);
            let Some(end) = end else {
                return Err(bad(format!(
                    "descriptor targets {t:#x}+{len:#x}, past the file"
                )));
            };
            if t < REGION_TABLE_OFFSETS[0] || (t < log_end && log_start < end) {
                return Err(bad(format!(
                    "descriptor targets {t:#x}, inside the headers or the log"
                )));
            }
            plan.push(op);
        }
        new_len = new_len.max(e.last);
    }
    for op in plan {
        match op {
            Op::Data { at, sector } => storage
                .write_at(&sector, at)
                .map_err(io_err("replay VHDX log", at))?,
            Op::Zero { at, len } => {
                let zeros = vec![0u8; MIB as usize];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(MIB);
                    storage
                        .write_at(&zeros[..n as usize], at + done)
                        .map_err(io_err("replay VHDX log", at + done))?;
                    done += n;
                }
            }
        }
    }
    let cur = storage.len().map_err(io_err("stat", 0))?;
    if new_len > cur {
        let target = round_up(new_len, MIB).unwrap_or(new_len);
        storage
            .set_len(target)
            .map_err(io_err("extend after VHDX log replay", target))?;
    }
    storage.sync().map_err(io_err("flush VHDX log replay", 0))
}

/// Build one log entry at log offset `tail` (its own position) that writes `sectors`
/// (4 KiB each, at 4 KiB aligned file offsets).
pub fn build_entry(
    seq: u64,
    guid: Guid,
    tail: u32,
    file_len: u64,
    sectors: &[(u64, &[u8])],
) -> Vec<u8> {
    let count = sectors.len();
    let dsec = descriptor_sectors(count as u64) as usize;
    let mut b = vec![0u8; (dsec + count) * LOG_SECTOR];
    let total = b.len() as u32;
    b[0..4].copy_from_slice(ENTRY_SIG);
    put32(&mut b, 8, total);
    put32(&mut b, 12, tail);
    put64(&mut b, 16, seq);
    put32(&mut b, 24, count as u32);
    b[32..48].copy_from_slice(&guid.0);
    put64(&mut b, 48, file_len);
    put64(&mut b, 56, file_len);
    for (i, (at, data)) in sectors.iter().enumerate() {
        let d = 64 + i * 32;
        b[d..d + 4].copy_from_slice(DESC_SIG);
        b[d + 4..d + 8].copy_from_slice(&data[4092..4096]);
        b[d + 8..d + 16].copy_from_slice(&data[0..8]);
        put64(&mut b, d + 16, *at);
        put64(&mut b, d + 24, seq);
        let s = (dsec + i) * LOG_SECTOR;
        b[s..s + 4].copy_from_slice(DATA_SIG);
        put32(&mut b, s + 4, (seq >> 32) as u32);
        b[s + 8..s + 4092].copy_from_slice(&data[8..4092]);
        put32(&mut b, s + 4092, seq as u32);
    }
    crc::seal(&mut b, 4);
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    fn header(guid: Guid) -> Header {
        Header {
            sequence: 1,
            file_write_guid: Guid::random(),
            data_write_guid: Guid::random(),
            log_guid: guid,
            log_version: 0,
            version: 1,
            log_length: MIB as u32,
            log_offset: MIB,
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(descriptor_sectors(0), 1);
        assert_eq!(descriptor_sectors(126), 1);
        assert_eq!(descriptor_sectors(127), 2);
        let n = max_data_sectors(MIB);
        assert!(n + descriptor_sectors(n) <= 256 && n > 250);
    }

    #[test]
    fn picks_newest_sequence_and_replays() {
        let s = MemStorage::new(vec![0; 4 * MIB as usize], 8 * MIB);
        let g = Guid::random();
        let old = vec![1u8; 4096];
        let new = vec![2u8; 4096];
        let e1 = build_entry(7, g, 0, 4 * MIB, &[(3 * MIB, &old)]);
        let e2 = build_entry(8, g, 0, 4 * MIB, &[(3 * MIB, &new)]);
        s.write_at(&e1, MIB).unwrap();
        s.write_at(&e2, MIB + e1.len() as u64).unwrap();
        // A stale entry from another log is ignored.
        let other = build_entry(99, Guid::random(), 0, 4 * MIB, &[(3 * MIB, &old)]);
        s.write_at(&other, MIB + 64 * 4096).unwrap();
        let h = header(g);
        let a = scan(&s, &h).unwrap().unwrap();
        assert_eq!(a.head_sequence(), 8);
        assert_eq!(a.entries.len(), 2);
        apply(&s, &h, &a).unwrap();
        let mut b = vec![0u8; 4096];
        s.read_at(&mut b, 3 * MIB).unwrap();
        assert_eq!(b, new);
        assert!(scan(&s, &header(Guid::ZERO)).unwrap().is_none());
    }

    #[test]
    fn hostile_entries() {
        let g = Guid::random();
        let h = header(g);
        let data = vec![3u8; 4096];
        // Checksummed entry whose data sector sequence does not match.
        let s = MemStorage::new(vec![0; 4 * MIB as usize], 8 * MIB);
        let mut e = build_entry(5, g, 0, 4 * MIB, &[(3 * MIB, &data)]);
        put32(&mut e, 4096 + 4092, 6);
        crc::seal(&mut e, 4);
        s.write_at(&e, MIB).unwrap();
        assert!(matches!(scan(&s, &h), Err(DiskError::Corrupt { .. })));
        // Bad entry length.
        let mut e = build_entry(5, g, 0, 4 * MIB, &[(3 * MIB, &data)]);
        put32(&mut e, 8, 4097);
        s.write_at(&e, MIB).unwrap();
        assert!(matches!(scan(&s, &h), Err(DiskError::Corrupt { .. })));
        // A torn entry (bad CRC) is ignored.
        let mut e = build_entry(5, g, 0, 4 * MIB, &[(3 * MIB, &data)]);
        e[5000] ^= 1;
        s.write_at(&e, MIB).unwrap();
        assert!(scan(&s, &h).unwrap().is_none());
        // Targets the headers: corrupt at apply time.
        let e = build_entry(5, g, 0, 4 * MIB, &[(64 * 1024, &data)]);
        s.write_at(&e, MIB).unwrap();
        let a = scan(&s, &h).unwrap().unwrap();
        assert!(matches!(apply(&s, &h, &a), Err(DiskError::Corrupt { .. })));
        // FlushedFileOffset past the end of the file.
        let e = build_entry(5, g, 0, 64 * MIB, &[(3 * MIB, &data)]);
        s.write_at(&e, MIB).unwrap();
        let a = scan(&s, &h).unwrap().unwrap();
        assert!(matches!(apply(&s, &h, &a), Err(DiskError::Corrupt { .. })));
    }
}
