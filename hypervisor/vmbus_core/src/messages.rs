//! VMBus channel-management messages (the payload of HvPostMessage / SynIC slot 2): parsing
//! what the guest sends (hostile input: every length and field is checked, nothing panics,
//! allocations are bounded by the 240-byte message) and encoding what the host sends.
//!
//! Layouts: `include/linux/hyperv.h` (Linux 6.1), checked sizes in VMBUS-ON-KVM.md §2.2.

/// Largest channel message.
pub const MAX_MESSAGE: usize = 240;

/// Message types.
pub mod msgtype {
    pub const OFFERCHANNEL: u32 = 1;
    pub const RESCIND_CHANNELOFFER: u32 = 2;
    pub const REQUESTOFFERS: u32 = 3;
    pub const ALLOFFERS_DELIVERED: u32 = 4;
    pub const OPENCHANNEL: u32 = 5;
    pub const OPENCHANNEL_RESULT: u32 = 6;
    pub const CLOSECHANNEL: u32 = 7;
    pub const GPADL_HEADER: u32 = 8;
    pub const GPADL_BODY: u32 = 9;
    pub const GPADL_CREATED: u32 = 10;
    pub const GPADL_TEARDOWN: u32 = 11;
    pub const GPADL_TORNDOWN: u32 = 12;
    pub const RELID_RELEASED: u32 = 13;
    pub const INITIATE_CONTACT: u32 = 14;
    pub const VERSION_RESPONSE: u32 = 15;
    pub const UNLOAD: u32 = 16;
    pub const UNLOAD_RESPONSE: u32 = 17;
    pub const MODIFYCHANNEL: u32 = 22;
    pub const MODIFYCHANNEL_RESPONSE: u32 = 24;
}

/// Protocol versions (major << 16 | minor).
pub mod version {
    pub const WIN8: u32 = 0x0002_0004;
    pub const WIN8_1: u32 = 0x0003_0000;
    pub const WIN10: u32 = 0x0004_0000;
    pub const WIN10_RS3: u32 = 0x0004_0001;
    pub const WIN10_V5: u32 = 0x0005_0000;
    pub const WIN10_V5_1: u32 = 0x0005_0001;
    pub const WIN10_V5_2: u32 = 0x0005_0002;
    pub const WIN10_V5_3: u32 = 0x0005_0003;
}

/// Connection id for INITIATE_CONTACT below 5.0 and every message afterwards.
pub const MESSAGE_CONNECTION_ID: u32 = 1;
/// Connection id for INITIATE_CONTACT at 5.0 and later.
pub const MESSAGE_CONNECTION_ID_4: u32 = 4;

/// Why a guest message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Shorter than its type requires.
    #[error("message type {msgtype} is {len} bytes, needs {need}")]
    Short {
        msgtype: u32,
        len: usize,
        need: usize,
    },
    /// Not a type the guest may send.
    #[error("unknown or host-only message type {0}")]
    UnknownType(u32),
    /// Longer than a SynIC message can be.
    #[error("message of {0} bytes exceeds 240")]
    TooLong(usize),
    /// A GPADL header with inconsistent sizes.
    #[error("bad GPADL header: {0}")]
    BadGpadl(&'static str),
}

/// An INITIATE_CONTACT request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitiateContact {
    pub version: u32,
    pub target_vcpu: u32,
    /// Byte 16: the SINT for messages (≥ 5.0); below 5.0 bytes 16..24 are the interrupt page.
    pub interrupt_page_or_sint: u64,
    pub monitor_page1: u64,
    pub monitor_page2: u64,
}

/// An OPENCHANNEL request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenChannel {
    pub relid: u32,
    pub openid: u32,
    pub gpadl: u32,
    pub target_vp: u32,
    /// Offset of the host→guest ring in pages.
    pub downstream_page_offset: u32,
    pub user_data: [u8; 120],
}

/// The first part of a GPADL (the header message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpadlHeader {
    pub relid: u32,
    pub gpadl: u32,
    /// Total bytes of the range list (all messages).
    pub range_buflen: u16,
    pub rangecount: u16,
    /// Range-list bytes carried by this message.
    pub data: Vec<u8>,
}

/// A GPADL continuation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpadlBody {
    pub msgnumber: u32,
    pub gpadl: u32,
    /// Range-list bytes carried by this message (whole PFNs).
    pub data: Vec<u8>,
}

