//! DiskService: the disk library, uploads and tasks.

use std::pin::Pin;
use std::sync::Arc;

use proto::v1::disk_service_server::DiskService;
use proto::v1::{
    BeginUploadRequest, ConvertDiskRequest, CreateDiskRequest, DeleteDiskResponse, Disk, DiskRef,
    FinishUploadRequest, ListDisksRequest, ListDisksResponse, ListTasksRequest, ListTasksResponse,
    ResizeDiskRequest, Task, TaskRef, TaskState, UploadChunk, UploadRef, UploadStatus,
};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::Agent;
use crate::error::{AgentError, AgentResult};

/// The disk service's handlers.
#[derive(Debug)]
pub struct DiskSvc {
    agent: Arc<Agent>,
}

impl DiskSvc {
    pub fn new(agent: Arc<Agent>) -> Self {
        DiskSvc { agent }
    }

    fn with_users(&self, d: Disk) -> Disk {
        with_users(&self.agent, d)
    }

    /// Refuse to change a disk a running VM is using.
    fn not_running(&self, disk_id: &str, what: &str) -> AgentResult<()> {
        if self.agent.vms.disk_busy(disk_id) {
            let name = self
                .agent
                .disks
                .name_of(disk_id)
                .unwrap_or_else(|_| disk_id.to_string());
            return Err(AgentError::precondition(format!(
                "disk '{name}' is in use by a running VM; stop it before {what} the disk"
            )));
        }
        Ok(())
    }
}

fn with_users(agent: &Agent, mut d: Disk) -> Disk {
    d.attached_to = agent.vms.users_of(&d.id);
    d
}

/// Every disk with the VMs that use it (for ListDisks and event snapshots).
pub fn list_with_users(agent: &Agent) -> Vec<Disk> {
    agent
        .disks
        .list()
        .into_iter()
        .map(|d| with_users(agent, d))
        .collect()
}

type TaskStream = Pin<Box<dyn Stream<Item = Result<Task, Status>> + Send>>;

fn ended(t: &Task) -> bool {
    t.state != TaskState::Running as i32
}

#[tonic::async_trait]
impl DiskService for DiskSvc {
    async fn list_disks(
        &self,
        _: Request<ListDisksRequest>,
    ) -> Result<Response<ListDisksResponse>, Status> {
        Ok(Response::new(ListDisksResponse {
            disks: list_with_users(&self.agent),
        }))
    }

    async fn get_disk(&self, req: Request<DiskRef>) -> Result<Response<Disk>, Status> {
        let d = self.agent.disks.inspect(&req.into_inner().disk_id).await?;
        Ok(Response::new(self.with_users(d)))
    }

    async fn create_disk(&self, req: Request<CreateDiskRequest>) -> Result<Response<Disk>, Status> {
        let d = self.agent.disks.create(req.into_inner()).await?;
        Ok(Response::new(self.with_users(d)))
    }

    async fn delete_disk(
        &self,
        req: Request<DiskRef>,
    ) -> Result<Response<DeleteDiskResponse>, Status> {
        let id = req.into_inner().disk_id;
        // Unknown ids are NotFound before anything else.
        self.agent.disks.get(&id)?;
        let users = self.agent.vms.users_of(&id);
        self.agent.disks.delete(&id, &users).await?;
        Ok(Response::new(DeleteDiskResponse {}))
    }

    async fn convert_disk(
        &self,
        req: Request<ConvertDiskRequest>,
    ) -> Result<Response<Task>, Status> {
        let req = req.into_inner();
        self.agent.disks.get(&req.disk_id)?;
        self.not_running(&req.disk_id, "converting")?;
        Ok(Response::new(self.agent.disks.convert(req)?))
    }

    async fn resize_disk(&self, req: Request<ResizeDiskRequest>) -> Result<Response<Task>, Status> {
        let req = req.into_inner();
        self.agent.disks.get(&req.disk_id)?;
        self.not_running(&req.disk_id, "resizing")?;
        Ok(Response::new(self.agent.disks.resize(req)?))
    }

    async fn begin_upload(
        &self,
        req: Request<BeginUploadRequest>,
    ) -> Result<Response<UploadStatus>, Status> {
        let r = req.into_inner();
        let s = self
            .agent
            .disks
            .begin_upload(&r.name, r.size, &r.sha256)
            .await?;
        Ok(Response::new(s))
    }

    async fn get_upload(&self, req: Request<UploadRef>) -> Result<Response<UploadStatus>, Status> {
        Ok(Response::new(
            self.agent.disks.get_upload(&req.into_inner().upload_id)?,
        ))
    }

    /// The server routes UploadDisk to `service::upload`, which hands the data on without
    /// copying it; this is the same upload through tonic's codec.
    async fn upload_disk(
        &self,
        req: Request<Streaming<UploadChunk>>,
    ) -> Result<Response<UploadStatus>, Status> {
        let s = self.agent.disks.upload_stream(req.into_inner()).await?;
        Ok(Response::new(s))
    }

    async fn finish_upload(
        &self,
        req: Request<FinishUploadRequest>,
    ) -> Result<Response<UploadStatus>, Status> {
        let r = req.into_inner();
        let s = self
            .agent
            .disks
            .finish_upload(&r.upload_id, &r.sha256)
            .await?;
        Ok(Response::new(s))
    }

    async fn cancel_upload(
        &self,
        req: Request<UploadRef>,
    ) -> Result<Response<UploadStatus>, Status> {
        let s = self
            .agent
            .disks
            .cancel_upload(&req.into_inner().upload_id)
            .await?;
        Ok(Response::new(s))
    }

    async fn get_task(&self, req: Request<TaskRef>) -> Result<Response<Task>, Status> {
        Ok(Response::new(
            self.agent.tasks.get(&req.into_inner().task_id)?,
        ))
    }

    async fn list_tasks(
        &self,
        _: Request<ListTasksRequest>,
    ) -> Result<Response<ListTasksResponse>, Status> {
        Ok(Response::new(ListTasksResponse {
            tasks: self.agent.tasks.list(),
        }))
    }

    type WatchTaskStream = TaskStream;

    async fn watch_task(&self, req: Request<TaskRef>) -> Result<Response<TaskStream>, Status> {
        let mut rx = self.agent.tasks.watch(&req.into_inner().task_id)?;
        let (tx, out) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let t = rx.borrow_and_update().clone();
                let last = ended(&t);
                if tx.send(Ok(t)).await.is_err() || last {
                    break;
                }
                // The sender lives as long as the task is remembered; if it is pruned, stop.
                if rx.changed().await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }

    async fn cancel_task(&self, req: Request<TaskRef>) -> Result<Response<Task>, Status> {
        Ok(Response::new(
            self.agent.tasks.cancel(&req.into_inner().task_id)?,
        ))
    }
}
