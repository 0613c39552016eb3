//! The console's state, without drawing: hosts and their inventory, jobs, the event log,
//! and how backend [`Update`]s and agent events change them. Nothing here needs a window
//! or an egui context, so the rules are tested directly (see the tests below).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use proto::v1::{Disk, HostInfo, Task, TaskState, Vm, event};

use super::words::state_word;
use crate::backend::{HostId, HostStatus, JobId, Update};
use crate::config::{Config, HostConfig};
use crate::conn::Plain;
use crate::console::ConsoleHandle;
use crate::upload::{Progress, UploadControl};
use crate::view::ScreenView;

/// One host in the UI.
#[derive(Debug)]
pub struct Host {
    pub id: HostId,
    pub cfg: HostConfig,
    pub status: HostStatus,
    pub info: Option<HostInfo>,
    pub vms: BTreeMap<String, Vm>,
    pub disks: BTreeMap<String, Disk>,
    pub tasks: BTreeMap<String, Task>,
    /// Shown but never connected (benchmarks).
    pub(super) fake: bool,
}

impl Host {
    /// Why this host cannot run VMs, when its agent says it cannot (in its words).
    pub fn cannot_run(&self) -> Option<String> {
        let kvm = self.info.as_ref()?.kvm.as_ref();
        match kvm {
            Some(k) if k.usable => None,
            Some(k) if !k.reason.trim().is_empty() => {
                Some(k.reason.trim().trim_end_matches('.').to_string())
            }
            _ => Some("KVM is not usable there".into()),
        }
    }

    /// The VMs that use a disk, by id: those whose settings attach it (the agent's events
    /// about a disk do not say who uses it), and those the agent's snapshot named.
    pub fn disk_users(&self, disk_id: &str) -> Vec<String> {
        let mut users: Vec<String> = self
            .vms
            .values()
            .filter(|v| {
                v.spec
                    .as_ref()
                    .is_some_and(|s| s.disks.iter().any(|d| d.disk_id == disk_id))
            })
            .map(|v| v.id.clone())
            .collect();
        if let Some(d) = self.disks.get(disk_id) {
            for id in &d.attached_to {
                if self.vms.contains_key(id) && !users.contains(id) {
                    users.push(id.clone());
                }
            }
        }
        users
    }

    /// The VM's name, or its id when it has none.
    pub fn vm_name(&self, vm_id: &str) -> String {
        self.vms
            .get(vm_id)
            .and_then(|v| v.spec.as_ref())
            .map_or_else(|| vm_id.to_string(), |s| s.name.clone())
    }
}

/// How a job is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    Running,
    Succeeded(String),
    Failed(String),
}

/// A long operation started from this console.
pub struct Job {
    pub id: JobId,
    pub host: String,
    pub title: String,
    pub state: JobState,
    /// The technical chain of a failure (shown when asked for).
    pub details: String,
    /// The agent's task this job follows (its progress is shown on the job).
    pub task: Option<String>,
    pub upload: Option<(Arc<Progress>, tokio::sync::watch::Sender<UploadControl>)>,
    pub(super) started: Instant,
}

/// What a console tab shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsolePane {
    Screen,
    Serial,
}

/// An open VM console.
pub struct ConsoleTab {
    pub host: HostId,
    pub vm_id: String,
    pub title: String,
    pub handle: ConsoleHandle,
    pub screen: ScreenView,
    pub pane: ConsolePane,
    pub(super) serial_line: String,
}

impl ConsoleTab {
    /// Whether this tab shows `vm_id` on `host`.
    pub fn is(&self, host: HostId, vm_id: &str) -> bool {
        self.host == host && self.vm_id == vm_id
    }
}

/// What is selected in the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Selection {
    Host(HostId),
    Vm(HostId, String),
}

impl Selection {
    /// The selected host, or the host of the selected VM.
    pub fn host(&self) -> HostId {
        match self {
            Selection::Host(h) | Selection::Vm(h, _) => *h,
        }
    }
}

/// What an update leaves to the app because it concerns a dialog.
#[derive(Debug, PartialEq)]
pub(super) enum Followup {
    None,
    /// The answer to a fingerprint request (the host dialog waits for it).
    Fingerprint {
        addr: String,
        result: Result<String, String>,
    },
    /// A disk was uploaded (and is in the host's library): offer a VM made from it.
    OfferVm {
        host: HostId,
        disk: Box<Disk>,
    },
}

