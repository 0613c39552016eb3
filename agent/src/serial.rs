//! A VM's serial console fan-out: scrollback plus live output to every client.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Mutex;

use bytes::Bytes;
use tokio::sync::broadcast;

/// How much output a new client sees first.
pub const SCROLLBACK: usize = 256 << 10;

/// Serial output of one VM.
#[derive(Debug)]
pub struct SerialHub {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    ring: VecDeque<u8>,
    tx: broadcast::Sender<Bytes>,
}

impl Default for SerialHub {
    fn default() -> Self {
        SerialHub {
            inner: Mutex::new(Inner {
                ring: VecDeque::with_capacity(SCROLLBACK),
                tx: broadcast::channel(1024).0,
            }),
        }
    }
}

impl SerialHub {
    /// A hub whose scrollback starts with the end of the VM's serial log.
    pub fn from_log(log: &Path) -> Self {
        let hub = SerialHub::default();
        if let Ok(bytes) = read_tail(log, SCROLLBACK) {
            hub.lock().ring.extend(bytes);
        }
        hub
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// New output from the worker.
    pub fn push(&self, data: Bytes) {
        let mut g = self.lock();
        let over = (g.ring.len() + data.len()).saturating_sub(SCROLLBACK);
        let drop = over.min(g.ring.len());
        g.ring.drain(..drop);
        let skip = data.len().saturating_sub(SCROLLBACK);
        g.ring.extend(&data[skip..]);
        let _ = g.tx.send(data);
    }

    /// The scrollback and a receiver for everything after it, taken together so nothing
    /// falls between them.
    pub fn subscribe(&self) -> (Vec<u8>, broadcast::Receiver<Bytes>) {
        let g = self.lock();
        (g.ring.iter().copied().collect(), g.tx.subscribe())
    }
}

fn read_tail(path: &Path, max: usize) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max as u64)))?;
    let mut v = Vec::new();
    f.read_to_end(&mut v)?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn scrollback_then_live_with_nothing_lost_between() {
        let hub = SerialHub::default();
        hub.push(Bytes::from_static(b"boot "));
        let (back, mut rx) = hub.subscribe();
        hub.push(Bytes::from_static(b"login:"));
        assert_eq!(back, b"boot ");
        assert_eq!(&rx.recv().await.unwrap()[..], b"login:");
    }

    #[test]
    fn scrollback_keeps_only_the_newest_bytes() {
        let hub = SerialHub::default();
        for i in 0..600u32 {
            hub.push(Bytes::from(vec![(i % 251) as u8; 1024]));
        }
        let (back, _) = hub.subscribe();
        assert_eq!(back.len(), SCROLLBACK);
        assert_eq!(*back.last().unwrap(), (599 % 251) as u8);
        hub.push(Bytes::from(vec![7u8; SCROLLBACK + 10]));
        let (back, _) = hub.subscribe();
        assert!(back.len() == SCROLLBACK && back.iter().all(|&b| b == 7));
    }

    #[test]
    fn the_log_tail_seeds_the_scrollback() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("serial.log");
        std::fs::write(&p, b"earlier boot\n").unwrap();
        let (back, _) = SerialHub::from_log(&p).subscribe();
        assert_eq!(back, b"earlier boot\n");
    }
}
