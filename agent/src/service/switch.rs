//! SwitchService.

use std::sync::Arc;

use proto::v1::switch_service_server::SwitchService;
use proto::v1::{
    CreateSwitchRequest, DeleteSwitchResponse, ListSwitchesRequest, ListSwitchesResponse, Switch,
    SwitchRef,
};
use tonic::{Request, Response, Status};

use crate::Agent;
use crate::error::AgentError;
use crate::network::Switches;

#[derive(Debug)]
pub struct SwitchSvc {
    agent: Arc<Agent>,
}

impl SwitchSvc {
    pub fn new(agent: Arc<Agent>) -> Self {
        SwitchSvc { agent }
    }

    fn switches(&self) -> Result<Arc<Switches>, AgentError> {
        self.agent
            .vms
            .network()
            .ok_or_else(|| AgentError::Unavailable("this agent manages no network".into()))
    }
}

#[tonic::async_trait]
impl SwitchService for SwitchSvc {
    async fn create_switch(
        &self,
        req: Request<CreateSwitchRequest>,
    ) -> Result<Response<Switch>, Status> {
        let s = req
            .into_inner()
            .switch
            .ok_or_else(|| AgentError::invalid("switch", "missing"))?;
        Ok(Response::new(self.switches()?.create(&s).await?))
    }

    async fn list_switches(
        &self,
        _: Request<ListSwitchesRequest>,
    ) -> Result<Response<ListSwitchesResponse>, Status> {
        let users = self.agent.vms.switch_users();
        Ok(Response::new(ListSwitchesResponse {
            switches: self.switches()?.list(&users).await,
        }))
    }

    async fn delete_switch(
        &self,
        req: Request<SwitchRef>,
    ) -> Result<Response<DeleteSwitchResponse>, Status> {
        let name = req.into_inner().name;
        let users = self
            .agent
            .vms
            .switch_users()
            .remove(&name)
            .unwrap_or_default();
        self.switches()?.delete(&name, &users).await?;
        Ok(Response::new(DeleteSwitchResponse {}))
    }
}