/// Hosts, jobs and the event log.
pub(super) struct State {
    pub hosts: Vec<Host>,
    /// Newest first.
    pub jobs: Vec<Job>,
    /// Newest first.
    pub log: VecDeque<String>,
    /// Host and job ids come from one counter.
    next_id: u64,
}

impl Default for State {
    fn default() -> Self {
        State {
            hosts: Vec::new(),
            jobs: Vec::new(),
            log: VecDeque::new(),
            next_id: 1,
        }
    }
}

impl State {
    fn next_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    pub fn host(&self, id: HostId) -> Option<&Host> {
        self.hosts.iter().find(|h| h.id == id)
    }

    pub fn host_mut(&mut self, id: HostId) -> Option<&mut Host> {
        self.hosts.iter_mut().find(|h| h.id == id)
    }

    pub fn host_by_name(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.cfg.name == name)
    }

    /// The VM's name, or its id when it has none (or is not known).
    pub fn vm_name(&self, host: HostId, vm_id: &str) -> String {
        self.host(host)
            .map_or_else(|| vm_id.to_string(), |h| h.vm_name(vm_id))
    }

    /// The host's name ("" when it is gone).
    pub fn host_name(&self, host: HostId) -> String {
        self.host(host)
            .map(|h| h.cfg.name.clone())
            .unwrap_or_default()
    }

    pub fn job(&self, id: JobId) -> Option<&Job> {
        self.jobs.iter().find(|j| j.id == id)
    }

    /// The first VM called `name`, on any host.
    pub fn find_vm_named(&self, name: &str) -> Option<(HostId, String)> {
        self.hosts.iter().find_map(|h| {
            h.vms
                .values()
                .find(|v| v.spec.as_ref().is_some_and(|s| s.name == name))
                .map(|v| (h.id, v.id.clone()))
        })
    }

    /// A line for the event log (and the program's log).
    pub fn note(&mut self, line: String) {
        tracing::info!("{line}");
        self.log.push_front(line);
        self.log.truncate(500);
    }

    /// List a host; `vms` and `fake` are for hosts that are shown but never connected.
    pub fn add_host(
        &mut self,
        cfg: HostConfig,
        status: HostStatus,
        vms: Vec<Vm>,
        fake: bool,
    ) -> HostId {
        let id = self.next_id();
        self.hosts.push(Host {
            id,
            cfg,
            status,
            info: None,
            vms: vms.into_iter().map(|v| (v.id.clone(), v)).collect(),
            disks: BTreeMap::new(),
            tasks: BTreeMap::new(),
            fake,
        });
        id
    }

    /// Forget a host.
    pub fn remove_host(&mut self, id: HostId) {
        self.hosts.retain(|h| h.id != id);
    }

    /// The hosts to save (not the fake ones).
    pub fn config(&self) -> Config {
        Config {
            hosts: self
                .hosts
                .iter()
                .filter(|h| !h.fake)
                .map(|h| h.cfg.clone())
                .collect(),
        }
    }

    /// A new running job, first in the list (which keeps the last 200).
    pub fn new_job(&mut self, host: HostId, title: String) -> JobId {
        let id = self.next_id();
        let host = self
            .host(host)
            .map(|h| h.cfg.name.clone())
            .unwrap_or_default();
        self.jobs.insert(
            0,
            Job {
                id,
                host,
                title,
                state: JobState::Running,
                details: String::new(),
                task: None,
                upload: None,
                started: Instant::now(),
            },
        );
        self.jobs.truncate(200);
        id
    }

    pub fn job_mut(&mut self, id: JobId) -> Option<&mut Job> {
        self.jobs.iter_mut().find(|j| j.id == id)
    }

    /// "Clear finished": drop ended jobs and the event log.
    pub fn clear_finished(&mut self) {
        self.jobs.retain(|j| j.state == JobState::Running);
        self.log.clear();
    }

    /// An upload is running (its speed is shown, so it is redrawn often).
    pub fn uploading(&self) -> bool {
        self.jobs
            .iter()
            .any(|j| j.state == JobState::Running && j.upload.is_some())
    }

    /// Some VM is running (its uptime ticks).
    pub fn any_vm_running(&self) -> bool {
        self.hosts.iter().any(|h| {
            h.vms
                .values()
                .any(|v| v.state == proto::v1::VmState::Running as i32)
        })
    }

    /// Apply what the backend reported; what concerns a dialog is handed back.
    pub fn apply(&mut self, u: Update) -> Followup {
        match u {
            Update::Status { host, status } => self.set_status(host, status),
            Update::Info { host, info } => {
                if let Some(h) = self.host_mut(host) {
                    h.info = Some(*info);
                }
            }
            Update::Event { host, event } => self.apply_event(host, *event),
            Update::Fingerprint { addr, result } => {
                return Followup::Fingerprint { addr, result };
            }
            Update::JobDone { job, result } => self.job_done(job, result),
            Update::JobTask { job, task_id } => {
                if let Some(j) = self.job_mut(job) {
                    j.task = Some(task_id);
                }
            }
            Update::Uploaded { host, disk, .. } => {
                if let Some(h) = self.host_mut(host) {
                    h.disks.insert(disk.id.clone(), (*disk).clone());
                }
                return Followup::OfferVm { host, disk };
            }
        }
        Followup::None
    }

    fn set_status(&mut self, host: HostId, status: HostStatus) {
        let Some(h) = self.host_mut(host) else { return };
        let was_online = h.status == HostStatus::Online;
        h.status = status.clone();
        let name = h.cfg.name.clone();
        match status {
            HostStatus::Online => self.note(format!("{name}: connected")),
            HostStatus::Offline { error, .. } if was_online => {
                self.note(format!("{name}: offline: {error}"));
            }
            _ => {}
        }
    }

    fn job_done(&mut self, job: JobId, result: Result<String, Plain>) {
        let Some(j) = self.job_mut(job) else {
            return;
        };
        let line = match &result {
            Ok(t) => format!("{}: {}: {t}", j.host, j.title),
            Err(e) => format!("{}: {} failed: {}", j.host, j.title, e.line),
        };
        j.state = match result {
            Ok(t) => JobState::Succeeded(t),
            Err(e) => {
                j.details = e.details;
                JobState::Failed(e.line)
            }
        };
        self.note(line);
    }

    /// Apply one of a host's events to its inventory; noteworthy changes go to the log.
    pub fn apply_event(&mut self, host: HostId, ev: proto::v1::Event) {
        let Some(h) = self.host_mut(host) else { return };
        let name = h.cfg.name.clone();
        let cannot_run = h.cannot_run();
        let mut lines = Vec::new();
        match ev.kind {
            Some(event::Kind::Snapshot(s)) => {
                h.vms = s.vms.into_iter().map(|v| (v.id.clone(), v)).collect();
                h.disks = s.disks.into_iter().map(|d| (d.id.clone(), d)).collect();
                h.tasks = s.tasks.into_iter().map(|t| (t.id.clone(), t)).collect();
            }
            Some(event::Kind::VmChanged(v)) => {
                let vm_name = v.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default();
                match h.vms.get(&v.id) {
                    None => lines.push(format!("{name}: VM '{vm_name}' created")),
                    Some(old) if old.state != v.state => {
                        lines.push(state_line(&name, &vm_name, &v, cannot_run.as_deref()));
                    }
                    _ => {}
                }
                h.vms.insert(v.id.clone(), v);
            }
            Some(event::Kind::VmDeleted(id)) => {
                if let Some(v) = h.vms.remove(&id) {
                    let vm_name = v.spec.map(|s| s.name).unwrap_or(id);
                    lines.push(format!("{name}: VM '{vm_name}' deleted"));
                }
            }
            Some(event::Kind::DiskChanged(d)) => {
                h.disks.insert(d.id.clone(), d);
            }
            Some(event::Kind::DiskDeleted(id)) => {
                h.disks.remove(&id);
            }
            Some(event::Kind::TaskChanged(t)) => {
                let ended = t.state != TaskState::Running as i32;
                let was_running = h
                    .tasks
                    .get(&t.id)
                    .is_none_or(|o| o.state == TaskState::Running as i32);
                if ended && was_running {
                    let how = match TaskState::try_from(t.state) {
                        Ok(TaskState::Succeeded) => "succeeded".to_string(),
                        Ok(TaskState::Cancelled) => "was cancelled".to_string(),
                        _ => format!("failed: {}", t.error),
                    };
                    lines.push(format!("{name}: {} {how}", t.description));
                }
                h.tasks.insert(t.id.clone(), t);
            }
            None => {}
        }
        for l in lines {
            self.note(l);
        }
    }
}

