//! The serial console through the control socket: input fed into COM1 on a thread of its own,
//! output fanned out to every session that subscribed without ever blocking the vCPU that
//! writes it.

use super::*;

/// Largest serial-output chunk in one event.
pub const SERIAL_CHUNK: usize = 64 << 10;
/// A subscriber whose unsent serial output grows past this is disconnected.
pub const SERIAL_BACKLOG: usize = 1 << 20;
/// How long the sender waits after the first byte so that the UART's byte-at-a-time output
/// goes out in batches.
pub(super) const SERIAL_BATCH_DELAY: Duration = Duration::from_millis(2);
/// Serial-input requests a session may have queued for a guest that is not reading.
pub(super) const SERIAL_INPUT_QUEUE: usize = 16;

impl Session {
    pub(super) fn serial_input(&mut self, bytes: Vec<u8>) -> Result<(), Fail> {
        if bytes.is_empty() {
            return Ok(());
        }
        if self.input.is_none() {
            self.input = Some(InputFeeder::start(self.vm.serial.clone())?);
        }
        let Some(feeder) = &self.input else {
            return Err(Fail::new(ErrorCode::Internal, "no serial input"));
        };
        match feeder.tx.try_send(bytes) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(Fail::new(
                ErrorCode::NotReady,
                "serial input is backed up: the guest is not reading COM1",
            )),
            Err(TrySendError::Disconnected(_)) => {
                Err(Fail::new(ErrorCode::Internal, "serial input has stopped"))
            }
        }
    }

    pub(super) fn subscribe(&mut self) {
        if self.subscriber.is_some() {
            return;
        }
        let sub = Arc::new(Subscriber {
            backlog: Mutex::new(Backlog::default()),
            ready: Condvar::new(),
            conn: self.conn.clone(),
        });
        let sender = sub.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("serial-out".into())
            .spawn(move || sender.run())
        {
            tracing::warn!(error = %e, "cannot start a serial sender");
            return;
        }
        lock(&self.vm.hub.0.subscribers).push(sub.clone());
        self.subscriber = Some(sub);
    }
}

/// Feeds one session's serial input into COM1 on its own thread, so a guest that is not
/// reading never blocks the session.
pub(super) struct InputFeeder {
    pub(super) tx: SyncSender<Vec<u8>>,
    pub(super) stop: Arc<AtomicBool>,
}

impl InputFeeder {
    pub(super) fn start(serial: Arc<Mutex<SerialDevice>>) -> Result<Self, Fail> {
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(SERIAL_INPUT_QUEUE);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::Builder::new()
            .name("serial-in".into())
            .spawn(move || {
                for bytes in rx {
                    let mut pending = &bytes[..];
                    while !pending.is_empty() {
                        if stopped.load(Ordering::SeqCst) {
                            return;
                        }
                        let taken = lock(&serial).enqueue_input(pending);
                        pending = &pending[taken..];
                        if !pending.is_empty() {
                            std::thread::sleep(Duration::from_millis(2));
                        }
                    }
                }
            })
            .map_err(|e| internal("cannot start serial input", e))?;
        Ok(Self { tx, stop })
    }
}

/// Serial output fan-out to the sessions that subscribed; added to the COM1 output sinks.
/// Writing never blocks on a client: bytes go into each subscriber's backlog and its sender
/// thread ships them.
#[derive(Clone, Default)]
pub struct SerialHub(pub(super) Arc<HubInner>);

#[derive(Default)]
pub(super) struct HubInner {
    pub(super) subscribers: Mutex<Vec<Arc<Subscriber>>>,
}

impl Write for SerialHub {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.0.subscribers).retain(|s| s.push(buf));
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Default)]
pub(super) struct Backlog {
    bytes: Vec<u8>,
    closed: bool,
}

pub(super) struct Subscriber {
    backlog: Mutex<Backlog>,
    ready: Condvar,
    conn: Arc<Conn>,
}

impl Subscriber {
    /// Queue output (on the vCPU thread). Returns false if the subscriber is gone.
    pub(super) fn push(&self, buf: &[u8]) -> bool {
        let mut b = lock(&self.backlog);
        if b.closed {
            return false;
        }
        if b.bytes.len() + buf.len() > SERIAL_BACKLOG {
            b.closed = true;
            drop(b);
            tracing::warn!("a serial subscriber fell more than 1 MiB behind; disconnecting it");
            self.ready.notify_all();
            // Unblocks the sender if it is stuck writing, and ends the session.
            self.conn.shutdown();
            return false;
        }
        let wake = b.bytes.is_empty();
        b.bytes.extend_from_slice(buf);
        drop(b);
        if wake {
            self.ready.notify_one();
        }
        true
    }

    pub(super) fn close(&self) {
        lock(&self.backlog).closed = true;
        self.ready.notify_all();
    }

    /// The sender thread: ship the backlog in chunks until closed.
    pub(super) fn run(&self) {
        loop {
            let waiting = {
                let mut b = lock(&self.backlog);
                while b.bytes.is_empty() && !b.closed {
                    b = self.ready.wait(b).unwrap_or_else(|e| e.into_inner());
                }
                if b.closed {
                    return;
                }
                b.bytes.len()
            };
            if waiting < SERIAL_CHUNK {
                std::thread::sleep(SERIAL_BATCH_DELAY);
            }
            let chunk = {
                let mut b = lock(&self.backlog);
                if b.closed {
                    return;
                }
                if b.bytes.len() <= SERIAL_CHUNK {
                    std::mem::take(&mut b.bytes)
                } else {
                    b.bytes.drain(..SERIAL_CHUNK).collect()
                }
            };
            let ev = Event {
                kind: Some(event::Kind::SerialOutput(chunk.into())),
            };
            if self.conn.send(&ev, None).is_err() {
                self.close();
                self.conn.shutdown();
                return;
            }
        }
    }
}
