//! HostService.

use std::pin::Pin;
use std::sync::Arc;

use proto::v1::host_service_server::HostService;
use proto::v1::{
    Event, GetHostInfoRequest, HostInfo, Snapshot, StatsUpdate, VmState, WatchEventsRequest,
    WatchStatsRequest, event,
};
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::Agent;
use crate::store::now_ms;

#[derive(Debug)]
pub struct HostSvc {
    agent: Arc<Agent>,
}

impl HostSvc {
    pub fn new(agent: Arc<Agent>) -> Self {
        HostSvc { agent }
    }
}

/// Everything a watcher needs to start from.
pub fn snapshot(agent: &Agent) -> Event {
    Event {
        seq: agent.events.next_seq().saturating_sub(1),
        time_ms: now_ms(),
        kind: Some(event::Kind::Snapshot(Snapshot {
            vms: agent.vms.list(),
            disks: crate::service::disk::list_with_users(agent),
            tasks: agent.tasks.list(),
        })),
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<Event, Status>> + Send>>;
type StatsStream = Pin<Box<dyn Stream<Item = Result<StatsUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl HostService for HostSvc {
    async fn get_host_info(
        &self,
        _: Request<GetHostInfoRequest>,
    ) -> Result<Response<HostInfo>, Status> {
        let h = &self.agent.host;
        let vms = self.agent.vms.list();
        Ok(Response::new(HostInfo {
            hostname: h.hostname.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            api_version: proto::API_VERSION.into(),
            logical_cpus: h.logical_cpus,
            memory_bytes: h.memory_bytes,
            memory_available_bytes: h.memory_available(),
            kvm: Some(h.kvm.clone()),
            boot_images: h.boot_images(),
            vm_count: vms.len() as u32,
            running_vm_count: vms
                .iter()
                .filter(|v| v.state != VmState::Off as i32 && v.state != VmState::Crashed as i32)
                .count() as u32,
            os: std::env::consts::OS.into(),
        }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        _: Request<WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        // Subscribe before the snapshot: an event in between is sent twice, never lost.
        let mut rx = self.agent.events.subscribe();
        let first = snapshot(&self.agent);
        let agent = self.agent.clone();
        let (tx, out) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                let ev = match rx.recv().await {
                    Ok(ev) => ev,
                    Err(RecvError::Lagged(_)) => snapshot(&agent),
                    Err(RecvError::Closed) => break,
                };
                if tx.send(Ok(ev)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    type WatchStatsStream = StatsStream;

    async fn watch_stats(
        &self,
        req: Request<WatchStatsRequest>,
    ) -> Result<Response<StatsStream>, Status> {
        let source = req.into_inner().vm_id;
        if !source.is_empty() {
            self.agent.vms.get(&source)?;
        }
        let (history, mut rx) = self.agent.stats.watch(&source);
        let (tx, out) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let first = StatsUpdate {
                samples: history,
                history: true,
            };
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    r = rx.recv() => match r {
                        Ok((s, sample)) if s == source => {
                            let u = StatsUpdate { samples: vec![sample], history: false };
                            if tx.send(Ok(u)).await.is_err() {
                                break;
                            }
                        }
                        Ok(_) | Err(RecvError::Lagged(_)) => {}
                        Err(RecvError::Closed) => break,
                    },
                    _ = tx.closed() => break,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }
}