/// A VM's new state for the event log. A crash is one sentence with what to do; its
/// technical reason is in the VM's details.
fn state_line(host: &str, vm_name: &str, v: &Vm, cannot_run: Option<&str>) -> String {
    if v.state == proto::v1::VmState::Crashed as i32 {
        return match cannot_run {
            Some(why) => {
                format!("{host}: VM '{vm_name}' could not run: this host cannot run VMs ({why})")
            }
            None => format!("{host}: VM '{vm_name}' stopped unexpectedly; its details show why"),
        };
    }
    let mut l = format!(
        "{host}: VM '{vm_name}' is {}",
        state_word(v.state).to_lowercase()
    );
    if !v.state_reason.is_empty() {
        l.push_str(&format!(" ({})", v.state_reason));
    }
    l
}

#[cfg(test)]
mod tests {
    use proto::v1::{Event, Snapshot, VmSpec, VmState};

    use super::*;

    fn host_cfg(name: &str) -> HostConfig {
        HostConfig {
            name: name.into(),
            addr: "127.0.0.1:7443".into(),
            token: "pvs_x".into(),
            fingerprint: None,
        }
    }

    fn vm(id: &str, name: &str, state: VmState) -> Vm {
        Vm {
            id: id.into(),
            spec: Some(VmSpec {
                name: name.into(),
                ..Default::default()
            }),
            state: state as i32,
            ..Default::default()
        }
    }

