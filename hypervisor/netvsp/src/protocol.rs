//! NVSP (the netvsc control protocol on the VMBus channel) and RNDIS (the messages inside
//! it): numbers and byte layouts as Linux's `drivers/net/hyperv/hyperv_net.h` and
//! `rndis_filter.c` use them. Everything is little-endian; NVSP messages are 40 bytes on the
//! wire whatever their type.

/// Bytes of every NVSP message (`sizeof(struct nvsp_message)`).
pub const NVSP_MESSAGE_SIZE: usize = 40;

/// NVSP versions, oldest first.
pub const NVSP_VERSIONS: [u32; 6] = [2, 0x30002, 0x40000, 0x50000, 0x60000, 0x60001];

/// NVSP message types.
pub mod msg {
    pub const INIT: u32 = 1;
    pub const INIT_COMPLETE: u32 = 2;
    pub const SEND_NDIS_VERSION: u32 = 100;
    pub const SEND_RECV_BUF: u32 = 101;
    pub const SEND_RECV_BUF_COMPLETE: u32 = 102;
    pub const REVOKE_RECV_BUF: u32 = 103;
    pub const SEND_SEND_BUF: u32 = 104;
    pub const SEND_SEND_BUF_COMPLETE: u32 = 105;
    pub const REVOKE_SEND_BUF: u32 = 106;
    pub const SEND_RNDIS_PKT: u32 = 107;
    pub const SEND_RNDIS_PKT_COMPLETE: u32 = 108;
    pub const SEND_NDIS_CONFIG: u32 = 125;
    pub const SWITCH_DATA_PATH: u32 = 129;
    pub const SUBCHANNEL: u32 = 133;
}

/// NVSP status codes.
pub mod status {
    pub const SUCCESS: u32 = 1;
    pub const FAIL: u32 = 2;
}

/// `send_buf_section_index` when the data travels in page buffers instead.
pub const NO_SECTION: u32 = 0xffff_ffff;

/// RNDIS message types.
pub mod rndis {
    pub const PACKET: u32 = 1;
    pub const INIT: u32 = 2;
    pub const HALT: u32 = 3;
    pub const QUERY: u32 = 4;
    pub const SET: u32 = 5;
    pub const RESET: u32 = 6;
    pub const INDICATE: u32 = 7;
    pub const KEEPALIVE: u32 = 8;
    pub const COMPLETION: u32 = 0x8000_0000;

    pub const STATUS_SUCCESS: u32 = 0;
    pub const STATUS_FAILURE: u32 = 0xc000_0001;
    pub const STATUS_INVALID_DATA: u32 = 0xc001_0015;
    pub const STATUS_NOT_SUPPORTED: u32 = 0xc000_00bb;
    pub const STATUS_MEDIA_CONNECT: u32 = 0x4001_000b;
    pub const STATUS_MEDIA_DISCONNECT: u32 = 0x4001_000c;

    /// Size of `struct rndis_packet` (after the 8-byte message header).
    pub const PACKET_HEADER: usize = 36;
}

/// The object identifiers the device answers.
pub mod oid {
    pub const GEN_MAXIMUM_FRAME_SIZE: u32 = 0x0001_0106;
    pub const GEN_LINK_SPEED: u32 = 0x0001_0107;
    pub const GEN_CURRENT_PACKET_FILTER: u32 = 0x0001_010e;
    pub const GEN_MAXIMUM_TOTAL_SIZE: u32 = 0x0001_0111;
    pub const GEN_MEDIA_CONNECT_STATUS: u32 = 0x0001_0114;
    pub const P802_3_PERMANENT_ADDRESS: u32 = 0x0101_0101;
    pub const P802_3_CURRENT_ADDRESS: u32 = 0x0101_0102;
    pub const P802_3_MULTICAST_LIST: u32 = 0x0101_0103;
    pub const TCP_OFFLOAD_PARAMETERS: u32 = 0xfc01_020c;
    pub const TCP_OFFLOAD_HARDWARE_CAPABILITIES: u32 = 0xfc01_020d;
    pub const OFFLOAD_ENCAPSULATION: u32 = 0x0101_010a;
}

/// `NDIS_OBJECT_TYPE_OFFLOAD`.
pub const NDIS_OBJECT_TYPE_OFFLOAD: u8 = 0xa7;
/// `sizeof(struct ndis_offload)` up to NDIS 6.0, 6.1, and in full (6.30).
pub const NDIS_OFFLOAD_SIZE_6_0: usize = 112;
pub const NDIS_OFFLOAD_SIZE_6_1: usize = 144;
pub const NDIS_OFFLOAD_SIZE: usize = 156;

/// A little-endian u32 at `at`, if `b` holds it.
pub fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// A little-endian u16 at `at`, if `b` holds it.
pub fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}

/// An NVSP message of type `kind` with `words` after the type, padded to the wire size.
pub fn nvsp(kind: u32, words: &[u32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(NVSP_MESSAGE_SIZE);
    m.extend_from_slice(&kind.to_le_bytes());
    for w in words {
        m.extend_from_slice(&w.to_le_bytes());
    }
    m.resize(m.len().max(NVSP_MESSAGE_SIZE), 0);
    m
}

/// An RNDIS message: type, total length, then `body`.
pub fn rndis_message(kind: u32, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(8 + body.len());
    m.extend_from_slice(&kind.to_le_bytes());
    m.extend_from_slice(&((8 + body.len()) as u32).to_le_bytes());
    m.extend_from_slice(body);
    m
}

/// Little-endian words as bytes.
pub fn words(w: &[u32]) -> Vec<u8> {
    w.iter().flat_map(|x| x.to_le_bytes()).collect()
}