/// What the guest can send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestMessage {
    InitiateContact(InitiateContact),
    RequestOffers,
    OpenChannel(OpenChannel),
    CloseChannel { relid: u32 },
    GpadlHeader(GpadlHeader),
    GpadlBody(GpadlBody),
    GpadlTeardown { relid: u32, gpadl: u32 },
    RelidReleased { relid: u32 },
    Unload,
    ModifyChannel { relid: u32, target_vp: u32 },
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

/// Parse one guest message.
pub fn parse(b: &[u8]) -> Result<GuestMessage, ParseError> {
    use msgtype::*;
    if b.len() > MAX_MESSAGE {
        return Err(ParseError::TooLong(b.len()));
    }
    if b.len() < 8 {
        return Err(ParseError::Short {
            msgtype: 0,
            len: b.len(),
            need: 8,
        });
    }
    let t = u32_at(b, 0);
    let need = match t {
        REQUESTOFFERS | UNLOAD => 8,
        CLOSECHANNEL | RELID_RELEASED => 12,
        GPADL_TEARDOWN | MODIFYCHANNEL | GPADL_BODY => 16,
        GPADL_HEADER => 20,
        INITIATE_CONTACT => 40,
        OPENCHANNEL => 148,
        _ => return Err(ParseError::UnknownType(t)),
    };
    if b.len() < need {
        return Err(ParseError::Short {
            msgtype: t,
            len: b.len(),
            need,
        });
    }
    Ok(match t {
        REQUESTOFFERS => GuestMessage::RequestOffers,
        UNLOAD => GuestMessage::Unload,
        CLOSECHANNEL => GuestMessage::CloseChannel {
            relid: u32_at(b, 8),
        },
        RELID_RELEASED => GuestMessage::RelidReleased {
            relid: u32_at(b, 8),
        },
        GPADL_TEARDOWN => GuestMessage::GpadlTeardown {
            relid: u32_at(b, 8),
            gpadl: u32_at(b, 12),
        },
        MODIFYCHANNEL => GuestMessage::ModifyChannel {
            relid: u32_at(b, 8),
            target_vp: u32_at(b, 12),
        },
        INITIATE_CONTACT => GuestMessage::InitiateContact(InitiateContact {
            version: u32_at(b, 8),
            target_vcpu: u32_at(b, 12),
            interrupt_page_or_sint: u64_at(b, 16),
            monitor_page1: u64_at(b, 24),
            monitor_page2: u64_at(b, 32),
        }),
        OPENCHANNEL => {
            let mut user_data = [0u8; 120];
            user_data.copy_from_slice(&b[28..148]);
            GuestMessage::OpenChannel(OpenChannel {
                relid: u32_at(b, 8),
                openid: u32_at(b, 12),
                gpadl: u32_at(b, 16),
                target_vp: u32_at(b, 20),
                downstream_page_offset: u32_at(b, 24),
                user_data,
            })
        }
        GPADL_HEADER => {
            let range_buflen = u16_at(b, 16);
            let rangecount = u16_at(b, 18);
            if rangecount == 0 {
                return Err(ParseError::BadGpadl("no ranges"));
            }
            if usize::from(range_buflen) < 16 * usize::from(rangecount) {
                return Err(ParseError::BadGpadl("range list shorter than its ranges"));
            }
            // Whole 8-byte units only: the list is ranges {u32, u32} and u64 PFNs.
            let avail = (b.len() - 20) / 8 * 8;
            let take = avail.min(usize::from(range_buflen));
            GuestMessage::GpadlHeader(GpadlHeader {
                relid: u32_at(b, 8),
                gpadl: u32_at(b, 12),
                range_buflen,
                rangecount,
                data: b[20..20 + take].to_vec(),
            })
        }
        GPADL_BODY => {
            let avail = (b.len() - 16) / 8 * 8;
            GuestMessage::GpadlBody(GpadlBody {
                msgnumber: u32_at(b, 8),
                gpadl: u32_at(b, 12),
                data: b[16..16 + avail].to_vec(),
            })
        }
        _ => unreachable!("filtered above"),
    })
}

/// One page range of a GPADL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpaRange {
    pub byte_count: u32,
    pub byte_offset: u32,
    pub pfns: Vec<u64>,
}

