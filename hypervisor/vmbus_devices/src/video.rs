//! Synthetic video (synthvid, `hyperv_drm`): VRAM in the VMBus MMIO window, mode changes
//! (SITUATION_UPDATE) and dirty rectangles (DIRT) published to the worker's display
//! subscribers (VMBUS-ON-KVM.md §4; Linux `drivers/gpu/drm/hyperv/`).
//!
//! Framing: pipe header {type 1, size} + synthvid header {type, size} + payload.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::{i32_at, lock, u32_at, u64_at};
use vmbus_core::Guid;
use vmbus_core::ring::Packet;
use vmbus_core::{Channel, OfferParams, Vsp, VspError};

/// Interface class da0a7802-e377-4aac-8e77-0558eb1073f8.
pub const CLASS: Guid = Guid::new(
    0xda0a_7802,
    0xe377,
    0x4aac,
    [0x8e, 0x77, 0x05, 0x58, 0xeb, 0x10, 0x73, 0xf8],
);
/// Instance 5620e0c7-8062-4dce-aeb7-520c7ef76171.
pub const INSTANCE: Guid = Guid::new(
    0x5620_e0c7,
    0x8062,
    0x4dce,
    [0xae, 0xb7, 0x52, 0x0c, 0x7e, 0xf7, 0x61, 0x71],
);

const PIPE_DATA: u32 = 1;
const VERSION_REQUEST: u32 = 1;
const VERSION_RESPONSE: u32 = 2;
const VRAM_LOCATION: u32 = 3;
const VRAM_LOCATION_ACK: u32 = 4;
const SITUATION_UPDATE: u32 = 5;
const SITUATION_UPDATE_ACK: u32 = 6;
const POINTER_POSITION: u32 = 7;
const POINTER_SHAPE: u32 = 8;
const FEATURE_CHANGE: u32 = 9;
const DIRT: u32 = 10;
const BIOS_INFO_REQUEST: u32 = 11;
const BIOS_INFO_RESPONSE: u32 = 12;
const RESOLUTION_REQUEST: u32 = 13;
const RESOLUTION_RESPONSE: u32 = 14;

/// Dirty rectangles kept for subscribers that fall behind (older ones become full-screen).
pub const DIRTY_HISTORY: usize = 1024;

/// Modes offered (the first is the default); each fits 16 MiB of VRAM at 32 bpp.
pub const RESOLUTIONS: &[(u16, u16)] = &[
    (1024, 768),
    (640, 480),
    (800, 600),
    (1152, 864),
    (1280, 720),
    (1280, 800),
    (1280, 1024),
    (1366, 768),
    (1440, 900),
    (1600, 900),
    (1600, 1200),
    (1680, 1050),
    (1920, 1080),
    (1920, 1200),
    (2560, 1440),
    (2560, 1600),
];

/// A rectangle in pixels (x, y, width, height).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
}

/// The guest's scanout: XRGB8888 at the start of VRAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    pub width: u32,
    pub height: u32,
    /// Bytes per row.
    pub stride: u32,
}

/// Registers guest VRAM at the address the guest chose.
pub trait VramMapper: Send + Sync {
    /// Back `[gpa, gpa + size)` with the VRAM; false when the range is not acceptable.
    fn map(&self, gpa: u64) -> bool;
}

/// What a display subscriber gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisplayUpdate {
    /// The mode when it changed since the subscriber's last update (or on the first one).
    pub mode: Option<Mode>,
    /// Damage since the last update, clipped to the mode.
    pub dirty: Vec<Rect>,
    /// Cursor to pass to the next wait.
    pub cursor: DisplayCursor,
}

/// A subscriber's position in the update stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DisplayCursor {
    mode_generation: u64,
    seq: u64,
}

#[derive(Default)]
struct State {
    mapper: Option<Arc<dyn VramMapper>>,
    vram_size: u64,
    vram_gpa: Option<u64>,
    mode: Option<Mode>,
    mode_generation: u64,
    seq: u64,
    history: VecDeque<(u64, Rect)>,
}

/// Video state shared by the VSP (guest side) and the worker (host side).
#[derive(Default)]
pub struct VideoShared {
    state: Mutex<State>,
    changed: Condvar,
}

