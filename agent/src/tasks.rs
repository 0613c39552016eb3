//! Long-running operations: progress, cancellation, results.
//!
//! A task runs on a blocking thread (disk work is synchronous); its handle reports
//! progress, which goes to `WatchTask` streams at once and to the event bus at most five
//! times a second.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::v1::{Task, TaskState};
use tokio::sync::watch;

use crate::error::{AgentError, AgentResult};
use crate::events::EventBus;
use crate::store::{new_id, now_ms};

/// How many finished tasks are remembered.
const KEEP_FINISHED: usize = 200;

struct Entry {
    tx: watch::Sender<Task>,
    cancel: Arc<AtomicBool>,
}

/// Every task of this agent run.
pub struct Tasks {
    entries: Mutex<HashMap<String, Entry>>,
    events: Arc<EventBus>,
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasks").finish_non_exhaustive()
    }
}

impl Tasks {
    pub fn new(events: Arc<EventBus>) -> Self {
        Tasks {
            entries: Mutex::new(HashMap::new()),
            events,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register a new running task.
    pub fn start(self: &Arc<Self>, description: String, unit: &str, total: u64) -> TaskHandle {
        let task = Task {
            id: new_id(),
            description,
            state: TaskState::Running as i32,
            done: 0,
            total,
            unit: unit.into(),
            created_ms: now_ms(),
            ..Default::default()
        };
        let cancel = Arc::new(AtomicBool::new(false));
        let (tx, _) = watch::channel(task.clone());
        {
            let mut map = self.lock();
            self.prune(&mut map);
            map.insert(
                task.id.clone(),
                Entry {
                    tx: tx.clone(),
                    cancel: cancel.clone(),
                },
            );
        }
        self.events.task_changed(task.clone());
        TaskHandle {
            id: task.id,
            tx,
            cancel,
            tasks: self.clone(),
            last_event: Mutex::new(Instant::now()),
        }
    }

    fn prune(&self, map: &mut HashMap<String, Entry>) {
        let finished: Vec<(i64, String)> = map
            .iter()
            .filter(|(_, e)| e.tx.borrow().state != TaskState::Running as i32)
            .map(|(id, e)| (e.tx.borrow().finished_ms, id.clone()))
            .collect();
        if finished.len() > KEEP_FINISHED {
            let mut finished = finished;
            finished.sort();
            for (_, id) in finished.iter().take(finished.len() - KEEP_FINISHED) {
                map.remove(id);
            }
        }
    }

    pub fn get(&self, id: &str) -> AgentResult<Task> {
        self.lock()
            .get(id)
            .map(|e| e.tx.borrow().clone())
            .ok_or_else(|| AgentError::not_found("task", id))
    }

    pub fn list(&self) -> Vec<Task> {
        let mut v: Vec<Task> = self
            .lock()
            .values()
            .map(|e| e.tx.borrow().clone())
            .collect();
        v.sort_by_key(|t| t.created_ms);
        v
    }

    pub fn watch(&self, id: &str) -> AgentResult<watch::Receiver<Task>> {
        self.lock()
            .get(id)
            .map(|e| e.tx.subscribe())
            .ok_or_else(|| AgentError::not_found("task", id))
    }

    /// Ask a task to stop. Its work notices at the next progress step.
    pub fn cancel(&self, id: &str) -> AgentResult<Task> {
        let map = self.lock();
        let e = map
            .get(id)
            .ok_or_else(|| AgentError::not_found("task", id))?;
        let t = e.tx.borrow().clone();
        if t.state != TaskState::Running as i32 {
            return Err(AgentError::precondition(format!(
                "task '{id}' has already ended"
            )));
        }
        e.cancel.store(true, Ordering::SeqCst);
        Ok(t)
    }
}

/// The running side of one task.
pub struct TaskHandle {
    id: String,
    tx: watch::Sender<Task>,
    cancel: Arc<AtomicBool>,
    tasks: Arc<Tasks>,
    last_event: Mutex<Instant>,
}

impl std::fmt::Debug for TaskHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskHandle").field("id", &self.id).finish()
    }
}

impl TaskHandle {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn task(&self) -> Task {
        self.tx.borrow().clone()
    }

    /// The flag the disk library's long operations poll.
    pub fn cancel_flag(&self) -> &AtomicBool {
        &self.cancel
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// Report progress.
    pub fn progress(&self, done: u64, total: u64) {
        self.tx.send_modify(|t| {
            t.done = done;
            t.total = total;
        });
        let mut last = self.last_event.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() >= Duration::from_millis(200) {
            *last = Instant::now();
            self.tasks.events.task_changed(self.task());
        }
    }

    pub fn set_disk(&self, disk_id: &str) {
        self.tx.send_modify(|t| t.disk_id = disk_id.to_string());
    }

    /// End the task with `result`. Cancellation shows as CANCELLED, other errors as FAILED
    /// with the client-safe message.
    pub fn finish(self, result: &AgentResult<()>) {
        let cancelled = self.is_cancelled();
        self.tx.send_modify(|t| {
            t.finished_ms = now_ms();
            match result {
                Ok(()) => {
                    t.state = TaskState::Succeeded as i32;
                    if t.total > 0 {
                        t.done = t.total;
                    }
                }
                Err(AgentError::Cancelled) => t.state = TaskState::Cancelled as i32,
                Err(_) if cancelled => t.state = TaskState::Cancelled as i32,
                Err(e) => {
                    t.state = TaskState::Failed as i32;
                    t.error = e.client_message();
                }
            }
        });
        self.tasks.events.task_changed(self.task());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_runs_reports_and_ends() {
        let tasks = Arc::new(Tasks::new(Arc::new(EventBus::default())));
        let h = tasks.start("convert".into(), "bytes", 100);
        let id = h.id().to_string();
        let mut rx = tasks.watch(&id).unwrap();
        h.progress(40, 100);
        assert_eq!(rx.borrow_and_update().done, 40);
        h.finish(&Ok(()));
        let t = tasks.get(&id).unwrap();
        assert_eq!(t.state, TaskState::Succeeded as i32);
        assert_eq!(t.done, 100);
        assert!(
            tasks.cancel(&id).is_err(),
            "an ended task can't be cancelled"
        );
    }

    #[test]
    fn cancel_sets_the_flag_and_the_state() {
        let tasks = Arc::new(Tasks::new(Arc::new(EventBus::default())));
        let h = tasks.start("resize".into(), "bytes", 0);
        tasks.cancel(h.id()).unwrap();
        assert!(h.cancel_flag().load(Ordering::SeqCst));
        let id = h.id().to_string();
        h.finish(&Err(AgentError::internal("x", anyhow::anyhow!("stopped"))));
        assert_eq!(tasks.get(&id).unwrap().state, TaskState::Cancelled as i32);
        assert!(matches!(
            tasks.get("nope"),
            Err(AgentError::NotFound { .. })
        ));
    }

    #[test]
    fn failures_carry_only_the_client_safe_message() {
        let tasks = Arc::new(Tasks::new(Arc::new(EventBus::default())));
        let h = tasks.start("upload".into(), "bytes", 0);
        let id = h.id().to_string();
        h.finish(&Err(AgentError::internal(
            "open /secret/path",
            anyhow::anyhow!("EIO"),
        )));
        let t = tasks.get(&id).unwrap();
        assert_eq!(t.state, TaskState::Failed as i32);
        assert!(!t.error.contains("/secret"), "{}", t.error);
    }
}