/// Decode a complete GPADL range list (`rangecount` ranges in `data`). Every range must
/// have exactly as many PFNs as its byte offset and count need.
pub fn parse_ranges(data: &[u8], rangecount: u16) -> Result<Vec<GpaRange>, ParseError> {
    let mut out = Vec::with_capacity(usize::from(rangecount).min(data.len() / 16));
    let mut o = 0usize;
    for _ in 0..rangecount {
        if data.len() < o + 8 {
            return Err(ParseError::BadGpadl("range header past the end"));
        }
        let byte_count = u32_at(data, o);
        let byte_offset = u32_at(data, o + 4);
        o += 8;
        if byte_count == 0 || byte_offset >= 4096 {
            return Err(ParseError::BadGpadl("empty range or offset past a page"));
        }
        let pages = (u64::from(byte_offset) + u64::from(byte_count)).div_ceil(4096) as usize;
        if (data.len() - o) / 8 < pages {
            return Err(ParseError::BadGpadl("fewer PFNs than the range covers"));
        }
        let pfns = (0..pages).map(|i| u64_at(data, o + 8 * i)).collect();
        o += 8 * pages;
        out.push(GpaRange {
            byte_count,
            byte_offset,
            pfns,
        });
    }
    if o != data.len() {
        return Err(ParseError::BadGpadl("trailing bytes after the ranges"));
    }
    Ok(out)
}

fn header(t: u32, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    v[0..4].copy_from_slice(&t.to_le_bytes());
    v
}

fn put32(v: &mut [u8], o: usize, x: u32) {
    v[o..o + 4].copy_from_slice(&x.to_le_bytes());
}

/// VERSION_RESPONSE.
pub fn version_response(supported: bool, msg_conn_id: u32) -> Vec<u8> {
    let mut v = header(msgtype::VERSION_RESPONSE, 16);
    v[8] = u8::from(supported);
    v[9] = 0; // connection_state: ok
    put32(&mut v, 12, msg_conn_id);
    v
}

/// A GUID in the on-the-wire (Windows) byte order from its textual form's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// From "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee" fields.
    pub const fn new(a: u32, b: u16, c: u16, d: [u8; 8]) -> Self {
        let a = a.to_le_bytes();
        let b = b.to_le_bytes();
        let c = c.to_le_bytes();
        Guid([
            a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5],
            d[6], d[7],
        ])
    }
}

/// What an OFFERCHANNEL says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub class: Guid,
    pub instance: Guid,
    pub flags: u16,
    pub mmio_megabytes: u16,
    /// Pipe mode in the user-defined area (0 = none).
    pub pipe_mode: u32,
    pub relid: u32,
    pub connection_id: u32,
}

/// OFFERCHANNEL (196 bytes).
pub fn offer(o: &Offer) -> Vec<u8> {
    let mut v = header(msgtype::OFFERCHANNEL, 196);
    v[8..24].copy_from_slice(&o.class.0);
    v[24..40].copy_from_slice(&o.instance.0);
    v[56..58].copy_from_slice(&o.flags.to_le_bytes());
    v[58..60].copy_from_slice(&o.mmio_megabytes.to_le_bytes());
    put32(&mut v, 60, o.pipe_mode);
    put32(&mut v, 184, o.relid);
    v[188] = 0; // monitor id: unused
    v[189] = 0; // monitor_allocated: never on KVM
    v[190..192].copy_from_slice(&1u16.to_le_bytes()); // dedicated interrupt
    put32(&mut v, 192, o.connection_id);
    v
}

/// A message with only the header.
pub fn bare(t: u32) -> Vec<u8> {
    header(t, 8)
}

/// OPENCHANNEL_RESULT.
pub fn open_result(relid: u32, openid: u32, status: u32) -> Vec<u8> {
    let mut v = header(msgtype::OPENCHANNEL_RESULT, 20);
    put32(&mut v, 8, relid);
    put32(&mut v, 12, openid);
    put32(&mut v, 16, status);
    v
}

/// GPADL_CREATED.
pub fn gpadl_created(relid: u32, gpadl: u32, status: u32) -> Vec<u8> {
    let mut v = header(msgtype::GPADL_CREATED, 20);
    put32(&mut v, 8, relid);
    put32(&mut v, 12, gpadl);
    put32(&mut v, 16, status);
    v
}

/// GPADL_TORNDOWN.
pub fn gpadl_torndown(gpadl: u32) -> Vec<u8> {
    let mut v = header(msgtype::GPADL_TORNDOWN, 12);
    put32(&mut v, 8, gpadl);
    v
}

