//! Display updates for a session that subscribed: the synthetic video device's geometry and
//! dirty rectangles, and the boot framebuffer's written rows from KVM's dirty page log. Both
//! follow the reply to `subscribe_display` (a [`Gate`] holds them back until it is out).

use super::*;

/// Holds threads back until opened.
#[derive(Default)]
pub(super) struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
}

impl Gate {
    pub(super) fn open(&self) {
        *lock(&self.open) = true;
        self.opened.notify_all();
    }

    pub(super) fn wait(&self) {
        let mut open = lock(&self.open);
        while !*open {
            open = self.opened.wait(open).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Session {
    /// Start sending this session display updates; the status says which kinds.
    pub(super) fn subscribe_display(&mut self) -> Result<Status, Fail> {
        let video = self.vm.synth.video.clone();
        if video.is_none() && self.vm.boot_dirty.is_none() {
            return Err(Fail::unsupported(
                "this VM has no synthetic video device and no logged boot framebuffer",
            ));
        }
        if self.display.is_none() {
            let stop = Arc::new(AtomicBool::new(false));
            // Set first: a thread that fails to start below must not leave the other one
            // running unstoppably (the gate opens after any reply).
            self.display = Some(stop.clone());
            let gate = self.display_gate.get_or_insert_with(Arc::default).clone();
            if let Some(video) = video {
                let (conn, flag, gate) = (self.conn.clone(), stop.clone(), gate.clone());
                let offset = self.vm.framebuffer.as_ref().map_or(0, |f| f.offset);
                std::thread::Builder::new()
                    .name("display-out".into())
                    .spawn(move || {
                        gate.wait();
                        display_sender(&video, &conn, &flag, offset)
                    })
                    .map_err(|e| internal("cannot start the display sender", e))?;
            }
            self.watch_boot_framebuffer(true)?;
        }
        self.query()
    }

    /// Start or stop sending this (display) session the boot framebuffer's written rows.
    /// The first update follows the reply.
    pub(super) fn watch_boot_framebuffer(&mut self, on: bool) -> Result<(), Fail> {
        if self.display.is_none() {
            return Err(Fail::bad(
                "watch_boot_framebuffer needs subscribe_display first",
            ));
        }
        if !on {
            if let Some(stop) = self.boot_rows.take() {
                stop.store(true, Ordering::SeqCst);
            }
            return Ok(());
        }
        let Some(rows) = &self.vm.boot_dirty else {
            return Ok(());
        };
        if self.boot_rows.is_some() {
            return Ok(());
        }
        let reader = rows
            .subscribe()
            .map_err(|e| internal("cannot start the dirty page log reader", e))?;
        let width = rows.format().width;
        let conn = self.conn.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let gate = self.display_gate.get_or_insert_with(Arc::default).clone();
        std::thread::Builder::new()
            .name("boot-dirty-out".into())
            .spawn(move || {
                gate.wait();
                boot_dirty_sender(&reader, width, &conn, &flag)
            })
            .map_err(|e| internal("cannot start the boot framebuffer sender", e))?;
        self.boot_rows = Some(stop);
        Ok(())
    }
}

/// Send display updates to one session until it closes. The first update always carries
/// the current state (geometry, or inactive).
fn display_sender(video: &VideoShared, conn: &Conn, stop: &AtomicBool, vram_offset: u64) {
    let mut cursor = DisplayCursor::default();
    let mut first = true;
    while !stop.load(Ordering::SeqCst) {
        let update = match video.wait(cursor, Duration::from_millis(500)) {
            Some(u) => u,
            None if first => vmbus_devices::video::DisplayUpdate {
                mode: None,
                dirty: Vec::new(),
                cursor,
            },
            None => continue,
        };
        first = false;
        cursor = update.cursor;
        let active = video.mode().is_some();
        let ev = Event {
            kind: Some(event::Kind::Display(proto::worker::DisplayUpdate {
                kind: Some(display_update::Kind::SyntheticVideo(SyntheticVideo {
                    active,
                    framebuffer: update.mode.map(|m| Framebuffer {
                        offset: vram_offset,
                        width: m.width,
                        height: m.height,
                        stride: m.stride,
                        bytes_per_pixel: 4,
                    }),
                    dirty: update
                        .dirty
                        .iter()
                        .map(|r| proto::worker::Rect {
                            x: r.x,
                            y: r.y,
                            width: r.width,
                            height: r.height,
                        })
                        .collect(),
                })),
            })),
        };
        if conn.send(&ev, None).is_err() {
            return;
        }
    }
}

/// Send one session the boot framebuffer's written rows until stopped (the reader, and
/// with the last one the log's polling, ends with it). Rows written while a send is
/// blocked are merged into the next update.
fn boot_dirty_sender(reader: &DirtyReader, width: u32, conn: &Conn, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        let rows = reader.wait(Duration::from_millis(50));
        if rows.is_empty() || stop.load(Ordering::SeqCst) {
            continue;
        }
        let ev = Event {
            kind: Some(event::Kind::Display(proto::worker_msg::boot_rows(
                rows.iter().map(|r| (r.y, r.height)),
                width,
            ))),
        };
        if conn.send(&ev, None).is_err() {
            return;
        }
    }
}
