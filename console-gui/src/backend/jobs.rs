//! The calls behind the app's jobs: VM actions, creating a VM and changing its settings,
//! deleting, converting and resizing disks. Each runs on the backend's runtime and ends in
//! one [`Update::JobDone`] whose failure is one sentence naming the VM or disk and the host
//! (the technical chain in its details).

use std::future::Future;

use proto::client::Clients;
use proto::v1::{
    AttachDiskRequest, ConvertDiskRequest, CreateVmRequest, DetachDiskRequest, DiskAttachment,
    DiskFormat, DiskRef, DiskVariant, ResizeDiskRequest, TaskRef, TaskState, UpdateVmRequest,
    VmRef, VmSpec,
};
use tonic::{Code, Status};

use super::{Backend, HostId, JobId, Update, VmAction};
use crate::conn::{CALL_TIMEOUT, Plain, plain_status};

/// What a job is about, for its sentences: names, never ids.
#[derive(Debug, Clone, Default)]
pub struct JobNames {
    /// The VM's or disk's name.
    pub object: String,
    /// The host's name.
    pub host: String,
    /// Why the host cannot run VMs, when it says it cannot.
    pub cannot_run: Option<String>,
}

/// A disk joining or leaving a VM (a running one too, for SCSI disks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmDiskChange {
    /// Attach this library disk (bus unspecified: the host picks by format).
    Attach(DiskAttachment),
    /// Detach the disk with this id.
    Detach(String),
}

/// Something to do to a disk in the library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskAction {
    Delete,
    Convert {
        format: DiskFormat,
        variant: DiskVariant,
        name: String,
    },
    Resize {
        new_size: u64,
        allow_shrink: bool,
    },
}

/// A unary call with the usual timeout; a refusal in plain words after `what`.
async fn unary<T>(
    what: &str,
    call: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Plain> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(plain_status(what, &s)),
        Err(_) => Err(Plain::new(
            format!("{what}: the host did not answer in time; check that it is up"),
            format!("no answer within {} s", CALL_TIMEOUT.as_secs()),
        )),
    }
}

/// A start that the worker did not survive, in plain words.
fn start_failure(what: &str, names: &JobNames, s: &Status) -> Plain {
    let mut p = plain_status(what, s);
    if s.code() == Code::FailedPrecondition && s.message().starts_with("VM failed to start") {
        p.line = match &names.cannot_run {
            Some(why) => format!(
                "{what}: host {} cannot run VMs ({}); run the VM on a host that can",
                names.host,
                why.trim_end_matches('.')
            ),
            None => format!(
                "{what}: its worker process stopped as it started; the VM's details show its log"
            ),
        };
    }
    p
}

impl Backend {
    /// Run `call` on `host`'s connection as job `job`.
    fn job<F, Fut>(&self, job: JobId, host: HostId, what: String, call: F)
    where
        F: FnOnce(Clients, super::Notifier) -> Fut + Send + 'static,
        Fut: Future<Output = Result<String, Plain>> + Send,
    {
        let n = self.notify.clone();
        let clients = self.clients(host);
        self.rt.spawn(async move {
            let result = match clients {
                None => Err(Plain::new(
                    format!("{what}: the host is offline; try again once it is connected"),
                    "no connection",
                )),
                Some(c) => call(c, n.clone()).await,
            };
            n.send(Update::JobDone { job, result });
        });
    }

    /// Run a VM action as job `job`.
    pub fn vm_action(
        &self,
        job: JobId,
        host: HostId,
        vm_id: String,
        action: VmAction,
        names: JobNames,
    ) {
        let what = format!(
            "cannot {} the VM '{}' on {}",
            action.verb(),
            names.object,
            names.host
        );
        self.job(job, host, what.clone(), move |mut c, _| async move {
            let r = VmRef { vm_id };
            let call = async {
                match action {
                    VmAction::Start => c.vm.start_vm(r).await.map(|_| ()),
                    VmAction::Shutdown => c.vm.shutdown_vm(r).await.map(|_| ()),
                    VmAction::ForceOff => c.vm.stop_vm(r).await.map(|_| ()),
                    VmAction::Pause => c.vm.pause_vm(r).await.map(|_| ()),
                    VmAction::Resume => c.vm.resume_vm(r).await.map(|_| ()),
                    VmAction::Reset => c.vm.reset_vm(r).await.map(|_| ()),
                    VmAction::Delete => c.vm.delete_vm(r).await.map(|_| ()),
                }
            };
            match tokio::time::timeout(CALL_TIMEOUT, call).await {
                Ok(Ok(())) => Ok("done".to_string()),
                Ok(Err(s)) if action == VmAction::Start => Err(start_failure(&what, &names, &s)),
                Ok(Err(s)) => Err(plain_status(&what, &s)),
                Err(_) => Err(Plain::new(
                    format!("{what}: the host did not answer in time; check that it is up"),
                    "",
                )),
            }
        });
    }