    fn event(kind: event::Kind) -> Update {
        Update::Event {
            host: 1,
            event: Box::new(Event {
                kind: Some(kind),
                ..Default::default()
            }),
        }
    }

    fn state_with_host() -> State {
        let mut s = State::default();
        let id = s.add_host(host_cfg("lab"), HostStatus::Connecting, Vec::new(), false);
        assert_eq!(id, 1);
        s
    }

    #[test]
    fn vm_events_update_the_inventory_and_the_log() {
        let mut s = state_with_host();
        let snapshot = Snapshot {
            vms: vec![vm("a", "alpha", VmState::Off)],
            ..Default::default()
        };
        assert_eq!(
            s.apply(event(event::Kind::Snapshot(snapshot))),
            Followup::None
        );
        assert_eq!(s.vm_name(1, "a"), "alpha");
        assert!(s.log.is_empty(), "a snapshot is not news");

        s.apply(event(event::Kind::VmChanged(vm("b", "beta", VmState::Off))));
        assert_eq!(s.host(1).unwrap().vms.len(), 2);
        assert_eq!(s.log[0], "lab: VM 'beta' created");

        let mut started = vm("a", "alpha", VmState::Running);
        started.state_reason = "by the user".into();
        s.apply(event(event::Kind::VmChanged(started)));
        assert_eq!(
            s.host(1).unwrap().vms["a"].state,
            VmState::Running as i32,
            "the inventory follows the event"
        );
        assert_eq!(s.log[0], "lab: VM 'alpha' is running (by the user)");
        assert!(s.any_vm_running());
        assert_eq!(s.find_vm_named("alpha"), Some((1, "a".to_string())));

        s.apply(event(event::Kind::VmDeleted("b".into())));
        assert!(!s.host(1).unwrap().vms.contains_key("b"));
        assert_eq!(s.log[0], "lab: VM 'beta' deleted");
        // Events of hosts that are gone are ignored.
        s.remove_host(1);
        s.apply(event(event::Kind::VmDeleted("a".into())));
        assert!(s.hosts.is_empty());
    }

