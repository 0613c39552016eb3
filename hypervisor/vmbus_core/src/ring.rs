//! VMBus ring buffers in guest memory (Linux `drivers/hv/ring_buffer.c`; VMBUS-ON-KVM.md §3).
//!
//! A ring is a list of guest pages: a 4 KiB header page (write_index @0, read_index @4,
//! interrupt_mask @8, pending_send_sz @12, feature_bits @64) and the data pages, which need
//! not be contiguous. The guest can rewrite every header field at any time, so each index is
//! re-read and validated before use and nothing here trusts a previous value.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering, fence};

use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileMemory,
};

use crate::channel::TransferRange;
use crate::memory::PageList;

/// Page size of rings and GPADLs.
pub const PAGE: u64 = crate::memory::PAGE;
/// Largest ring we accept (data bytes), far above what Linux drivers use.
pub const MAX_RING_BYTES: u64 = 16 << 20;
/// Largest packet we read from a guest ring.
pub const MAX_PACKET: usize = 64 * 1024;

/// Packet types (`enum vmbus_packet_type`).
pub mod pkt {
    pub const DATA_INBAND: u16 = 0x6;
    pub const DATA_USING_XFER_PAGES: u16 = 0x7;
    pub const DATA_USING_GPA_DIRECT: u16 = 0x9;
    pub const COMP: u16 = 0xb;
    /// Completion requested.
    pub const FLAG_COMPLETION_REQUESTED: u16 = 1;
}

/// Ring failures: all mean the guest broke the protocol (or the ring is full).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// A ring page is not guest RAM.
    #[error("ring page {0:#x} is not guest RAM")]
    BadPage(u64),
    /// Fewer than two pages, or too large.
    #[error("ring of {0} pages is not usable")]
    BadSize(usize),
    /// An index is out of range or misaligned.
    #[error("ring index {0:#x} is invalid")]
    BadIndex(u32),
    /// A packet header is inconsistent.
    #[error("bad packet: {0}")]
    BadPacket(&'static str),
    /// No room for the packet now.
    #[error("ring full")]
    Full,
}

const WRITE_INDEX: usize = 0;
const READ_INDEX: usize = 4;
const INTERRUPT_MASK: usize = 8;
const PENDING_SEND_SZ: usize = 12;
const FEATURE_BITS: usize = 64;

/// One ring: its header page and data pages.
#[derive(Debug)]
struct Ring {
    mem: Arc<GuestMemoryMmap>,
    header: GuestAddress,
    pages: Vec<GuestAddress>,
    size: u32,
}

impl Ring {
    fn new(mem: Arc<GuestMemoryMmap>, pfns: &[u64]) -> Result<Self, RingError> {
        if pfns.len() < 2 || (pfns.len() as u64 - 1) * PAGE > MAX_RING_BYTES {
            return Err(RingError::BadSize(pfns.len()));
        }
        let mut gpas = Vec::with_capacity(pfns.len());
        for &pfn in pfns {
            let gpa = pfn
                .checked_mul(PAGE)
                .filter(|g| mem.check_range(GuestAddress(*g), PAGE as usize))
                .ok_or(RingError::BadPage(pfn))?;
            gpas.push(GuestAddress(gpa));
        }
        let header = gpas.remove(0);
        let size = (gpas.len() as u64 * PAGE) as u32;
        Ok(Self {
            mem,
            header,
            pages: gpas,
            size,
        })
    }

    fn atomic(&self, off: usize, f: impl FnOnce(&AtomicU32) -> u32) -> u32 {
        // The header page was checked to be RAM when the ring was built.
        match self.mem.get_slice(self.header, PAGE as usize) {
            Ok(s) => match s.get_atomic_ref::<AtomicU32>(off) {
                Ok(a) => f(a),
                Err(_) => 0,
            },
            Err(_) => 0,
        }
    }

    fn load(&self, off: usize) -> u32 {
        self.atomic(off, |a| a.load(Ordering::Acquire))
    }

    fn store(&self, off: usize, v: u32) {
        self.atomic(off, |a| {
            a.store(v, Ordering::Release);
            0
        });
    }

    fn index(&self, off: usize) -> Result<u32, RingError> {
        let v = self.load(off);
        if v >= self.size || !v.is_multiple_of(8) {
            return Err(RingError::BadIndex(v));
        }
        Ok(v)
    }