impl std::fmt::Debug for VideoShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VideoShared").finish_non_exhaustive()
    }
}

impl VideoShared {
    /// Shared state for `vram_size` bytes of VRAM.
    pub fn new(vram_size: u64) -> Arc<Self> {
        let s = Self::default();
        lock(&s.state).vram_size = vram_size;
        Arc::new(s)
    }

    /// Attach the VRAM mapper of the current boot (reset builds a new VM); forgets the old
    /// boot's mode.
    pub fn attach(&self, mapper: Arc<dyn VramMapper>) {
        let mut s = lock(&self.state);
        s.mapper = Some(mapper);
        s.vram_gpa = None;
        if s.mode.take().is_some() {
            s.mode_generation += 1;
        }
        drop(s);
        self.changed.notify_all();
    }

    /// The current mode, if the guest driver has set one.
    pub fn mode(&self) -> Option<Mode> {
        lock(&self.state).mode
    }

    /// Where the guest put VRAM.
    pub fn vram_gpa(&self) -> Option<u64> {
        lock(&self.state).vram_gpa
    }

    fn set_mode(&self, m: Option<Mode>) {
        let mut s = lock(&self.state);
        if s.mode != m {
            s.mode = m;
            s.mode_generation += 1;
            s.history.clear();
            tracing::info!(mode = ?m, "synthetic video mode");
        }
        drop(s);
        self.changed.notify_all();
    }

    fn damage(&self, rects: &[Rect]) {
        let mut s = lock(&self.state);
        for r in rects {
            s.seq += 1;
            let seq = s.seq;
            if s.history.len() >= DIRTY_HISTORY {
                s.history.pop_front();
            }
            s.history.push_back((seq, *r));
        }
        drop(s);
        self.changed.notify_all();
    }

