//! VmService.

use std::sync::Arc;

use proto::v1::vm_service_server::VmService;
use proto::v1::{
    AttachDiskRequest, CreateVmRequest, DeleteVmResponse, DetachDiskRequest, ListVmsRequest,
    ListVmsResponse, UpdateVmRequest, Vm, VmRef,
};
use tonic::{Request, Response, Status};

use crate::Agent;
use crate::error::{AgentError, AgentResult};

#[derive(Debug)]
pub struct VmSvc {
    agent: Arc<Agent>,
}

impl VmSvc {
    pub fn new(agent: Arc<Agent>) -> Self {
        VmSvc { agent }
    }
}

/// A VM id from a request: unknown shapes are simply not found.
pub fn vm_id(agent: &Agent, id: &str) -> AgentResult<String> {
    if crate::store::is_id(id) {
        agent.vms.get(id)?;
        Ok(id.to_string())
    } else {
        Err(AgentError::not_found("VM", id))
    }
}

fn reply(r: AgentResult<Vm>) -> Result<Response<Vm>, Status> {
    r.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl VmService for VmSvc {
    async fn create_vm(&self, req: Request<CreateVmRequest>) -> Result<Response<Vm>, Status> {
        let spec = req
            .into_inner()
            .spec
            .ok_or_else(|| AgentError::invalid("spec", "missing"))?;
        reply(self.agent.vms.create(&spec))
    }

    async fn list_vms(
        &self,
        _: Request<ListVmsRequest>,
    ) -> Result<Response<ListVmsResponse>, Status> {
        Ok(Response::new(ListVmsResponse {
            vms: self.agent.vms.list(),
        }))
    }

    async fn get_vm(&self, req: Request<VmRef>) -> Result<Response<Vm>, Status> {
        let id = vm_id(&self.agent, &req.into_inner().vm_id)?;
        reply(self.agent.vms.get(&id))
    }

    async fn update_vm(&self, req: Request<UpdateVmRequest>) -> Result<Response<Vm>, Status> {
        let r = req.into_inner();
        let id = vm_id(&self.agent, &r.vm_id)?;
        let spec = r
            .spec
            .ok_or_else(|| AgentError::invalid("spec", "missing"))?;
        reply(self.agent.vms.update_spec(&id, &spec).await)
    }

    async fn delete_vm(&self, req: Request<VmRef>) -> Result<Response<DeleteVmResponse>, Status> {
        let id = vm_id(&self.agent, &req.into_inner().vm_id)?;
        self.agent.vms.delete(&id).await?;
        self.agent.stats.forget(&id);
        Ok(Response::new(DeleteVmResponse {}))
    }

    async fn start_vm(&self, req: Request<VmRef>) -> Result<Response<Vm>, Status> {
        let id = vm_id(&self.agent, &req.into_inner().vm_id)?;
        reply(self.agent.vms.start(&id).await)
    }

    async fn stop_vm(&self, req: Request<VmRef>) -> Result<Response<Vm>, Status> {
        let id = vm_id(&self.agent, &req.into_inner().vm_id)?;
        reply(self.agent.vms.stop(&id).await)
    }

    async fn shutdown_vm(&self, req: Request<VmRef>) -> Result<Response<Vm>, Status> {
        let id = vm_id(&self.agent, &req.into_inner().vm_id)?;
        reply(self.agent.vms.shutdown(&id).await)
    }

    async fn reset_vm(&self, req: Request<VmRef>) -> Result<Response<Vm>, Status> {
        let id = vm_id(&self.agent, &req.into_inner().vm_id)?;
        reply(self.agent.vms.reset(&id).await)
    }

    async fn pause_vm(&self, req: Request<VmRef>) -> Result<Response<Vm>, Status> {
        let id = vm_id(&self.agent, &req.into_inner().vm_id)?;
        reply(self.agent.vms.pause(&id).await)
    }

    async fn resume_vm(&self, req: Request<VmRef>) -> Result<Response<Vm>, Status> {
        let id = vm_id(&self.agent, &req.into_inner().vm_id)?;
        reply(self.agent.vms.resume(&id).await)
    }

    async fn attach_disk(&self, req: Request<AttachDiskRequest>) -> Result<Response<Vm>, Status> {
        let r = req.into_inner();
        let id = vm_id(&self.agent, &r.vm_id)?;
        let disk = r
            .disk
            .ok_or_else(|| AgentError::invalid("disk", "missing"))?;
        reply(self.agent.vms.attach_disk(&id, &disk).await)
    }

    async fn detach_disk(&self, req: Request<DetachDiskRequest>) -> Result<Response<Vm>, Status> {
        let r = req.into_inner();
        let id = vm_id(&self.agent, &r.vm_id)?;
        reply(self.agent.vms.detach_disk(&id, &r.disk_id).await)
    }
}
