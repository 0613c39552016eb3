//! The host's event bus: every change to a VM, disk or task, in order.

use std::sync::atomic::{AtomicU64, Ordering};

use proto::v1::{Disk, Event, Task, Vm, event};
use tokio::sync::broadcast;

use crate::store::now_ms;

/// Publishes events to every `WatchEvents` stream. A watcher that falls more than the
/// channel's capacity behind is told so (`Lagged`) and gets a fresh snapshot instead.
#[derive(Debug)]
pub struct EventBus {
    tx: broadcast::Sender<Event>,
    seq: AtomicU64,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus {
            tx: broadcast::channel(1024).0,
            seq: AtomicU64::new(0),
        }
    }
}

impl EventBus {
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    /// The sequence number the next event will carry.
    pub fn next_seq(&self) -> u64 {
        self.seq.load(Ordering::SeqCst) + 1
    }

    fn publish(&self, kind: event::Kind) {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        // No receivers is fine: nobody is watching.
        let _ = self.tx.send(Event {
            seq,
            time_ms: now_ms(),
            kind: Some(kind),
        });
    }

    pub fn vm_changed(&self, vm: Vm) {
        self.publish(event::Kind::VmChanged(vm));
    }
    pub fn vm_deleted(&self, id: String) {
        self.publish(event::Kind::VmDeleted(id));
    }
    pub fn disk_changed(&self, disk: Disk) {
        self.publish(event::Kind::DiskChanged(disk));
    }
    pub fn disk_deleted(&self, id: String) {
        self.publish(event::Kind::DiskDeleted(id));
    }
    pub fn task_changed(&self, task: Task) {
        self.publish(event::Kind::TaskChanged(task));
    }
}