    /// Wait up to `timeout` for anything newer than `cursor`.
    pub fn wait(&self, cursor: DisplayCursor, timeout: Duration) -> Option<DisplayUpdate> {
        let deadline = std::time::Instant::now() + timeout;
        let mut s = lock(&self.state);
        loop {
            let mode_changed = cursor.mode_generation != s.mode_generation;
            let newer = s.seq > cursor.seq;
            if mode_changed || (newer && s.mode.is_some()) {
                let full = s.mode.map(|m| Rect {
                    x: 0,
                    y: 0,
                    width: m.width,
                    height: m.height,
                });
                let oldest = s.history.front().map_or(s.seq + 1, |(q, _)| *q);
                let dirty = if mode_changed || cursor.seq + 1 < oldest {
                    full.into_iter().collect()
                } else {
                    s.history
                        .iter()
                        .filter(|(q, _)| *q > cursor.seq)
                        .map(|(_, r)| *r)
                        .collect()
                };
                return Some(DisplayUpdate {
                    mode: if mode_changed { s.mode } else { None },
                    dirty,
                    cursor: DisplayCursor {
                        mode_generation: s.mode_generation,
                        seq: s.seq,
                    },
                });
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return None;
            }
            s = self
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// A guest synthvid message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestMessage {
    Version(u32),
    VramLocation { user_ctx: u64, gpa: Option<u64> },
    Situation { user_ctx: u64, mode: Option<Mode> },
    Pointer,
    Dirt(Vec<Rect>),
    BiosInfo,
    ResolutionRequest(u8),
}

/// Parse a guest message (hostile input). `vram_size` bounds the mode.
pub fn parse(payload: &[u8], vram_size: u64) -> Result<GuestMessage, VspError> {
    let bad = |m: &str| VspError::Protocol(format!("synthvid: {m}"));
    if u32_at(payload, 0) != Some(PIPE_DATA) {
        return Err(bad("not a pipe data message"));
    }
    let ty = u32_at(payload, 8).ok_or_else(|| bad("short header"))?;
    let p = payload.get(16..).unwrap_or_default();
    let short = || bad(&format!("message {ty} too short"));
    Ok(match ty {
        VERSION_REQUEST => GuestMessage::Version(u32_at(p, 0).ok_or_else(short)?),
        VRAM_LOCATION => {
            let user_ctx = u64_at(p, 0).ok_or_else(short)?;
            let specified = *p.get(8).ok_or_else(short)? != 0;
            let gpa = u64_at(p, 9).ok_or_else(short)?;
            GuestMessage::VramLocation {
                user_ctx,
                gpa: specified.then_some(gpa),
            }
        }
        SITUATION_UPDATE => {
            let user_ctx = u64_at(p, 0).ok_or_else(short)?;
            let count = *p.get(8).ok_or_else(short)?;
            let mode = if count == 0 {
                None
            } else {
                // Only output 0 exists.
                let o = p.get(9..27).ok_or_else(short)?;
                let active = o[0] != 0;
                let vram_offset = u32_at(o, 1).unwrap_or(u32::MAX);
                let depth = o[5];
                let width = u32_at(o, 6).unwrap_or(0);
                let height = u32_at(o, 10).unwrap_or(0);
                let stride = u32_at(o, 14).unwrap_or(0);
                if !active {
                    None
                } else {
                    let fits = u64::from(stride) * u64::from(height) <= vram_size;
                    if vram_offset != 0
                        || depth != 32
                        || width == 0
                        || height == 0
                        || width > 16384
                        || u64::from(stride) < u64::from(width) * 4
                        || !stride.is_multiple_of(4)
                        || !fits
                    {
                        return Err(bad("unsupported situation"));
                    }
                    Some(Mode {
                        width,
                        height,
                        stride,
                    })
                }
            };
            GuestMessage::Situation { user_ctx, mode }
        }
        POINTER_POSITION | POINTER_SHAPE => GuestMessage::Pointer,
        DIRT => {
            let count = usize::from(*p.get(1).ok_or_else(short)?);
            let mut rects = Vec::with_capacity(count);
            for i in 0..count {
                let o = 2 + 16 * i;
                let (Some(x1), Some(y1), Some(x2), Some(y2)) = (
                    i32_at(p, o),
                    i32_at(p, o + 4),
                    i32_at(p, o + 8),
                    i32_at(p, o + 12),
                ) else {
                    return Err(short());
                };
                let (x1, y1) = (x1.max(0) as u32, y1.max(0) as u32);
                let (x2, y2) = (x2.max(0) as u32, y2.max(0) as u32);
                if x2 > x1 && y2 > y1 {
                    rects.push(Rect {
                        x: x1,
                        y: y1,
                        width: x2 - x1,
                        height: y2 - y1,
                    });
                }
            }
            GuestMessage::Dirt(rects)
        }
        BIOS_INFO_REQUEST => GuestMessage::BiosInfo,
        RESOLUTION_REQUEST => GuestMessage::ResolutionRequest(*p.first().ok_or_else(short)?),
        t => return Err(bad(&format!("unknown message type {t}"))),
    })
}

fn framed(ty: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + payload.len());
    m.extend_from_slice(&PIPE_DATA.to_le_bytes());
    m.extend_from_slice(&(8 + payload.len() as u32).to_le_bytes());
    m.extend_from_slice(&ty.to_le_bytes());
    m.extend_from_slice(&(8 + payload.len() as u32).to_le_bytes());
    m.extend_from_slice(payload);
    m
}

/// RESOLUTION_RESPONSE for a guest that takes at most `max` modes.
pub fn resolution_response(max: u8) -> Vec<u8> {
    let n = RESOLUTIONS.len().min(usize::from(max)).max(1);
    let mut p = vec![0u8; 128];
    p.push(n as u8);
    p.push(0); // default: the first
    p.push(0); // is_standard
    for &(w, h) in &RESOLUTIONS[..n] {
        p.extend_from_slice(&w.to_le_bytes());
        p.extend_from_slice(&h.to_le_bytes());
    }
    framed(RESOLUTION_RESPONSE, &p)
}

/// Clip `r` to `m`.
pub fn clip(r: Rect, m: Mode) -> Option<Rect> {
    let x2 = (r.x.saturating_add(r.width)).min(m.width);
    let y2 = (r.y.saturating_add(r.height)).min(m.height);
    (x2 > r.x && y2 > r.y).then(|| Rect {
        x: r.x,
        y: r.y,
        width: x2 - r.x,
        height: y2 - r.y,
    })
}

/// Linux blits the new mode's first frame into VRAM after SITUATION_UPDATE and sends no DIRT
/// for it: the whole screen is reported dirty again this long after a mode change.
pub const MODE_SETTLE: Duration = Duration::from_millis(250);

/// The synthvid VSP.
pub struct Video {
    shared: Arc<VideoShared>,
    vram_mib: u16,
    /// When the last mode change happened, until its settle-time full damage went out.
    mode_set_at: Option<std::time::Instant>,
}

impl std::fmt::Debug for Video {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Video")
            .field("vram_mib", &self.vram_mib)
            .finish()
    }
}