    /// Copy `buf.len()` bytes starting at data offset `at`, wrapping.
    fn read_at(&self, mut at: u32, buf: &mut [u8]) -> Result<(), RingError> {
        let mut done = 0;
        while done < buf.len() {
            at %= self.size;
            let page = (at as u64 / PAGE) as usize;
            let off = at as u64 % PAGE;
            let n = ((PAGE - off) as usize).min(buf.len() - done);
            self.mem
                .read_slice(
                    &mut buf[done..done + n],
                    self.pages[page].unchecked_add(off),
                )
                .map_err(|_| RingError::BadPage(self.pages[page].0))?;
            done += n;
            at += n as u32;
        }
        Ok(())
    }

    fn write_at(&self, mut at: u32, data: &[u8]) -> Result<(), RingError> {
        let mut done = 0;
        while done < data.len() {
            at %= self.size;
            let page = (at as u64 / PAGE) as usize;
            let off = at as u64 % PAGE;
            let n = ((PAGE - off) as usize).min(data.len() - done);
            self.mem
                .write_slice(&data[done..done + n], self.pages[page].unchecked_add(off))
                .map_err(|_| RingError::BadPage(self.pages[page].0))?;
            done += n;
            at += n as u32;
        }
        Ok(())
    }
}

/// A packet's fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketHeader {
    pub ptype: u16,
    /// Payload start in bytes from the packet start.
    pub offset: usize,
    /// Packet length in bytes, excluding the trailer.
    pub len: usize,
    pub flags: u16,
    pub trans_id: u64,
}

/// Decode and check a packet header against the bytes available in the ring.
pub fn parse_packet_header(h: &[u8; 16], available: usize) -> Result<PacketHeader, RingError> {
    let ptype = u16::from_le_bytes([h[0], h[1]]);
    let offset = usize::from(u16::from_le_bytes([h[2], h[3]])) * 8;
    let len = usize::from(u16::from_le_bytes([h[4], h[5]])) * 8;
    let flags = u16::from_le_bytes([h[6], h[7]]);
    let mut t = [0u8; 8];
    t.copy_from_slice(&h[8..16]);
    if offset < 16 || offset > len {
        return Err(RingError::BadPacket("payload offset outside the packet"));
    }
    if len + 8 > available {
        return Err(RingError::BadPacket(
            "packet longer than the ring's contents",
        ));
    }
    if len > MAX_PACKET {
        return Err(RingError::BadPacket("packet too large"));
    }
    Ok(PacketHeader {
        ptype,
        offset,
        len,
        flags,
        trans_id: u64::from_le_bytes(t),
    })
}

/// A packet read from the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub header: PacketHeader,
    /// The whole packet (header, descriptor, payload), without the trailer.
    pub bytes: Vec<u8>,
}

/// Most ranges one GPA-direct packet may carry.
pub const MAX_GPA_RANGES: usize = 64;

impl Packet {
    /// The payload (after offset8).
    pub fn payload(&self) -> &[u8] {
        &self.bytes[self.header.offset..]
    }