    /// Create a VM as job `job`.
    pub fn create_vm(&self, job: JobId, host: HostId, spec: VmSpec, host_name: String) {
        let what = format!("cannot create the VM '{}' on {host_name}", spec.name);
        self.job(job, host, what.clone(), move |mut c, _| async move {
            let call = c.vm.create_vm(CreateVmRequest { spec: Some(spec) });
            let vm = unary(&what, call).await?;
            Ok(format!(
                "created VM '{}'",
                vm.spec.map(|s| s.name).unwrap_or(vm.id)
            ))
        });
    }

    /// Change a VM's settings as job `job` (the agent checks them as it checks a new VM).
    pub fn update_vm(
        &self,
        job: JobId,
        host: HostId,
        vm_id: String,
        spec: VmSpec,
        names: JobNames,
    ) {
        let what = format!(
            "cannot change the settings of VM '{}' on {}",
            names.object, names.host
        );
        self.job(job, host, what.clone(), move |mut c, _| async move {
            let call = c.vm.update_vm(UpdateVmRequest {
                vm_id,
                spec: Some(spec),
            });
            unary(&what, call).await?;
            Ok("saved".to_string())
        });
    }

    /// Add a disk to a VM or take one away as job `job`; `disk_name` is the disk's name for
    /// the sentences.
    pub fn vm_disk(
        &self,
        job: JobId,
        host: HostId,
        vm_id: String,
        change: VmDiskChange,
        disk_name: String,
        names: JobNames,
    ) {
        let what = match &change {
            VmDiskChange::Attach(_) => format!(
                "cannot add disk '{disk_name}' to VM '{}' on {}",
                names.object, names.host
            ),
            VmDiskChange::Detach(_) => format!(
                "cannot remove disk '{disk_name}' from VM '{}' on {}",
                names.object, names.host
            ),
        };
        self.job(job, host, what.clone(), move |mut c, _| async move {
            match change {
                VmDiskChange::Attach(disk) => {
                    let call = c.vm.attach_disk(AttachDiskRequest {
                        vm_id,
                        disk: Some(disk),
                    });
                    unary(&what, call).await?;
                    Ok("added".to_string())
                }
                VmDiskChange::Detach(disk_id) => {
                    let call = c.vm.detach_disk(DetachDiskRequest { vm_id, disk_id });
                    unary(&what, call).await?;
                    Ok("removed".to_string())
                }
            }
        });
    }

    /// Delete, convert or resize a disk as job `job`. Conversion and resizing are agent
    /// tasks: the job follows its task until it ends.
    pub fn disk_action(
        &self,
        job: JobId,
        host: HostId,
        disk_id: String,
        action: DiskAction,
        names: JobNames,
    ) {
        let verb = match &action {
            DiskAction::Delete => "delete",
            DiskAction::Convert { .. } => "convert",
            DiskAction::Resize { .. } => "resize",
        };
        let what = format!("cannot {verb} disk '{}' on {}", names.object, names.host);
        self.job(job, host, what.clone(), move |mut c, n| async move {
            let task = match action {
                DiskAction::Delete => {
                    unary(&what, c.disk.delete_disk(DiskRef { disk_id })).await?;
                    return Ok("deleted".to_string());
                }
                DiskAction::Convert {
                    format,
                    variant,
                    name,
                } => {
                    let req = ConvertDiskRequest {
                        disk_id,
                        format: format as i32,
                        variant: variant as i32,
                        name,
                    };
                    unary(&what, c.disk.convert_disk(req)).await?
                }
                DiskAction::Resize {
                    new_size,
                    allow_shrink,
                } => {
                    let req = ResizeDiskRequest {
                        disk_id,
                        new_size,
                        allow_shrink,
                    };
                    unary(&what, c.disk.resize_disk(req)).await?
                }
            };
            n.send(Update::JobTask {
                job,
                task_id: task.id.clone(),
            });
            follow_task(&mut c, &what, task.id).await
        });
    }
}

/// Wait for an agent task to end; its outcome in plain words.
async fn follow_task(c: &mut Clients, what: &str, task_id: String) -> Result<String, Plain> {
    let mut s = unary(what, c.disk.watch_task(TaskRef { task_id })).await?;
    loop {
        match s.message().await {
            Ok(Some(t)) if t.state == TaskState::Running as i32 => {}
            Ok(Some(t)) if t.state == TaskState::Succeeded as i32 => return Ok("done".into()),
            Ok(Some(t)) if t.state == TaskState::Cancelled as i32 => {
                return Err(Plain::new(format!("{what}: it was cancelled"), ""));
            }
            Ok(Some(t)) => {
                return Err(Plain::new(
                    format!("{what}: {}", crate::conn::field_words(&t.error)),
                    format!("task {} failed: {}", t.id, t.error),
                ));
            }
            Ok(None) => return Ok("done".into()),
            Err(st) => return Err(plain_status(&format!("{what} (lost track of it)"), &st)),
        }
    }
}