/// RESCIND_CHANNELOFFER.
pub fn rescind(relid: u32) -> Vec<u8> {
    let mut v = header(msgtype::RESCIND_CHANNELOFFER, 12);
    put32(&mut v, 8, relid);
    v
}

/// MODIFYCHANNEL_RESPONSE.
pub fn modify_response(relid: u32, status: u32) -> Vec<u8> {
    let mut v = header(msgtype::MODIFYCHANNEL_RESPONSE, 16);
    put32(&mut v, 8, relid);
    put32(&mut v, 12, status);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(t: u32, len: usize) -> Vec<u8> {
        header(t, len)
    }

    #[test]
    fn initiate_contact_fields() {
        let mut m = msg(msgtype::INITIATE_CONTACT, 40);
        put32(&mut m, 8, version::WIN10_V5_3);
        put32(&mut m, 12, 0);
        m[16] = 2;
        m[24..32].copy_from_slice(&0x1234_5000u64.to_le_bytes());
        let GuestMessage::InitiateContact(c) = parse(&m).unwrap() else {
            panic!()
        };
        assert_eq!(c.version, 0x50003);
        assert_eq!(c.interrupt_page_or_sint & 0xff, 2);
        assert_eq!(c.monitor_page1, 0x1234_5000);
        assert!(matches!(
            parse(&m[..39]),
            Err(ParseError::Short { need: 40, .. })
        ));
    }

    #[test]
    fn rejects_host_types_and_junk() {
        assert_eq!(
            parse(&msg(msgtype::OFFERCHANNEL, 196)),
            Err(ParseError::UnknownType(1))
        );
        assert!(parse(&[1, 2, 3]).is_err());
        assert!(parse(&[0u8; 241]).is_err());
        assert_eq!(parse(&msg(msgtype::UNLOAD, 8)), Ok(GuestMessage::Unload));
    }

    #[test]
    fn gpadl_header_and_ranges() {
        // Linux: one range, offset 0, 3 pages.
        let mut m = msg(msgtype::GPADL_HEADER, 20 + 8 + 24);
        put32(&mut m, 8, 7);
        put32(&mut m, 12, 0xe1e10);
        m[16..18].copy_from_slice(&32u16.to_le_bytes());
        m[18..20].copy_from_slice(&1u16.to_le_bytes());
        put32(&mut m, 20, 3 * 4096);
        for (i, pfn) in [0x100u64, 0x205, 0x1ff].iter().enumerate() {
            m[28 + 8 * i..36 + 8 * i].copy_from_slice(&pfn.to_le_bytes());
        }
        let GuestMessage::GpadlHeader(h) = parse(&m).unwrap() else {
            panic!()
        };
        assert_eq!((h.relid, h.gpadl, h.data.len()), (7, 0xe1e10, 32));
        let r = parse_ranges(&h.data, h.rangecount).unwrap();
        assert_eq!(r[0].pfns, vec![0x100, 0x205, 0x1ff]);
        assert!(parse_ranges(&h.data[..24], 1).is_err());
        let mut extra = h.data.clone();
        extra.extend_from_slice(&[0; 8]);
        assert!(parse_ranges(&extra, 1).is_err());
        // A header claiming fewer bytes than its ranges need.
        m[16..18].copy_from_slice(&8u16.to_le_bytes());
        assert!(parse(&m).is_err());
    }

    #[test]
    fn encoders_have_linux_sizes() {
        let o = offer(&Offer {
            class: Guid::new(
                0xf912ad6d,
                0x2b17,
                0x48ea,
                [0xbd, 0x65, 0xf9, 0x27, 0xa6, 0x1c, 0x76, 0x84],
            ),
            instance: Guid([0; 16]),
            flags: 0,
            mmio_megabytes: 0,
            pipe_mode: 0,
            relid: 3,
            connection_id: 0x13,
        });
        assert_eq!(o.len(), 196);
        // modalias bytes vmbus:6dad12f9172bea48bd65f927a61c7684
        assert_eq!(&o[8..12], &[0x6d, 0xad, 0x12, 0xf9]);
        assert_eq!(&o[12..16], &[0x17, 0x2b, 0xea, 0x48]);
        assert_eq!(u32_at(&o, 184), 3);
        assert_eq!((o[189], u16_at(&o, 190)), (0, 1));
        assert_eq!(version_response(true, 1).len(), 16);
        assert_eq!(open_result(1, 1, 0).len(), 20);
        assert_eq!(gpadl_created(1, 2, 0).len(), 20);
    }
}
