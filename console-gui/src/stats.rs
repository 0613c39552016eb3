//! Resource use of a host or a VM as the agent streams it (`HostService.WatchStats`): the
//! history first, then a sample every 2 s, kept in a [`Series`] the UI reads. A [`StatsFeed`]
//! follows one source while it lives; the stream is reopened when it breaks (the host went
//! offline and came back) and every message wakes the UI, so an idle console with no feed
//! open draws nothing.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::v1::{StatsSample, WatchStatsRequest};
use tokio::task::JoinHandle;
use tonic::Code;

use crate::conn::{Slot, UiWaker, plain_status, wait_clients};

/// Most samples kept: the agent's hour at 2 s and its day at one a minute.
pub const KEEP: usize = 1800 + 1440;

/// The samples of one source, oldest first.
#[derive(Debug, Default)]
pub struct Series {
    pub samples: VecDeque<StatsSample>,
    /// When the newest sample arrived here (the time axis ends there, so the agent's clock
    /// and this computer's need not agree).
    pub received: Option<Instant>,
    /// Why there are no new samples, in plain words.
    pub error: Option<String>,
    /// Messages received (tests).
    pub updates: u64,
}

impl Series {
    /// The newest sample.
    pub fn last(&self) -> Option<&StatsSample> {
        self.samples.back()
    }

    fn replace(&mut self, history: Vec<StatsSample>) {
        self.samples = history.into_iter().collect();
        self.trim();
    }

    fn push(&mut self, s: Vec<StatsSample>) {
        self.samples.extend(s);
        self.trim();
    }

    fn trim(&mut self) {
        while self.samples.len() > KEEP {
            self.samples.pop_front();
        }
        self.received = Some(Instant::now());
        self.updates += 1;
        self.error = None;
    }
}

/// An open feed; dropping it stops the stream.
pub struct StatsFeed {
    pub series: Arc<Mutex<Series>>,
    task: JoinHandle<()>,
}

impl Drop for StatsFeed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Follow `vm_id`'s samples (empty: the host's).
pub(crate) fn spawn(
    rt: &tokio::runtime::Runtime,
    slot: Slot,
    vm_id: String,
    n: UiWaker,
) -> StatsFeed {
    let series = Arc::new(Mutex::new(Series::default()));
    let task = rt.spawn(follow(slot, vm_id, series.clone(), n));
    StatsFeed { series, task }
}

fn lock(s: &Mutex<Series>) -> std::sync::MutexGuard<'_, Series> {
    s.lock().unwrap_or_else(|e| e.into_inner())
}

async fn follow(slot: Slot, vm_id: String, series: Arc<Mutex<Series>>, n: UiWaker) {
    loop {
        let mut c = wait_clients(&slot).await;
        let req = WatchStatsRequest {
            vm_id: vm_id.clone(),
        };
        match c.host.watch_stats(req).await {
            Ok(s) => {
                let mut s = s.into_inner();
                loop {
                    match s.message().await {
                        Ok(Some(u)) => {
                            let mut sh = lock(&series);
                            if u.history {
                                sh.replace(u.samples);
                            } else {
                                sh.push(u.samples);
                            }
                            drop(sh);
                            n.wake();
                        }
                        Ok(None) => break,
                        Err(st) => {
                            lock(&series).error =
                                Some(plain_status("resource use stopped", &st).line);
                            n.wake();
                            break;
                        }
                    }
                }
            }
            Err(st) if st.code() == Code::NotFound => {
                lock(&series).error = Some("the VM is gone from the host".into());
                n.wake();
                return;
            }
            Err(st) => {
                lock(&series).error = Some(plain_status("no resource use", &st).line);
                n.wake();
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
