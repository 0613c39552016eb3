//! The network side of one VM console: the framebuffer stream (decoded off the UI thread
//! into texture patches), keyboard and pointer input, and the serial console.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use egui::{Color32, ColorImage};
use proto::v1::{
    FrameUpdate, FramebufferRequest, InputEvent, KeyEvent, PointerEvent, SerialInput, TileEncoding,
    input_event,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::conn::{Slot, UiWaker, plain_status, wait_clients};

/// Most serial output kept for the serial tab.
const SERIAL_KEEP: usize = 1 << 20;

/// A changed rectangle of the screen.
#[derive(Debug, Clone)]
pub struct Patch {
    pub pos: [usize; 2],
    pub image: ColorImage,
}

/// What the console tasks hand to the UI.
#[derive(Debug, Default)]
pub struct ConsoleShared {
    /// Screen size in pixels (0x0 until the first frame).
    pub size: [usize; 2],
    /// The size changed (or the first frame arrived): the UI makes a new texture.
    pub resized: bool,
    /// Patches not yet applied to the texture, oldest first.
    pub patches: Vec<Patch>,
    /// Pixels in `patches`.
    pending_px: usize,
    /// Whether the VM has a screen right now.
    pub active: bool,
    /// Frame updates received.
    pub updates: u64,
    /// Why the screen is not shown, in plain words.
    pub screen_error: Option<String>,
    /// Why keyboard and mouse do not reach the VM, in plain words.
    pub input_error: Option<String>,
    /// Input events the agent accepted so far.
    pub input_sent: u64,
    /// Input events handed to the open input stream so far.
    pub input_forwarded: u64,
    /// Serial output (the last `SERIAL_KEEP` bytes).
    pub serial: Vec<u8>,
    pub serial_error: Option<String>,
    /// A one-off message for the user ("typed 12 characters").
    pub note: Option<String>,
}

impl ConsoleShared {
    /// Take the patches for the texture: `(new size, patches)`.
    pub fn take(&mut self) -> (Option<[usize; 2]>, Vec<Patch>) {
        let resized = std::mem::take(&mut self.resized).then_some(self.size);
        self.pending_px = 0;
        (resized, std::mem::take(&mut self.patches))
    }
}

/// An open console: dropping it stops its streams.
pub struct ConsoleHandle {
    pub shared: Arc<Mutex<ConsoleShared>>,
    pub input: mpsc::UnboundedSender<InputEvent>,
    pub serial: mpsc::UnboundedSender<Vec<u8>>,
    pub vm_id: String,
    tasks: Vec<JoinHandle<()>>,
}

impl ConsoleHandle {
    /// Send keys: `(scan code, pressed)` in order.
    pub fn keys(&self, keys: &[(u32, bool)]) {
        for &(code, pressed) in keys {
            let _ = self.input.send(key_event(code, pressed));
        }
    }

    /// Send an absolute pointer position (0..=32767 on both axes) and buttons.
    pub fn pointer(&self, x: u32, y: u32, buttons: u32, wheel: i32) {
        let _ = self.input.send(InputEvent {
            vm_id: String::new(),
            kind: Some(input_event::Kind::Pointer(PointerEvent {
                x,
                y,
                buttons,
                wheel,
            })),
        });
    }

    /// Bytes to the serial port.
    pub fn serial_send(&self, data: Vec<u8>) {
        let _ = self.serial.send(data);
    }
}

impl Drop for ConsoleHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A key event (the VM id is filled in by the input task).
pub fn key_event(scancode: u32, pressed: bool) -> InputEvent {
    InputEvent {
        vm_id: String::new(),
        kind: Some(input_event::Kind::Key(KeyEvent { scancode, pressed })),
    }
}

pub(crate) fn spawn(
    rt: &tokio::runtime::Runtime,
    slot: Slot,
    vm_id: String,
    shared: Arc<Mutex<ConsoleShared>>,
    n: UiWaker,
) -> ConsoleHandle {
    let (input_tx, input_rx) = mpsc::unbounded_channel();
    let (serial_tx, serial_rx) = mpsc::unbounded_channel();
    let tasks = vec![
        rt.spawn(screen_task(
            slot.clone(),
            vm_id.clone(),
            shared.clone(),
            n.clone(),
        )),
        rt.spawn(input_task(
            slot.clone(),
            vm_id.clone(),
            input_rx,
            shared.clone(),
            n.clone(),
        )),
        rt.spawn(serial_task(
            slot,
            vm_id.clone(),
            serial_rx,
            shared.clone(),
            n,
        )),
    ];
    ConsoleHandle {
        shared,
        input: input_tx,
        serial: serial_tx,
        vm_id,
        tasks,
    }
}

fn lock(s: &Mutex<ConsoleShared>) -> std::sync::MutexGuard<'_, ConsoleShared> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// Follow the VM's screen; reopen the stream when it ends (the VM stopped and may start
/// again) or breaks.
async fn screen_task(slot: Slot, vm_id: String, shared: Arc<Mutex<ConsoleShared>>, n: UiWaker) {
    let mut decoder = Decoder::default();
    loop {
        let mut c = wait_clients(&slot).await;
        let req = FramebufferRequest {
            vm_id: vm_id.clone(),
            encoding: TileEncoding::Lz4 as i32,
        };
        match c.console.stream_framebuffer(req).await {
            Ok(s) => {
                lock(&shared).screen_error = None;
                let mut s = s.into_inner();
                loop {
                    match s.message().await {
                        Ok(Some(u)) => {
                            let r = decoder.apply(&u, &shared);
                            // A capture sent in parts is shown once it is complete, not
                            // half new.
                            let show = r.is_err() || !u.more;
                            let mut sh = lock(&shared);
                            sh.screen_error = r.err();
                            drop(sh);
                            if show {
                                n.wake();
                            }
                        }
                        Ok(None) => {
                            let mut sh = lock(&shared);
                            sh.active = false;
                            sh.screen_error = Some("the VM has no screen (it is off)".into());
                            break;
                        }
                        Err(st) => {
                            lock(&shared).screen_error =
                                Some(plain_status("the screen stream broke", &st).line);
                            break;
                        }
                    }
                }
            }
            Err(st) => {
                lock(&shared).screen_error = Some(plain_status("cannot show the screen", &st).line);
            }
        }
        n.wake();
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Turns frame updates into texture patches, keeping its own copy of the screen so a UI
/// that falls behind gets one whole-screen patch instead of a growing queue.
#[derive(Default)]
pub struct Decoder {
    size: [usize; 2],
    fb: Vec<Color32>,
    /// The decoded tiles of one tile row, reused.
    band: Vec<Vec<u8>>,
    /// Patches of a capture whose last part has not come yet (`more`), and their pixels.
    held: Vec<Patch>,
    held_px: usize,
    /// The screen size changed since patches last went to the UI.
    resize_pending: bool,
}

impl Decoder {
    /// The whole screen copy as one patch.
    fn whole_patch(&self) -> Patch {
        Patch {
            pos: [0, 0],
            image: ColorImage::new(self.size, self.fb.clone()),
        }
    }

    /// Apply one update; the patches go to `shared`.
    pub fn apply(&mut self, u: &FrameUpdate, shared: &Mutex<ConsoleShared>) -> Result<(), String> {
        let (w, h) = (u.width as usize, u.height as usize);
        if !u.active || w == 0 || h == 0 {
            lock(shared).active = false;
            return Ok(());
        }
        if [w, h] != self.size {
            self.size = [w, h];
            self.fb = vec![Color32::BLACK; w * h];
            self.held.clear();
            self.held_px = 0;
            self.resize_pending = true;
        }
        let covered: usize = u
            .tiles
            .iter()
            .map(|t| t.width as usize * t.height as usize)
            .sum();
        // A whole-screen update goes straight into the screen copy and out as one patch.
        let whole = covered >= w * h;
        let mut patches = Vec::with_capacity(if whole { 1 } else { u.tiles.len() });
        let mut px = 0;
        // A tile row at a time, written into the screen copy a whole pixel row at a time.
        let fb = &mut self.fb;
        proto::tiles::decode_rows(&u.tiles, u.width, u.height, &mut self.band, |run, band| {
            let (ty, th) = (run[0].y as usize, run[0].height as usize);
            for row in 0..th {
                for (t, raw) in run.iter().zip(band) {
                    let (tx, tw) = (t.x as usize, t.width as usize);
                    let dst = (ty + row) * w + tx;
                    let src = &raw[row * tw * 4..(row + 1) * tw * 4];
                    for (d, p) in fb[dst..dst + tw].iter_mut().zip(src.chunks_exact(4)) {
                        *d = Color32::from_rgb(p[2], p[1], p[0]);
                    }
                }
            }
        })
        .map_err(|e| match e {
            proto::tiles::TileError::Outside { .. } => {
                format!("the host sent a damaged screen update: {e}")
            }
            e => format!("a screen tile is damaged: {e}"),
        })?;
        for t in &u.tiles {
            let (tx, ty, tw, th) = (
                t.x as usize,
                t.y as usize,
                t.width as usize,
                t.height as usize,
            );
            px += tw * th;
            if !whole {
                let mut pixels = Vec::with_capacity(tw * th);
                for row in 0..th {
                    let start = (ty + row) * w + tx;
                    pixels.extend_from_slice(&self.fb[start..start + tw]);
                }
                patches.push(Patch {
                    pos: [tx, ty],
                    image: ColorImage::new([tw, th], pixels),
                });
            }
        }
        if whole {
            patches.push(self.whole_patch());
        }
        // A capture sent in parts goes to the UI whole, when its last part is in: the
        // screen is never shown half new.
        if u.more || !self.held.is_empty() {
            self.held_px += px;
            if self.held_px > w * h {
                // Parts of more than a screen (or an agent that never ends a capture):
                // one whole-screen patch, never a growing list.
                self.held.clear();
                self.held.push(self.whole_patch());
                self.held_px = w * h;
            } else {
                self.held.extend(patches);
            }
            if u.more {
                return Ok(());
            }
            patches = std::mem::take(&mut self.held);
            px = std::mem::take(&mut self.held_px);
        }
        let resized = std::mem::take(&mut self.resize_pending);
        let mut sh = lock(shared);
        sh.active = true;
        sh.updates += 1;
        if resized {
            sh.size = [w, h];
            sh.resized = true;
            sh.patches.clear();
            sh.pending_px = 0;
        }
        if sh.pending_px + px > w * h {
            // The UI is behind: one patch with the whole screen replaces the queue.
            sh.patches.clear();
            sh.patches.push(self.whole_patch());
            sh.pending_px = w * h;
        } else {
            sh.patches.extend(patches);
            sh.pending_px += px;
        }
        Ok(())
    }
}

/// Forward keyboard and pointer events. When the agent refuses input (no input device
/// yet), say so, drop input for a while, then try again.
async fn input_task(
    slot: Slot,
    vm_id: String,
    mut rx: mpsc::UnboundedReceiver<InputEvent>,
    shared: Arc<Mutex<ConsoleShared>>,
    n: UiWaker,
) {
    let mut quiet_until: Option<Instant> = None;
    while let Some(first) = rx.recv().await {
        if quiet_until.is_some_and(|t| Instant::now() < t) {
            continue;
        }
        let mut c = wait_clients(&slot).await;
        let (tx, stream_rx) = mpsc::unbounded_channel::<InputEvent>();
        let with_id = |mut e: InputEvent| {
            e.vm_id = vm_id.clone();
            e
        };
        let forward = |e: InputEvent| {
            if tx.send(with_id(e)).is_ok() {
                lock(&shared).input_forwarded += 1;
            }
        };
        forward(first);
        let call = c
            .console
            .send_input(UnboundedReceiverStream::new(stream_rx));
        tokio::pin!(call);
        let ended = loop {
            tokio::select! {
                r = &mut call => break Some(r),
                e = rx.recv() => match e {
                    Some(e) => forward(e),
                    None => break None,
                },
            }
        };
        let r = match ended {
            Some(r) => r,
            None => {
                drop(tx);
                let _ = call.await;
                return;
            }
        };
        let mut sh = lock(&shared);
        match r {
            Ok(s) => {
                sh.input_sent += s.into_inner().events;
                sh.input_error = None;
            }
            Err(st) => {
                sh.input_error =
                    Some(plain_status("keyboard and mouse do not reach this VM", &st).line);
                quiet_until = Some(Instant::now() + Duration::from_secs(3));
            }
        }
        drop(sh);
        n.wake();
    }
}

/// The serial console: scrollback first, then live output; reconnects when it ends.
async fn serial_task(
    slot: Slot,
    vm_id: String,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    shared: Arc<Mutex<ConsoleShared>>,
    n: UiWaker,
) {
    loop {
        let mut c = wait_clients(&slot).await;
        let (tx, stream_rx) = mpsc::unbounded_channel::<SerialInput>();
        let _ = tx.send(SerialInput {
            vm_id: vm_id.clone(),
            data: Bytes::new(),
        });
        match c
            .console
            .serial_console(UnboundedReceiverStream::new(stream_rx))
            .await
        {
            Ok(s) => {
                let mut s = s.into_inner();
                let mut first = true;
                loop {
                    tokio::select! {
                        m = s.message() => match m {
                            Ok(Some(m)) => {
                                let mut sh = lock(&shared);
                                if first && m.scrollback {
                                    sh.serial.clear();
                                }
                                first = false;
                                sh.serial.extend_from_slice(&m.data);
                                let len = sh.serial.len();
                                if len > SERIAL_KEEP {
                                    sh.serial.drain(..len - SERIAL_KEEP);
                                }
                                sh.serial_error = None;
                                drop(sh);
                                n.wake();
                            }
                            Ok(None) => {
                                lock(&shared).serial_error = Some("the serial console closed (the VM is off?)".into());
                                break;
                            }
                            Err(st) => {
                                lock(&shared).serial_error = Some(plain_status("the serial console broke", &st).line);
                                break;
                            }
                        },
                        d = rx.recv() => match d {
                            Some(d) => { let _ = tx.send(SerialInput { vm_id: String::new(), data: Bytes::from(d) }); }
                            None => return,
                        },
                    }
                }
            }
            Err(st) => {
                lock(&shared).serial_error =
                    Some(plain_status("cannot open the serial console", &st).line);
            }
        }
        n.wake();
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Save an image as PNG.
pub fn save_png(path: &Path, image: &ColorImage) -> Result<(), String> {
    let [w, h] = image.size;
    let rgba: Vec<u8> = image.pixels.iter().flat_map(|c| c.to_array()).collect();
    let img = image::RgbaImage::from_raw(w as u32, h as u32, rgba)
        .ok_or_else(|| "the screen image has the wrong size".to_string())?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    img.save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::v1::Tile;

    fn tile(x: u32, y: u32, w: u32, h: u32, bgrx: [u8; 4]) -> Tile {
        let raw: Vec<u8> = std::iter::repeat_n(bgrx, (w * h) as usize)
            .flatten()
            .collect();
        Tile {
            x,
            y,
            width: w,
            height: h,
            encoding: TileEncoding::Lz4 as i32,
            data: proto::tiles::encode_lz4(&raw).into(),
        }
    }

    #[test]
    fn updates_become_patches_and_a_slow_ui_gets_one_frame() {
        let shared = Mutex::new(ConsoleShared::default());
        let mut d = Decoder::default();
        let full = FrameUpdate {
            width: 4,
            height: 2,
            active: true,
            full: true,
            tiles: vec![
                tile(0, 0, 2, 2, [0, 0, 255, 0]),
                tile(2, 0, 2, 2, [255, 0, 0, 0]),
            ],
            ..Default::default()
        };
        d.apply(&full, &shared).unwrap();
        // A whole-screen update arrives as one patch.
        let (resized, patches) = lock(&shared).take();
        assert_eq!(resized, Some([4, 2]));
        assert_eq!(patches.len(), 1);
        assert_eq!(patches[0].image.size, [4, 2]);
        assert_eq!(patches[0].image.pixels[0], Color32::from_rgb(255, 0, 0));
        assert_eq!(patches[0].image.pixels[2], Color32::from_rgb(0, 0, 255));
        // A partial one as its tiles.
        let part = FrameUpdate {
            full: false,
            tiles: vec![tile(2, 0, 2, 2, [0, 255, 0, 0])],
            ..full.clone()
        };
        d.apply(&part, &shared).unwrap();
        let (resized, patches) = lock(&shared).take();
        assert_eq!(resized, None);
        assert_eq!(patches.len(), 1);
        assert_eq!(patches[0].pos, [2, 0]);
        assert_eq!(patches[0].image.pixels[0], Color32::from_rgb(0, 255, 0));
        // Without a UI taking them, patches collapse into one whole screen.
        for _ in 0..3 {
            d.apply(&part, &shared).unwrap();
        }
        let (_, patches) = lock(&shared).take();
        assert_eq!(patches.len(), 1);
        assert_eq!(patches[0].image.size, [4, 2]);
        assert_eq!(patches[0].image.pixels[0], Color32::from_rgb(255, 0, 0));
        assert_eq!(patches[0].image.pixels[3], Color32::from_rgb(0, 255, 0));
        let mut bad = full.clone();
        bad.tiles[0].x = 3;
        assert!(d.apply(&bad, &shared).is_err());
    }

    #[test]
    fn a_capture_in_parts_reaches_the_ui_only_when_complete() {
        let shared = Mutex::new(ConsoleShared::default());
        let mut d = Decoder::default();
        let full = FrameUpdate {
            width: 8,
            height: 2,
            active: true,
            full: true,
            tiles: vec![tile(0, 0, 8, 2, [0, 0, 0, 0])],
            ..Default::default()
        };
        d.apply(&full, &shared).unwrap();
        let _ = lock(&shared).take();
        let part = |x: u32, more: bool| FrameUpdate {
            full: false,
            more,
            tiles: vec![tile(x, 0, 2, 2, [0, 0, 255, 0])],
            ..full.clone()
        };
        d.apply(&part(0, true), &shared).unwrap();
        d.apply(&part(2, true), &shared).unwrap();
        let (_, patches) = lock(&shared).take();
        assert!(patches.is_empty(), "half a capture reached the UI");
        d.apply(&part(4, false), &shared).unwrap();
        let (_, patches) = lock(&shared).take();
        let at: Vec<[usize; 2]> = patches.iter().map(|p| p.pos).collect();
        assert_eq!(at, vec![[0, 0], [2, 0], [4, 0]]);
        // An agent that never ends its capture costs at most one whole screen.
        for i in 0..20 {
            d.apply(&part((i % 4) * 2, true), &shared).unwrap();
        }
        assert!(
            d.held.len() <= 4 && d.held_px <= 16,
            "{} held",
            d.held.len()
        );
        // The closing part may carry no tiles.
        let end = FrameUpdate {
            tiles: Vec::new(),
            ..part(0, false)
        };
        d.apply(&end, &shared).unwrap();
        let (_, patches) = lock(&shared).take();
        assert!(!patches.is_empty());
        assert!(
            patches
                .iter()
                .all(|p| p.image.pixels[0] == Color32::from_rgb(255, 0, 0))
        );
    }
}