impl Video {
    /// A video device publishing through `shared`.
    pub fn new(shared: Arc<VideoShared>) -> Self {
        let size = lock(&shared.state).vram_size;
        Self {
            shared,
            vram_mib: (size >> 20).min(u64::from(u16::MAX)) as u16,
            mode_set_at: None,
        }
    }
}

impl Vsp for Video {
    fn name(&self) -> &'static str {
        "video"
    }

    fn offer(&self) -> OfferParams {
        OfferParams {
            class: CLASS,
            instance: INSTANCE,
            flags: 0x10,
            mmio_megabytes: self.vram_mib,
            pipe_mode: 4,
        }
    }

    fn packet(&mut self, pkt: &Packet, tx: &mut dyn Channel) -> Result<(), VspError> {
        let vram_size = u64::from(self.vram_mib) << 20;
        match parse(pkt.payload(), vram_size)? {
            GuestMessage::Version(v) => {
                let ok = v & 0xffff == 3;
                let mut p = [0u8; 6];
                p[0..4].copy_from_slice(&v.to_le_bytes());
                p[4] = u8::from(ok);
                p[5] = 1;
                tx.send(&framed(VERSION_RESPONSE, &p))?;
                if ok {
                    // Ask for dirty rectangles; no pointer or situation reports.
                    tx.send(&framed(FEATURE_CHANGE, &[1, 0, 0, 0]))?;
                }
            }
            GuestMessage::ResolutionRequest(max) => tx.send(&resolution_response(max))?,
            GuestMessage::VramLocation { user_ctx, gpa } => {
                if let Some(gpa) = gpa {
                    let mapper = lock(&self.shared.state).mapper.clone();
                    let ok = mapper.is_some_and(|m| m.map(gpa));
                    if !ok {
                        return Err(VspError::Protocol(format!(
                            "synthvid: VRAM at {gpa:#x} is neither the VRAM nor inside the VMBus window"
                        )));
                    }
                    lock(&self.shared.state).vram_gpa = Some(gpa);
                }
                tx.send(&framed(VRAM_LOCATION_ACK, &user_ctx.to_le_bytes()))?;
            }
            GuestMessage::Situation { user_ctx, mode } => {
                self.shared.set_mode(mode);
                self.mode_set_at = mode.map(|_| std::time::Instant::now());
                tx.send(&framed(SITUATION_UPDATE_ACK, &user_ctx.to_le_bytes()))?;
            }
            GuestMessage::Dirt(rects) => {
                if let Some(m) = self.shared.mode() {
                    let rects: Vec<Rect> = rects.into_iter().filter_map(|r| clip(r, m)).collect();
                    self.shared.damage(&rects);
                }
            }
            GuestMessage::Pointer => {}
            GuestMessage::BiosInfo => tx.send(&framed(BIOS_INFO_RESPONSE, &[0u8; 16]))?,
        }
        Ok(())
    }

    fn poll_host(&mut self, _tx: &mut dyn Channel) -> Result<(), VspError> {
        if let Some(at) = self.mode_set_at
            && at.elapsed() >= MODE_SETTLE
        {
            self.mode_set_at = None;
            if let Some(m) = self.shared.mode() {
                self.shared.damage(&[Rect {
                    x: 0,
                    y: 0,
                    width: m.width,
                    height: m.height,
                }]);
            }
        }
        Ok(())
    }

    fn closed(&mut self) {
        self.shared.set_mode(None);
        self.mode_set_at = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmbus_core::fake::FakeGuest;

    /// Accepts VRAM anywhere in a 256 MiB window at 4 GiB - 256 MiB.
    struct Window;
    impl VramMapper for Window {
        fn map(&self, gpa: u64) -> bool {
            (0xf000_0000..0x1_0000_0000).contains(&gpa)
        }
    }

    fn ty(p: &Packet) -> u32 {
        u32_at(p.payload(), 8).unwrap()
    }

    #[test]
    fn a_driver_session_through_the_channel_publishes_mode_and_damage() {
        let shared = VideoShared::new(16 << 20);
        shared.attach(Arc::new(Window));
        let mut v = Video::new(shared.clone());
        let mut g = FakeGuest::new();
        g.open(&mut v).unwrap();
        // Version 3.5 (what hyperv_drm asks first) is accepted, then dirt is asked for.
        g.send_inband(1, &msg(VERSION_REQUEST, &0x0005_0003u32.to_le_bytes()))
            .unwrap();
        g.run(&mut v).unwrap();
        let r = g.recv_all().unwrap();
        assert_eq!(
            r.iter().map(ty).collect::<Vec<_>>(),
            vec![VERSION_RESPONSE, FEATURE_CHANGE]
        );
        assert_eq!(r[0].payload()[20], 1);
        // A version it does not speak is refused without the feature change.
        g.send_inband(2, &msg(VERSION_REQUEST, &0x0005_0004u32.to_le_bytes()))
            .unwrap();
        g.run(&mut v).unwrap();
        let r = g.recv_all().unwrap();
        assert_eq!((r.len(), r[0].payload()[20]), (1, 0));

        // VRAM where the guest carved it: acknowledged with its context.
        let mut loc = vec![0u8; 17];
        loc[0..8].copy_from_slice(&0x77u64.to_le_bytes());
        loc[8] = 1;
        loc[9..17].copy_from_slice(&0xf800_0000u64.to_le_bytes());
        g.send_inband(3, &msg(VRAM_LOCATION, &loc)).unwrap();
        g.run(&mut v).unwrap();
        let r = g.recv_all().unwrap();
        assert_eq!(ty(&r[0]), VRAM_LOCATION_ACK);
        assert_eq!(u64_at(r[0].payload(), 16), Some(0x77));
        assert_eq!(shared.vram_gpa(), Some(0xf800_0000));

        // The mode, then damage a subscriber sees clipped to it.
        let mut s = vec![0u8; 27];
        s[8] = 1;
        s[9] = 1;
        s[14] = 32;
        s[15..19].copy_from_slice(&800u32.to_le_bytes());
        s[19..23].copy_from_slice(&600u32.to_le_bytes());
        s[23..27].copy_from_slice(&3200u32.to_le_bytes());
        g.send_inband(4, &msg(SITUATION_UPDATE, &s)).unwrap();
        g.run(&mut v).unwrap();
        assert_eq!(ty(&g.recv().unwrap().unwrap()), SITUATION_UPDATE_ACK);
        let first = shared
            .wait(DisplayCursor::default(), Duration::from_secs(1))
            .unwrap();
        assert_eq!(
            first.mode,
            Some(Mode {
                width: 800,
                height: 600,
                stride: 3200
            })
        );
        let mut d = vec![0u8, 1];
        for x in [700i32, 500, 900, 650] {
            d.extend_from_slice(&x.to_le_bytes());
        }
        g.send_inband(5, &msg(DIRT, &d)).unwrap();
        g.run(&mut v).unwrap();
        let next = shared.wait(first.cursor, Duration::from_secs(1)).unwrap();
        assert_eq!(
            next.dirty,
            vec![Rect {
                x: 700,
                y: 500,
                width: 100,
                height: 100
            }]
        );
        // VRAM outside the window closes the channel; closing drops the mode.
        loc[9..17].copy_from_slice(&0x1000u64.to_le_bytes());
        g.send_inband(6, &msg(VRAM_LOCATION, &loc)).unwrap();
        assert!(g.run(&mut v).is_err());
        v.closed();
        assert_eq!(shared.mode(), None);
    }

    fn msg(ty: u32, p: &[u8]) -> Vec<u8> {
        framed(ty, p)
    }

    #[test]
    fn parses_vram_location_situation_and_dirt() {
        let mut v = vec![0u8; 17];
        v[0..8].copy_from_slice(&0xf800_0000u64.to_le_bytes());
        v[8] = 1;
        v[9..17].copy_from_slice(&0xf800_0000u64.to_le_bytes());
        assert_eq!(
            parse(&msg(VRAM_LOCATION, &v), 16 << 20).unwrap(),
            GuestMessage::VramLocation {
                user_ctx: 0xf800_0000,
                gpa: Some(0xf800_0000)
            }
        );
        let mut s = vec![0u8; 27];
        s[8] = 1;
        s[9] = 1;
        s[14] = 32;
        s[15..19].copy_from_slice(&1280u32.to_le_bytes());
        s[19..23].copy_from_slice(&720u32.to_le_bytes());
        s[23..27].copy_from_slice(&5120u32.to_le_bytes());
        let GuestMessage::Situation { mode, .. } =
            parse(&msg(SITUATION_UPDATE, &s), 16 << 20).unwrap()
        else {
            panic!()
        };
        assert_eq!(
            mode,
            Some(Mode {
                width: 1280,
                height: 720,
                stride: 5120
            })
        );
        // Too big for VRAM.
        assert!(parse(&msg(SITUATION_UPDATE, &s), 1 << 20).is_err());
        let mut d = vec![0u8, 2];
        for r in [[10i32, 20, 110, 70], [5, 5, 5, 9]] {
            for x in r {
                d.extend_from_slice(&x.to_le_bytes());
            }
        }
        assert_eq!(
            parse(&msg(DIRT, &d), 16 << 20).unwrap(),
            GuestMessage::Dirt(vec![Rect {
                x: 10,
                y: 20,
                width: 100,
                height: 50
            }])
        );
        d[1] = 3;
        assert!(parse(&msg(DIRT, &d), 16 << 20).is_err());
        assert!(parse(&[1, 0, 0, 0], 16 << 20).is_err());
    }

    #[test]
    fn resolution_response_layout() {
        let r = resolution_response(64);
        let p = &r[16..];
        assert_eq!(usize::from(p[128]), RESOLUTIONS.len());
        assert_eq!(p[129], 0);
        assert_eq!(u16::from_le_bytes([p[131], p[132]]), 1024);
        assert!(r.len() <= 4096 - 16);
        assert_eq!(resolution_response(2)[16 + 128], 2);
        assert_eq!(resolution_response(0)[16 + 128], 1);
        for &(w, h) in RESOLUTIONS {
            assert!(u64::from(w) * u64::from(h) * 4 <= 16 << 20);
        }
    }

    #[test]
    fn subscribers_get_mode_then_rects_then_full_frame_when_behind() {
        let v = VideoShared::new(16 << 20);
        let c0 = DisplayCursor::default();
        assert!(v.wait(c0, Duration::from_millis(1)).is_none());
        let m = Mode {
            width: 100,
            height: 50,
            stride: 400,
        };
        v.set_mode(Some(m));
        let u = v.wait(c0, Duration::from_millis(1)).unwrap();
        assert_eq!(u.mode, Some(m));
        assert_eq!(u.dirty.len(), 1);
        let r = Rect {
            x: 1,
            y: 2,
            width: 3,
            height: 4,
        };
        v.damage(&[r]);
        let u2 = v.wait(u.cursor, Duration::from_millis(1)).unwrap();
        assert_eq!((u2.mode, u2.dirty.clone()), (None, vec![r]));
        for _ in 0..DIRTY_HISTORY + 5 {
            v.damage(&[r]);
        }
        let u3 = v.wait(u2.cursor, Duration::from_millis(1)).unwrap();
        assert_eq!(
            u3.dirty,
            vec![Rect {
                x: 0,
                y: 0,
                width: 100,
                height: 50
            }]
        );
        assert!(v.wait(u3.cursor, Duration::from_millis(1)).is_none());
        assert_eq!(
            clip(
                Rect {
                    x: 90,
                    y: 40,
                    width: 50,
                    height: 50
                },
                m
            ),
            Some(Rect {
                x: 90,
                y: 40,
                width: 10,
                height: 10
            })
        );
        assert_eq!(
            clip(
                Rect {
                    x: 100,
                    y: 0,
                    width: 5,
                    height: 5
                },
                m
            ),
            None
        );
    }
}