    /// The page lists of a GPA-direct packet (`vmdata_gpa_direct`: reserved u32, range
    /// count u32, then per range byte count u32, byte offset u32 and its page numbers), each
    /// checked; they must fit in the descriptor (between the header and the payload).
    pub fn gpa_direct(&self) -> Result<Vec<PageList>, RingError> {
        if self.header.ptype != pkt::DATA_USING_GPA_DIRECT {
            return Err(RingError::BadPacket("not a GPA-direct packet"));
        }
        let desc = &self.bytes[16..self.header.offset];
        let word = |o: usize| -> Option<u32> {
            let b = desc.get(o..o.checked_add(4)?)?;
            Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let short = RingError::BadPacket("GPA-direct descriptor shorter than its ranges");
        let count = word(4).ok_or(short.clone())? as usize;
        if count == 0 || count > MAX_GPA_RANGES {
            return Err(RingError::BadPacket("GPA-direct range count out of bounds"));
        }
        let mut out = Vec::with_capacity(count);
        let mut o = 8usize;
        for _ in 0..count {
            let byte_count = word(o).ok_or(short.clone())?;
            let byte_offset = word(o + 4).ok_or(short.clone())?;
            o += 8;
            let pages = (u64::from(byte_offset % PAGE as u32) + u64::from(byte_count))
                .div_ceil(PAGE) as usize;
            if (desc.len() - o.min(desc.len())) / 8 < pages {
                return Err(short);
            }
            let pfns = (0..pages)
                .map(|i| {
                    let b = &desc[o + 8 * i..o + 8 * i + 8];
                    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
                })
                .collect();
            o += 8 * pages;
            out.push(
                PageList::new(byte_offset, byte_count, pfns)
                    .map_err(|_| RingError::BadPacket("GPA-direct range is not a page list"))?,
            );
        }
        Ok(out)
    }
}

/// The descriptor of a transfer-page packet (`vmtransfer_page_packet_header` after the
/// packet header): set id, sender-owns-set 0, range count, then the ranges.
pub fn transfer_page_descriptor(set_id: u16, ranges: &[TransferRange]) -> Vec<u8> {
    let mut d = Vec::with_capacity(8 + 8 * ranges.len());
    d.extend_from_slice(&set_id.to_le_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
    for r in ranges {
        d.extend_from_slice(&r.byte_count.to_le_bytes());
        d.extend_from_slice(&r.byte_offset.to_le_bytes());
    }
    d
}

/// The guest→host ring: the host consumes.
#[derive(Debug)]
pub struct InRing(Ring);

/// The host→guest ring: the host produces.
#[derive(Debug)]
pub struct OutRing(Ring);

/// Whether the guest must be interrupted after an operation.
pub type NeedSignal = bool;

impl InRing {
    /// A ring over `pfns` (header first).
    pub fn new(mem: Arc<GuestMemoryMmap>, pfns: &[u64]) -> Result<Self, RingError> {
        let r = Ring::new(mem, pfns)?;
        // The guest signals until the host masks (while it reads).
        r.store(INTERRUPT_MASK, 0);
        Ok(Self(r))
    }

    /// Ask the guest not to signal new packets (`true`) while the host is reading anyway,
    /// or to signal again (`false`). Linux checks the mask before each HvSignalEvent, so a
    /// host that masks while it works saves the guest one exit per packet. After unmasking,
    /// check [`InRing::is_empty`] before sleeping: a packet written just before the unmask
    /// came without a signal.
    pub fn set_interrupt_mask(&self, masked: bool) {
        self.0.store(INTERRUPT_MASK, u32::from(masked));
        fence(Ordering::SeqCst);
    }

    /// Whether no packet is waiting.
    pub fn is_empty(&self) -> Result<bool, RingError> {
        Ok(self.available()?.2 == 0)
    }

    /// Bytes waiting.
    fn available(&self) -> Result<(u32, u32, u32), RingError> {
        let w = self.0.index(WRITE_INDEX)?;
        let r = self.0.index(READ_INDEX)?;
        let avail = (w + self.0.size - r) % self.0.size;
        Ok((r, w, avail))
    }

    /// Read the next packet, if any. Returns the packet and whether the guest must be
    /// signalled (it was blocked waiting for room, pending_send_sz).
    pub fn read(&mut self) -> Result<Option<(Packet, NeedSignal)>, RingError> {
        let (r, _, avail) = self.available()?;
        if avail == 0 {
            return Ok(None);
        }
        fence(Ordering::SeqCst);
        let mut h = [0u8; 16];
        if avail < 24 {
            return Err(RingError::BadPacket("partial packet"));
        }
        self.0.read_at(r, &mut h)?;
        let header = parse_packet_header(&h, avail as usize)?;
        let mut bytes = vec![0u8; header.len];
        self.0.read_at(r, &mut bytes)?;
        let total = (header.len + 8) as u32;
        let before_free = self.0.size - avail;
        fence(Ordering::SeqCst);
        self.0.store(READ_INDEX, (r + total) % self.0.size);
        fence(Ordering::SeqCst);
        let signal = self.pending_crossed(before_free, before_free + total);
        Ok(Some((Packet { header, bytes }, signal)))
    }

    fn pending_crossed(&self, before: u32, after: u32) -> bool {
        if self.0.load(FEATURE_BITS) & 1 == 0 {
            return false;
        }
        let pending = self.0.load(PENDING_SEND_SZ);
        pending != 0 && before < pending && after >= pending
    }
}

impl OutRing {
    /// A ring over `pfns` (header first).
    pub fn new(mem: Arc<GuestMemoryMmap>, pfns: &[u64]) -> Result<Self, RingError> {
        Ok(Self(Ring::new(mem, pfns)?))
    }

    /// Data bytes of the ring.
    pub fn size(&self) -> u32 {
        self.0.size
    }

    /// Write one packet of `ptype` with `payload` (inband: no descriptor). Returns whether
    /// the guest must be signalled.
    pub fn write(
        &mut self,
        ptype: u16,
        flags: u16,
        trans_id: u64,
        payload: &[u8],
    ) -> Result<NeedSignal, RingError> {
        self.write_with(ptype, flags, trans_id, &[], payload)
    }

    /// Write one packet of `ptype` whose `descriptor` (a multiple of 8 bytes) sits between
    /// the header and `payload`. Returns whether the guest must be signalled.
    pub fn write_with(
        &mut self,
        ptype: u16,
        flags: u16,
        trans_id: u64,
        descriptor: &[u8],
        payload: &[u8],
    ) -> Result<NeedSignal, RingError> {
        if !descriptor.len().is_multiple_of(8) {
            return Err(RingError::BadPacket("descriptor not a multiple of 8 bytes"));
        }
        let start = 16 + descriptor.len();
        let len = (start + payload.len()).div_ceil(8) * 8;
        if len > MAX_PACKET {
            return Err(RingError::BadPacket("packet too large"));
        }
        let w = self.0.index(WRITE_INDEX)?;
        let r = self.0.index(READ_INDEX)?;
        let used = (w + self.0.size - r) % self.0.size;
        let free = self.0.size - used;
        let need = (len + 8) as u32;
        if free <= need {
            return Err(RingError::Full);
        }
        let mut p = vec![0u8; len + 8];
        p[0..2].copy_from_slice(&ptype.to_le_bytes());
        p[2..4].copy_from_slice(&((start / 8) as u16).to_le_bytes());
        p[4..6].copy_from_slice(&((len / 8) as u16).to_le_bytes());
        p[6..8].copy_from_slice(&flags.to_le_bytes());
        p[8..16].copy_from_slice(&trans_id.to_le_bytes());
        p[16..start].copy_from_slice(descriptor);
        p[start..start + payload.len()].copy_from_slice(payload);
        p[len..].copy_from_slice(&(u64::from(w) << 32).to_le_bytes());
        self.0.write_at(w, &p)?;
        fence(Ordering::SeqCst);
        self.0.store(WRITE_INDEX, (w + need) % self.0.size);
        fence(Ordering::SeqCst);
        let masked = self.0.load(INTERRUPT_MASK) != 0;
        let r_now = self.0.load(READ_INDEX);
        Ok(!masked && r_now == w)
    }

    /// Ask the guest to signal when `bytes` are free (we are blocked).
    pub fn set_pending_send(&self, bytes: u32) {
        self.0.store(PENDING_SEND_SZ, bytes);
    }
}

/// Split a ring GPADL's PFNs into (guest→host, host→guest) at `downstream_offset` pages.
pub fn split_rings(pfns: &[u64], downstream_offset: u32) -> Option<(&[u64], &[u64])> {
    let at = downstream_offset as usize;
    if at < 2 || pfns.len() < at + 2 {
        return None;
    }
    Some(pfns.split_at(at))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> Arc<GuestMemoryMmap> {
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap())
    }

    /// A guest-side writer into a ring (mirrors Linux's hv_ringbuffer_write).
    fn guest_write(m: &GuestMemoryMmap, hdr: u64, pages: &[u64], pkt: &[u8]) {
        let size = (pages.len() as u64 * PAGE) as u32;
        let w: u32 = m.read_obj(GuestAddress(hdr)).unwrap();
        let mut all = pkt.to_vec();
        all.extend_from_slice(&(u64::from(w) << 32).to_le_bytes());
        for (i, b) in all.iter().enumerate() {
            let at = (w as usize + i) % size as usize;
            let gpa = pages[at / 4096] * PAGE + (at % 4096) as u64;
            m.write_obj(*b, GuestAddress(gpa)).unwrap();
        }
        m.write_obj((w + all.len() as u32) % size, GuestAddress(hdr))
            .unwrap();
    }

    fn inband(payload: &[u8], trans: u64) -> Vec<u8> {
        let len = (16 + payload.len()).div_ceil(8) * 8;
        let mut p = vec![0u8; len];
        p[0..2].copy_from_slice(&6u16.to_le_bytes());
        p[2..4].copy_from_slice(&2u16.to_le_bytes());
        p[4..6].copy_from_slice(&((len / 8) as u16).to_le_bytes());
        p[8..16].copy_from_slice(&trans.to_le_bytes());
        p[16..16 + payload.len()].copy_from_slice(payload);
        p
    }

    #[test]
    fn packets_round_trip_across_scattered_pages_and_wrap() {
        let m = mem();
        // Header at pfn 1, data pages 9 and 4 (not contiguous).
        let pfns = [1u64, 9, 4];
        let mut r = InRing::new(m.clone(), &pfns).unwrap();
        assert_eq!(r.read().unwrap(), None);
        let mut trans = 0;
        // Many packets of varying size: the ring wraps several times.
        for round in 0..200u64 {
            let n = (round as usize * 37) % 900 + 1;
            let payload: Vec<u8> = (0..n).map(|i| (i as u64 ^ round) as u8).collect();
            let payload = &payload[..];
            guest_write(&m, 0x1000, &[9, 4], &inband(payload, round));
            let (p, _) = r.read().unwrap().unwrap();
            assert_eq!(p.header.trans_id, round);
            assert_eq!(&p.payload()[..payload.len()], payload);
            trans += 1;
        }
        assert_eq!(trans, 200);
        assert_eq!(r.read().unwrap(), None);
    }

    #[test]
    fn hostile_indices_and_headers_are_errors() {
        let m = mem();
        let mut r = InRing::new(m.clone(), &[1, 2, 3]).unwrap();
        m.write_obj(8193u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(r.read(), Err(RingError::BadIndex(8193)));
        m.write_obj(12u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(r.read(), Err(RingError::BadIndex(12)));
        // A header claiming more bytes than written.
        let mut p = inband(b"abc", 1);
        p[4..6].copy_from_slice(&100u16.to_le_bytes());
        m.write_obj(0u32, GuestAddress(0x1000)).unwrap();
        guest_write(&m, 0x1000, &[2, 3], &p);
        assert!(matches!(r.read(), Err(RingError::BadPacket(_))));
        assert!(InRing::new(m.clone(), &[1]).is_err());
        assert!(InRing::new(m.clone(), &[1, 1 << 40]).is_err());
    }

    #[test]
    fn host_writes_signal_only_when_the_guest_is_idle_and_unmasked() {
        let m = mem();
        let mut w = OutRing::new(m.clone(), &[5, 6]).unwrap();
        assert!(w.write(6, 0, 1, b"one").unwrap(), "empty ring: signal");
        assert!(
            !w.write(6, 0, 2, b"two").unwrap(),
            "guest has not caught up"
        );
        // Guest consumes everything and masks.
        let wi: u32 = m.read_obj(GuestAddress(0x5000)).unwrap();
        m.write_obj(wi, GuestAddress(0x5004)).unwrap();
        m.write_obj(1u32, GuestAddress(0x5008)).unwrap();
        assert!(!w.write(6, 0, 3, b"three").unwrap(), "masked");
        // Read it back the way the guest would.
        let h: [u8; 2] = m.read_obj(GuestAddress(0x6000 + u64::from(wi))).unwrap();
        assert_eq!(u16::from_le_bytes(h), 6);
        // Fill: eventually Full, never an overwrite.
        let mut n = 0;
        loop {
            match w.write(6, 0, 9, &[0u8; 500]) {
                Ok(_) => n += 1,
                Err(RingError::Full) => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(n < 9);
    }

    #[test]
    fn a_host_reading_masks_the_guests_signals() {
        let m = mem();
        // The guest writes with an OutRing over the same pages the host reads.
        let host = InRing::new(m.clone(), &[1, 2]).unwrap();
        let mut guest = OutRing::new(m.clone(), &[1, 2]).unwrap();
        assert!(host.is_empty().unwrap());
        host.set_interrupt_mask(true);
        assert!(!guest.write(pkt::DATA_INBAND, 0, 1, b"quiet").unwrap());
        assert!(!host.is_empty().unwrap());
        let mut host = host;
        host.read().unwrap().unwrap();
        host.set_interrupt_mask(false);
        assert!(host.is_empty().unwrap());
        assert!(guest.write(pkt::DATA_INBAND, 0, 2, b"loud").unwrap());
    }

    #[test]
    fn pending_send_size_signals_once_when_room_appears() {
        let m = mem();
        let mut r = InRing::new(m.clone(), &[1, 2]).unwrap();
        m.write_obj(1u32, GuestAddress(0x1000 + 64)).unwrap();
        m.write_obj(4090u32, GuestAddress(0x1000 + 12)).unwrap();
        guest_write(&m, 0x1000, &[2], &inband(&[1u8; 16], 1));
        let (_, sig) = r.read().unwrap().unwrap();
        assert!(sig, "free space crossed pending_send_sz");
        guest_write(&m, 0x1000, &[2], &inband(&[1u8; 16], 2));
        m.write_obj(100u32, GuestAddress(0x1000 + 12)).unwrap();
        let (_, sig) = r.read().unwrap().unwrap();
        assert!(!sig, "there was room already");
    }

    #[test]
    fn descriptors_sit_between_header_and_payload() {
        let m = mem();
        let mut w = OutRing::new(m.clone(), &[5, 6]).unwrap();
        let d = transfer_page_descriptor(
            0xcafe,
            &[TransferRange {
                byte_count: 1514,
                byte_offset: 6144,
            }],
        );
        assert_eq!(d.len(), 16);
        w.write_with(pkt::DATA_USING_XFER_PAGES, 1, 77, &d, b"nvsp")
            .unwrap();
        // Read it back as the guest would, with a host reader on the same pages.
        let mut r = InRing::new(m.clone(), &[5, 6]).unwrap();
        let (p, _) = r.read().unwrap().unwrap();
        assert_eq!(p.header.ptype, pkt::DATA_USING_XFER_PAGES);
        assert_eq!(p.header.offset, 32);
        assert_eq!(p.header.trans_id, 77);
        assert_eq!(&p.bytes[16..18], &0xcafeu16.to_le_bytes());
        assert_eq!(&p.bytes[20..24], &1u32.to_le_bytes());
        assert_eq!(&p.bytes[24..28], &1514u32.to_le_bytes());
        assert_eq!(&p.payload()[..4], b"nvsp");
        assert!(w.write_with(6, 0, 0, &[0; 3], b"").is_err());
    }

    #[test]
    fn gpa_direct_ranges_are_parsed_and_checked() {
        // A storvsc-style packet: one range of 8192 bytes at offset 512 (three pages).
        let mut desc = Vec::new();
        desc.extend_from_slice(&0u32.to_le_bytes());
        desc.extend_from_slice(&1u32.to_le_bytes());
        desc.extend_from_slice(&8192u32.to_le_bytes());
        desc.extend_from_slice(&512u32.to_le_bytes());
        for pfn in [10u64, 3, 11] {
            desc.extend_from_slice(&pfn.to_le_bytes());
        }
        let packet = |desc: &[u8], ptype: u16| {
            let mut bytes = vec![0u8; 16];
            bytes[0..2].copy_from_slice(&ptype.to_le_bytes());
            bytes.extend_from_slice(desc);
            let offset = bytes.len();
            bytes.extend_from_slice(&[0xab; 8]);
            Packet {
                header: PacketHeader {
                    ptype,
                    offset,
                    len: bytes.len(),
                    flags: 1,
                    trans_id: 5,
                },
                bytes,
            }
        };
        let lists = packet(&desc, pkt::DATA_USING_GPA_DIRECT)
            .gpa_direct()
            .unwrap();
        assert_eq!(lists.len(), 1);
        assert_eq!(lists[0].len(), 8192);
        assert_eq!(lists[0].pfns(), &[10, 3, 11]);
        assert!(packet(&desc, pkt::DATA_INBAND).gpa_direct().is_err());
        // One page number short.
        assert!(
            packet(&desc[..desc.len() - 8], pkt::DATA_USING_GPA_DIRECT)
                .gpa_direct()
                .is_err()
        );
        // A range count the descriptor cannot hold.
        let mut many = desc.clone();
        many[4..8].copy_from_slice(&1000u32.to_le_bytes());
        assert!(
            packet(&many, pkt::DATA_USING_GPA_DIRECT)
                .gpa_direct()
                .is_err()
        );
        many[4..8].copy_from_slice(&2u32.to_le_bytes());
        assert!(
            packet(&many, pkt::DATA_USING_GPA_DIRECT)
                .gpa_direct()
                .is_err()
        );
    }

    #[test]
    fn ring_split() {
        let p: Vec<u64> = (0..20).collect();
        let (a, b) = split_rings(&p, 10).unwrap();
        assert_eq!((a.len(), b.len()), (10, 10));
        assert!(split_rings(&p, 19).is_none());
        assert!(split_rings(&p, 0).is_none());
    }
}