    #[test]
    fn a_host_that_cannot_run_vms_says_why_and_its_crashes_say_so() {
        let mut s = state_with_host();
        assert_eq!(s.host(1).unwrap().cannot_run(), None, "not known yet");
        s.apply(Update::Info {
            host: 1,
            info: Box::new(HostInfo {
                kvm: Some(proto::v1::KvmInfo {
                    usable: false,
                    reason: "the VM worker's KVM probe failed.".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        });
        assert_eq!(
            s.host(1).unwrap().cannot_run().as_deref(),
            Some("the VM worker's KVM probe failed")
        );
        s.apply(event(event::Kind::VmChanged(vm(
            "a",
            "alpha",
            VmState::Off,
        ))));
        let mut crashed = vm("a", "alpha", VmState::Crashed);
        crashed.state_reason = "worker exited with status 1 and no exit record".into();
        s.apply(event(event::Kind::VmChanged(crashed)));
        assert_eq!(
            s.log[0],
            "lab: VM 'alpha' could not run: this host cannot run VMs (the VM worker's KVM probe failed)"
        );
        assert!(
            !s.log[0].contains("exit record"),
            "the technical reason stays in the details"
        );
    }

    #[test]
    fn finished_jobs_and_tasks_are_marked_and_logged() {
        let mut s = state_with_host();
        let ok = s.new_job(1, "Start VM 'alpha'".into());
        let bad = s.new_job(1, "Create VM 'beta'".into());
        assert_eq!(s.jobs[0].id, bad, "newest first");
        assert_eq!(s.jobs[0].host, "lab");
        s.apply(Update::JobDone {
            job: ok,
            result: Ok("done".into()),
        });
        s.apply(Update::JobDone {
            job: bad,
            result: Err(Plain::new(
                "cannot create the VM: no",
                "InvalidArgument: no",
            )),
        });
        let state = |s: &State, id| s.jobs.iter().find(|j| j.id == id).unwrap().state.clone();
        assert_eq!(state(&s, ok), JobState::Succeeded("done".into()));
        assert_eq!(
            state(&s, bad),
            JobState::Failed("cannot create the VM: no".into())
        );
        assert_eq!(
            s.log[0],
            "lab: Create VM 'beta' failed: cannot create the VM: no"
        );
        assert_eq!(s.job(bad).unwrap().details, "InvalidArgument: no");
        assert_eq!(s.log[1], "lab: Start VM 'alpha': done");

        let task = |state: TaskState| Task {
            id: "t1".into(),
            description: "Verify disk".into(),
            state: state as i32,
            ..Default::default()
        };
        s.apply(event(event::Kind::TaskChanged(task(TaskState::Running))));
        let lines = s.log.len();
        s.apply(event(event::Kind::TaskChanged(task(TaskState::Succeeded))));
        assert_eq!(s.log[0], "lab: Verify disk succeeded");
        // An ended task that changes again is not news twice.
        s.apply(event(event::Kind::TaskChanged(task(TaskState::Succeeded))));
        assert_eq!(s.log.len(), lines + 1);

        s.clear_finished();
        assert!(s.jobs.is_empty() && s.log.is_empty());
    }

    #[test]
    fn host_status_and_uploads() {
        let mut s = state_with_host();
        s.apply(Update::Status {
            host: 1,
            status: HostStatus::Offline {
                error: "refused".into(),
                details: String::new(),
                retry_in_s: 1,
            },
        });
        assert!(
            s.log.is_empty(),
            "a host that never came online is not news"
        );
        s.apply(Update::Status {
            host: 1,
            status: HostStatus::Online,
        });
        assert_eq!(s.log[0], "lab: connected");
        s.apply(Update::Status {
            host: 1,
            status: HostStatus::Offline {
                error: "lost the connection".into(),
                details: String::new(),
                retry_in_s: 1,
            },
        });
        assert_eq!(s.log[0], "lab: offline: lost the connection");

        let disk = Disk {
            id: "d1".into(),
            name: "web.vhdx".into(),
            ..Default::default()
        };
        let job = s.new_job(1, "Import web.vhdx".into());
        let f = s.apply(Update::Uploaded {
            job,
            host: 1,
            disk: Box::new(disk.clone()),
        });
        assert_eq!(s.host(1).unwrap().disks["d1"], disk);
        assert_eq!(
            f,
            Followup::OfferVm {
                host: 1,
                disk: Box::new(disk)
            }
        );
        let f = s.apply(Update::Fingerprint {
            addr: "h:1".into(),
            result: Ok("ab".into()),
        });
        assert!(matches!(f, Followup::Fingerprint { .. }));
    }

    #[test]
    fn fake_hosts_are_not_saved() {
        let mut s = state_with_host();
        s.add_host(host_cfg("bench"), HostStatus::Online, Vec::new(), true);
        let cfg = s.config();
        assert_eq!(cfg.hosts, vec![host_cfg("lab")]);
    }
}
