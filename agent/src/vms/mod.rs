//! The host's VMs: inventory, state machine, and one worker process per running VM.

mod config;
mod process;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::v1::{DiskAttachment, DiskFormat, Vm, VmSpec, VmState};
use proto::worker::{Empty, request};
use tokio::sync::watch;

use config::{Bus, DiskRef, place_disks};
pub use config::{VmConfig, validate};
use process::{ExitRecord, RunRecord};

use crate::disks::DiskLibrary;
use crate::error::{AgentError, AgentResult};
use crate::events::EventBus;
use crate::host::HostFacts;
use crate::screen::{Geometry, Screen};
use crate::serial::SerialHub;
use crate::store::{self, Layout, now_ms};
use crate::worker::{InputSender, WorkerConn};

const CONFIG: &str = "vm.json";
const RUN: &str = "run.json";
const STATUS: &str = "status.json";
const SOCKET: &str = "worker.sock";
const SERIAL_LOG: &str = "serial.log";
const WORKER_LOG: &str = "worker.log";
/// How the VM last stopped, so a restarted agent reports a crash as a crash.
const LAST_EXIT: &str = "last-exit.json";

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct LastExit {
    crashed: bool,
    reason: String,
    #[serde(default)]
    crash_log: String,
}

/// A running worker.
#[derive(Debug)]
pub struct Running {
    pub pid: i32,
    pub conn: Arc<WorkerConn>,
    /// Keyboard and mouse, on their own connection.
    pub input: InputSender,
    pub serial: Arc<SerialHub>,
    screen: tokio::sync::Mutex<Option<Arc<Screen>>>,
    exited: watch::Sender<bool>,
}

#[derive(Debug)]
struct Entry {
    config: VmConfig,
    state: VmState,
    reason: String,
    changed_ms: i64,
    crash_log: String,
    run: Option<Arc<Running>>,
    /// Serializes lifecycle operations on this VM.
    op: Arc<tokio::sync::Mutex<()>>,
    /// Set by stop: the coming exit was asked for.
    stopping: bool,
    /// What the worker last said of the guest (its integration services).
    guest: Option<proto::v1::GuestInfo>,
}

impl Entry {
    fn vm(&self) -> Vm {
        Vm {
            id: self.config.id.clone(),
            spec: Some(self.config.spec()),
            state: self.state as i32,
            state_reason: self.reason.clone(),
            created_ms: self.config.created_ms,
            state_changed_ms: self.changed_ms,
            crash_log: self.crash_log.clone(),
            guest: self
                .guest
                .clone()
                .filter(|_| matches!(self.state, VmState::Running | VmState::Paused)),
        }
    }
}

/// Every VM of this host.
#[derive(Debug)]
pub struct Vms {
    layout: Layout,
    events: Arc<EventBus>,
    disks: Arc<DiskLibrary>,
    host: HostFacts,
    map: Mutex<HashMap<String, Entry>>,
    /// The host's switches, set once at start (absent in library tests).
    network: std::sync::OnceLock<Arc<crate::network::Switches>>,
}

impl Vms {
    /// Load the inventory. Workers still running from an earlier agent are adopted;
    /// those that ended meanwhile are reported as they ended.
    pub async fn load(
        layout: Layout,
        events: Arc<EventBus>,
        disks: Arc<DiskLibrary>,
        host: HostFacts,
    ) -> anyhow::Result<Arc<Self>> {
        let vms = Arc::new(Vms {
            layout: layout.clone(),
            events,
            disks,
            host,
            map: Mutex::new(HashMap::new()),
            network: std::sync::OnceLock::new(),
        });
        for e in std::fs::read_dir(layout.vms())?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                // A create or delete that was interrupted: never a usable VM.
                let _ = std::fs::remove_dir_all(e.path());
                continue;
            }
            if !store::is_id(&name) {
                continue;
            }
            let config: VmConfig = match store::read_json(&e.path().join(CONFIG)) {
                Ok(c) => c,
                Err(err) => {
                    tracing::error!("VM {name}: unreadable configuration, left alone: {err}");
                    continue;
                }
            };
            let last: Option<LastExit> = store::read_json(&e.path().join(LAST_EXIT)).ok();
            let (state, reason, crash_log) = match last {
                Some(l) if l.crashed => (VmState::Crashed, l.reason, l.crash_log),
                Some(l) => (VmState::Off, l.reason, String::new()),
                None => (VmState::Off, String::new(), String::new()),
            };
            vms.lock().insert(
                name.clone(),
                Entry {
                    config,
                    state,
                    reason,
                    changed_ms: now_ms(),
                    crash_log,
                    run: None,
                    op: Arc::default(),
                    stopping: false,
                    guest: None,
                },
            );
            vms.recover(&name).await;
        }
        Ok(vms)
    }

    /// After an agent restart: adopt the VM's worker if it still runs, otherwise report
    /// how it ended.
    async fn recover(self: &Arc<Self>, id: &str) {
        let dir = self.layout.vm(id);
        let Ok(run) = store::read_json::<RunRecord>(&dir.join(RUN)) else {
            return;
        };
        if process::is_same_process(&run) {
            match self.attach(id, run.pid).await {
                Ok(running) => {
                    let paused = running
                        .conn
                        .call(request::Kind::Query(Empty {}))
                        .await
                        .ok()
                        .and_then(|r| r.status)
                        .is_some_and(|s| s.paused);
                    let state = if paused {
                        VmState::Paused
                    } else {
                        VmState::Running
                    };
                    self.set_running(
                        id,
                        running.clone(),
                        state,
                        "worker adopted after an agent restart",
                    );
                    let vms = self.clone();
                    let id = id.to_string();
                    tokio::spawn(async move {
                        process::wait_pid(run.pid).await;
                        vms.worker_exited(&id, &running, None).await;
                    });
                    return;
                }
                Err(e) => tracing::warn!("VM {id}: cannot reach its worker: {e}"),
            }
        }
        let (state, reason) = self.exit_outcome(id, None, false);
        let log = if state == VmState::Crashed {
            self.log_tail(id)
        } else {
            String::new()
        };
        self.record_exit(id, state, &reason, &log);
        let _ = std::fs::remove_file(dir.join(RUN));
        self.update(id, |e| {
            e.state = state;
            e.reason = reason;
            e.crash_log = log;
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Change an entry and publish it.
    fn update(&self, id: &str, f: impl FnOnce(&mut Entry)) -> Option<Vm> {
        let vm = {
            let mut map = self.lock();
            let e = map.get_mut(id)?;
            f(e);
            e.changed_ms = now_ms();
            e.vm()
        };
        self.events.vm_changed(vm.clone());
        Some(vm)
    }

    fn entry<T>(&self, id: &str, f: impl FnOnce(&Entry) -> T) -> AgentResult<T> {
        let map = self.lock();
        map.get(id)
            .map(f)
            .ok_or_else(|| AgentError::not_found("VM", id))
    }

    pub fn list(&self) -> Vec<Vm> {
        let mut v: Vec<Vm> = self.lock().values().map(Entry::vm).collect();
        v.sort_by(|a, b| a.created_ms.cmp(&b.created_ms).then(a.id.cmp(&b.id)));
        v
    }

    pub fn get(&self, id: &str) -> AgentResult<Vm> {
        self.entry(id, Entry::vm)
    }

    /// The running worker of a VM, or FailedPrecondition.
    pub fn running(&self, id: &str) -> AgentResult<Arc<Running>> {
        let (run, name) = self.entry(id, |e| (e.run.clone(), e.config.name.clone()))?;
        run.ok_or_else(|| AgentError::precondition(format!("VM '{name}' is not running")))
    }

    /// Every running VM's worker, for sampling.
    pub fn running_vms(&self) -> Vec<crate::stats::RunningVm> {
        self.lock()
            .values()
            .filter_map(|e| {
                let run = e.run.as_ref()?;
                Some(crate::stats::RunningVm {
                    vm: crate::stats::VmId {
                        id: e.config.id.clone(),
                        pid: run.pid,
                        memory_bytes: e.config.memory_bytes,
                    },
                    worker: run.conn.clone(),
                })
            })
            .collect()
    }

    /// VM ids whose configuration uses the disk.
    pub fn users_of(&self, disk_id: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .lock()
            .values()
            .filter(|e| e.config.disks.iter().any(|d| d.disk_id == disk_id))
            .map(|e| e.config.id.clone())
            .collect();
        v.sort();
        v
    }

    /// Whether a VM that uses the disk is not off.
    pub fn disk_busy(&self, disk_id: &str) -> bool {
        self.lock()
            .values()
            .any(|e| e.run.is_some() && e.config.disks.iter().any(|d| d.disk_id == disk_id))
    }

    fn name_taken(&self, name: &str, except: &str) -> bool {
        self.lock()
            .values()
            .any(|e| e.config.id != except && e.config.name == name)
    }

    /// Give the VMs the host's switches.
    pub fn set_network(&self, switches: Arc<crate::network::Switches>) {
        let _ = self.network.set(switches);
    }

    /// The host's switches.
    pub fn network(&self) -> Option<Arc<crate::network::Switches>> {
        self.network.get().cloned()
    }

    /// Record what VM `id`'s worker says of its guest; watchers hear of a change.
    pub fn set_guest(&self, id: &str, report: Option<proto::worker::GuestReport>) {
        let info = report.map(|g| proto::v1::GuestInfo {
            heartbeat: g.heartbeat,
            shutdown_service: g.shutdown_service,
            hostname: g.hostname,
            os: g.os,
            addresses: g.addresses,
        });
        let changed = {
            let mut map = self.lock();
            match map.get_mut(id) {
                Some(e) if e.guest != info => {
                    e.guest = info;
                    Some(e.vm())
                }
                _ => None,
            }
        };
        if let Some(vm) = changed {
            self.events.vm_changed(vm);
        }
    }

    /// Switch name → the VMs whose settings have an adapter on it.
    pub fn switch_users(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        let mut m: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for e in self.lock().values() {
            for n in &e.config.nics {
                let v = m.entry(n.switch.clone()).or_default();
                if !v.contains(&e.config.id) {
                    v.push(e.config.id.clone());
                }
            }
        }
        m
    }

    /// Check that every adapter's switch exists and give each adapter without an address
    /// one: the one it had before (same place, same switch) or a new one.
    fn settle_nics(&self, config: &mut VmConfig, old: Option<&VmConfig>) -> AgentResult<()> {
        if config.nics.is_empty() {
            return Ok(());
        }
        let net = self.network().ok_or_else(|| {
            AgentError::precondition("this agent manages no network: adapters cannot be added")
        })?;
        for (i, n) in config.nics.iter().enumerate() {
            if net.get(&n.switch).is_none() {
                return Err(AgentError::invalid(
                    format!("spec.nics[{i}].switch_name"),
                    format!(
                        "no switch '{}' on this host",
                        crate::error::quote(&n.switch)
                    ),
                ));
            }
        }
        let taken: Vec<String> = config.nics.iter().map(|n| n.mac.clone()).collect();
        for (i, n) in config.nics.iter_mut().enumerate() {
            if !n.mac.is_empty() {
                continue;
            }
            let before = old
                .and_then(|o| o.nics.get(i))
                .filter(|o| o.switch == n.switch && !taken.contains(&o.mac))
                .map(|o| o.mac.clone());
            n.mac = before.unwrap_or_else(crate::network::new_mac);
        }
        Ok(())
    }

    pub fn create(&self, spec: &VmSpec) -> AgentResult<Vm> {
        let mut config = validate(
            spec,
            &self.host,
            |id| self.disk_format(id),
            |n| self.name_taken(n, ""),
            |d| self.disks.boots_by_default(d),
        )?;
        self.settle_nics(&mut config, None)?;
        config.id = store::new_id();
        config.created_ms = now_ms();
        // Written under a hidden name and renamed: an agent killed half-way leaves either
        // nothing or a whole VM.
        let tmp = self.layout.vms().join(format!(".new-{}", config.id));
        let dir = self.layout.vm(&config.id);
        let io = |e| AgentError::internal("creating the VM's directory", e);
        std::fs::create_dir_all(&tmp).map_err(io)?;
        store::write_json(&tmp.join(CONFIG), &config).map_err(io)?;
        std::fs::rename(&tmp, &dir).map_err(io)?;
        store::sync_dir(&self.layout.vms()).map_err(io)?;
        let entry = Entry {
            config,
            state: VmState::Off,
            reason: "created".into(),
            changed_ms: now_ms(),
            crash_log: String::new(),
            run: None,
            op: Arc::default(),
            stopping: false,
            guest: None,
        };
        let vm = entry.vm();
        self.lock().insert(vm.id.clone(), entry);
        self.events.vm_changed(vm.clone());
        Ok(vm)
    }

    pub async fn update_spec(&self, id: &str, spec: &VmSpec) -> AgentResult<Vm> {
        let op = self.entry(id, |e| e.op.clone())?;
        let _g = op.lock().await;
        self.require(id, &[VmState::Off, VmState::Crashed], "change its settings")?;
        let old = self.entry(id, |e| e.config.clone())?;
        // A client that does not know boot sources keeps the VM's.
        let mut spec = spec.clone();
        if spec.boot_source == proto::v1::BootSource::Unspecified as i32 {
            spec.boot_source = old.boot_source.to_proto() as i32;
            if old.boot_source == config::Boot::Disk && spec.boot_entry.is_empty() {
                spec.boot_entry = old.boot_entry.clone();
            }
        }
        let mut config = validate(
            &spec,
            &self.host,
            |d| self.disk_format(d),
            |n| self.name_taken(n, id),
            |d| self.disks.boots_by_default(d),
        )?;
        self.settle_nics(&mut config, Some(&old))?;
        config.id = old.id;
        config.created_ms = old.created_ms;
        self.save_config(id, config)
    }

    /// Store `config` as the VM's settings (the entry and `vm.json`).
    fn save_config(&self, id: &str, config: VmConfig) -> AgentResult<Vm> {
        store::write_json(&self.layout.vm(id).join(CONFIG), &config)
            .map_err(|e| AgentError::internal("writing the VM's configuration", e))?;
        self.update(id, |e| e.config = config)
            .ok_or_else(|| AgentError::not_found("VM", id))
    }

    /// Add a library disk; on a running VM a SCSI disk goes to the guest at once.
    pub async fn attach_disk(&self, id: &str, d: &DiskAttachment) -> AgentResult<Vm> {
        let op = self.entry(id, |e| e.op.clone())?;
        let _g = op.lock().await;
        let format = (store::is_id(&d.disk_id))
            .then(|| self.disk_format(&d.disk_id))
            .flatten()
            .ok_or_else(|| {
                AgentError::invalid(
                    "disk.disk_id",
                    format!(
                        "no disk '{}' in the library",
                        crate::error::quote(&d.disk_id)
                    ),
                )
            })?;
        let new = DiskRef::from_attachment(d, format, "disk")?;
        let (state, name, mut config) =
            self.entry(id, |e| (e.state, e.config.name.clone(), e.config.clone()))?;
        let label = self.disk_label(&d.disk_id);
        if config.disks.iter().any(|x| x.disk_id == d.disk_id) {
            return Err(AgentError::invalid(
                "disk.disk_id",
                format!("disk '{label}' is attached to VM '{name}' already"),
            ));
        }
        config.disks.push(new);
        place_disks(&mut config.disks).map_err(|(_, why)| AgentError::invalid("disk.lun", why))?;
        let added = config.disks.last().cloned().expect("just pushed");
        match state {
            VmState::Off | VmState::Crashed => return self.save_config(id, config),
            VmState::Running | VmState::Paused => {}
            other => {
                return Err(AgentError::precondition(format!(
                    "VM '{name}' is {}; cannot add a disk now",
                    state_word(other)
                )));
            }
        }
        if added.bus != Bus::Scsi {
            return Err(AgentError::precondition(format!(
                "VM '{name}' is running: only SCSI disks can be added while it runs \
                 (virtio-blk disks need the VM off)"
            )));
        }
        if let Some(why) = self.disks.busy_reason(&d.disk_id) {
            return Err(AgentError::precondition(format!(
                "disk '{label}' is {why}; cannot add it to VM '{name}'"
            )));
        }
        let path = self
            .disks
            .path_of(&d.disk_id)
            .map_err(|_| AgentError::precondition(format!("disk '{label}' is gone")))?;
        let running = self.running(id)?;
        // Claimed under the lock every start checks, so no VM starting meanwhile writes it too.
        let previous = {
            let mut map = self.lock();
            let only_new = VmConfig {
                disks: vec![added.clone()],
                ..config.clone()
            };
            if let Some((_, other)) = disk_conflict(&map, id, &only_new) {
                return Err(AgentError::precondition(format!(
                    "disk '{label}' is in use by VM '{}', which is {}; cannot add it to VM '{name}'",
                    other.0,
                    state_word(other.1)
                )));
            }
            let e = map
                .get_mut(id)
                .ok_or_else(|| AgentError::not_found("VM", id))?;
            std::mem::replace(&mut e.config, config.clone())
        };
        let call = running
            .conn
            .call(request::Kind::AttachDisk(proto::worker::AttachDisk {
                path: path.to_string_lossy().into_owned(),
                read_only: added.read_only,
                id: added.disk_id.clone(),
                controller: u32::from(added.controller),
                lun: added.lun.map(u32::from),
                discard: !added.read_only,
            }))
            .await;
        if let Err(e) = call {
            self.update(id, |e| e.config = previous);
            return Err(e);
        }
        self.save_config(id, config)
    }

    /// Take a disk away; on a running VM only a SCSI disk, which the guest loses at once.
    pub async fn detach_disk(&self, id: &str, disk_id: &str) -> AgentResult<Vm> {
        let op = self.entry(id, |e| e.op.clone())?;
        let _g = op.lock().await;
        let (state, name, mut config) =
            self.entry(id, |e| (e.state, e.config.name.clone(), e.config.clone()))?;
        let label = self.disk_label(disk_id);
        let i = config
            .disks
            .iter()
            .position(|d| d.disk_id == disk_id)
            .ok_or_else(|| {
                AgentError::invalid(
                    "disk_id",
                    format!(
                        "disk '{}' is not attached to VM '{name}'",
                        crate::error::quote(&label)
                    ),
                )
            })?;
        let gone = config.disks.remove(i);
        match state {
            VmState::Off | VmState::Crashed => {}
            VmState::Running | VmState::Paused if gone.bus == Bus::Scsi => {
                let running = self.running(id)?;
                running
                    .conn
                    .call(request::Kind::DetachDisk(gone.disk_id.clone()))
                    .await?;
            }
            VmState::Running | VmState::Paused => {
                return Err(AgentError::precondition(format!(
                    "VM '{name}' is running: disk '{label}' is on virtio-blk, which can only \
                     be removed with the VM off"
                )));
            }
            other => {
                return Err(AgentError::precondition(format!(
                    "VM '{name}' is {}; cannot remove a disk now",
                    state_word(other)
                )));
            }
        }
        self.save_config(id, config)
    }

    pub async fn delete(&self, id: &str) -> AgentResult<()> {
        let op = self.entry(id, |e| e.op.clone())?;
        let _g = op.lock().await;
        self.require(id, &[VmState::Off, VmState::Crashed], "delete it")?;
        let dir = self.layout.vm(id);
        let gone = self.layout.vms().join(format!(".deleted-{id}"));
        std::fs::rename(&dir, &gone).map_err(|e| AgentError::internal("deleting the VM", e))?;
        let _ = store::sync_dir(&self.layout.vms());
        let _ = std::fs::remove_dir_all(&gone);
        self.lock().remove(id);
        self.events.vm_deleted(id.to_string());
        Ok(())
    }

    /// The format of a library disk (None: no such disk).
    fn disk_format(&self, id: &str) -> Option<DiskFormat> {
        self.disks
            .get(id)
            .ok()
            .map(|d| DiskFormat::try_from(d.format).unwrap_or(DiskFormat::Unspecified))
    }

    /// A disk's name for messages (its id if it is gone).
    fn disk_label(&self, disk_id: &str) -> String {
        self.disks
            .name_of(disk_id)
            .unwrap_or_else(|_| disk_id.to_string())
    }

    /// FailedPrecondition when what the agent read of the VM's first disk says it cannot
    /// boot, or has no entry the VM asks for. A disk not read yet is left to the worker.
    fn check_disk_boot(&self, config: &VmConfig) -> AgentResult<()> {
        let Some(first) = config.disks.first() else {
            return Err(AgentError::precondition(format!(
                "VM '{}' boots from its disk but has none",
                config.name
            )));
        };
        let Some(info) = self.disks.get(&first.disk_id).ok().and_then(|d| d.boot) else {
            return Ok(());
        };
        let label = self.disk_label(&first.disk_id);
        if !info.bootable {
            return Err(AgentError::precondition(format!(
                "disk '{label}' cannot be booted: {}",
                info.reason
            )));
        }
        let want = config.boot_entry.as_str();
        if !want.is_empty() && config::find_entry(&info.entries, want).is_none() {
            let names: Vec<&str> = info
                .entries
                .iter()
                .map(|e| {
                    if e.version.is_empty() {
                        e.title.as_str()
                    } else {
                        e.version.as_str()
                    }
                })
                .collect();
            return Err(AgentError::precondition(format!(
                "disk '{label}' has no boot entry '{}'; its entries: {}",
                crate::error::quote(want),
                names.join(", ")
            )));
        }
        Ok(())
    }

    /// FailedPrecondition unless the VM is in one of `states`.
    fn require(&self, id: &str, states: &[VmState], to: &str) -> AgentResult<()> {
        let (state, name) = self.entry(id, |e| (e.state, e.config.name.clone()))?;
        if states.contains(&state) {
            Ok(())
        } else {
            Err(AgentError::precondition(format!(
                "VM '{name}' is {}; cannot {to}",
                state_word(state)
            )))
        }
    }

    pub async fn start(self: &Arc<Self>, id: &str) -> AgentResult<Vm> {
        let op = self.entry(id, |e| e.op.clone())?;
        let _g = op.lock().await;
        self.require(id, &[VmState::Off, VmState::Crashed], "start it")?;
        let config = self.entry(id, |e| e.config.clone())?;
        let boot = match config.boot_source {
            config::Boot::Image => {
                Some(self.host.boot_image(&config.boot_image).map_err(|_| {
                    AgentError::precondition(format!(
                        "boot image '{}' is no longer on this host",
                        config.boot_image
                    ))
                })?)
            }
            config::Boot::Disk => {
                self.check_disk_boot(&config)?;
                None
            }
        };
        let mut disks = Vec::new();
        for d in &config.disks {
            let path = self.disks.path_of(&d.disk_id).map_err(|_| {
                AgentError::precondition(format!(
                    "disk '{}' is no longer in the library",
                    d.disk_id
                ))
            })?;
            disks.push((path, d.clone()));
            if let Some(why) = self.disks.busy_reason(&d.disk_id) {
                return Err(AgentError::precondition(format!(
                    "disk '{}' is {why}; cannot start VM '{}'",
                    self.disk_label(&d.disk_id),
                    config.name
                )));
            }
        }
        // A disk written by one running VM is used by no other; checked and claimed (the
        // move to Starting) under one lock, so two starts cannot both pass.
        let vm = {
            let mut map = self.lock();
            if let Some((disk, other)) = disk_conflict(&map, id, &config) {
                drop(map);
                return Err(AgentError::precondition(format!(
                    "disk '{}' is in use by VM '{}', which is {}; cannot start VM '{}'",
                    self.disk_label(&disk),
                    other.0,
                    state_word(other.1),
                    config.name
                )));
            }
            let e = map
                .get_mut(id)
                .ok_or_else(|| AgentError::not_found("VM", id))?;
            e.state = VmState::Starting;
            e.reason = "starting".into();
            e.crash_log.clear();
            e.stopping = false;
            e.changed_ms = now_ms();
            e.vm()
        };
        self.events.vm_changed(vm);
        let dir = self.layout.vm(id);
        let mut nics = Vec::new();
        for (i, n) in config.nics.iter().enumerate() {
            let plugged = match self.network() {
                Some(net) => net.plug(&n.switch, id, i).await,
                None => Err(AgentError::precondition("this agent manages no network")),
            };
            match plugged {
                Ok(fd) => nics.push((fd, n.mac.clone())),
                Err(e) => {
                    self.update(id, |e| {
                        e.state = VmState::Off;
                        e.reason = "its network adapter could not be connected".into();
                    });
                    return Err(e);
                }
            }
        }
        let spawned = process::spawn(
            &self.host.worker_bin,
            &dir,
            &config,
            boot.as_ref(),
            &disks,
            nics,
        );
        let mut child = match spawned {
            Ok(c) => c,
            Err(e) => {
                self.update(id, |e| {
                    e.state = VmState::Crashed;
                    e.reason = "the worker could not be started".into();
                });
                return Err(AgentError::internal("spawning the worker", e));
            }
        };
        let pid = child.id().map_or(0, |p| p as i32);
        if let Ok(run) = RunRecord::of(pid) {
            let _ = store::write_json(&dir.join(RUN), &run);
        }
        // Wait for the control socket; a worker that exits first failed to start. A worker
        // booting its disk reads the kernel first (its reader may take up to two minutes).
        let socket = dir.join(SOCKET);
        let wait = match config.boot_source {
            config::Boot::Image => Duration::from_secs(20),
            config::Boot::Disk => Duration::from_secs(150),
        };
        let deadline = tokio::time::Instant::now() + wait;
        let running = loop {
            if let Ok(Some(status)) = child.try_wait() {
                let (state, reason) = self.exit_outcome(id, Some(status), false);
                let log = self.log_tail(id);
                self.record_exit(id, state, &reason, &log);
                let _ = std::fs::remove_file(dir.join(RUN));
                self.update(id, |e| {
                    e.state = state;
                    e.reason = reason.clone();
                    e.crash_log = log;
                });
                return Err(AgentError::precondition(format!(
                    "VM failed to start: {reason}"
                )));
            }
            if socket.exists()
                && let Ok(r) = self.attach(id, pid).await
            {
                break r;
            }
            if tokio::time::Instant::now() > deadline {
                let _ = child.start_kill();
                let _ = child.wait().await;
                self.update(id, |e| {
                    e.state = VmState::Crashed;
                    e.reason = "the worker did not come up in time".into();
                });
                return Err(AgentError::Unavailable(
                    "the VM's worker did not come up in time".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let vm = self.set_running(id, running.clone(), VmState::Running, "running");
        let vms = self.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            vms.worker_exited(&id, &running, status).await;
        });
        Ok(vm)
    }

    /// Connect to a worker and subscribe to its serial output.
    async fn attach(&self, id: &str, pid: i32) -> AgentResult<Arc<Running>> {
        let dir = self.layout.vm(id);
        let serial = Arc::new(SerialHub::from_log(&dir.join(SERIAL_LOG)));
        let hub = serial.clone();
        let conn = WorkerConn::connect(&dir.join(SOCKET), move |b| hub.push(b), || {})
            .await
            .map_err(|e| {
                tracing::warn!("VM {id}: cannot connect to its worker: {e}");
                AgentError::Unavailable("cannot reach the VM's worker".into())
            })?;
        conn.call(request::Kind::SubscribeSerial(Empty {})).await?;
        let ready = conn
            .call(request::Kind::Query(Empty {}))
            .await?
            .status
            .is_some_and(|s| s.input_ready);
        Ok(Arc::new(Running {
            pid,
            conn,
            input: InputSender::start(&dir.join(SOCKET), ready),
            serial,
            screen: tokio::sync::Mutex::new(None),
            exited: watch::channel(false).0,
        }))
    }

    fn set_running(&self, id: &str, running: Arc<Running>, state: VmState, reason: &str) -> Vm {
        self.update(id, |e| {
            e.run = Some(running);
            e.state = state;
            e.reason = reason.into();
        })
        .unwrap_or_default()
    }

    /// The worker process ended: record how, and release what it held.
    async fn worker_exited(
        &self,
        id: &str,
        running: &Arc<Running>,
        status: Option<std::process::ExitStatus>,
    ) {
        if let Some(s) = running.screen.lock().await.take() {
            s.stop();
        }
        let stopping = self.entry(id, |e| e.stopping).unwrap_or(false);
        let (state, reason) = self.exit_outcome(id, status, stopping);
        let log = if state == VmState::Crashed {
            self.log_tail(id)
        } else {
            String::new()
        };
        self.record_exit(id, state, &reason, &log);
        let _ = std::fs::remove_file(self.layout.vm(id).join(RUN));
        // The guest may have installed or removed kernels on the disks it wrote.
        if let Ok(disks) = self.entry(id, |e| e.config.disks.clone()) {
            for d in disks.iter().filter(|d| !d.read_only) {
                self.disks.reread_boot_entries(&d.disk_id);
            }
        }
        self.update(id, |e| {
            if e.run.as_ref().is_some_and(|r| Arc::ptr_eq(r, running)) {
                e.run = None;
            }
            e.state = state;
            e.reason = reason;
            e.crash_log = log;
            e.stopping = false;
        });
        running.exited.send_replace(true);
    }

    /// What the worker's exit means, from its exit record (written by the worker) or, when
    /// it left none, from how the process ended.
    fn exit_outcome(
        &self,
        id: &str,
        status: Option<std::process::ExitStatus>,
        stopping: bool,
    ) -> (VmState, String) {
        let record: Option<ExitRecord> = store::read_json(&self.layout.vm(id).join(STATUS)).ok();
        process::outcome(record.as_ref(), status, stopping, &self.layout.root)
    }

    /// Remember how the VM stopped (best effort: the state is also in memory).
    fn record_exit(&self, id: &str, state: VmState, reason: &str, log: &str) {
        let last = LastExit {
            crashed: state == VmState::Crashed,
            reason: reason.to_string(),
            crash_log: log.to_string(),
        };
        if let Err(e) = store::write_json(&self.layout.vm(id).join(LAST_EXIT), &last) {
            tracing::warn!("VM {id}: cannot record how it stopped: {e}");
        }
    }

    fn log_tail(&self, id: &str) -> String {
        process::log_tail(&self.layout.vm(id).join(WORKER_LOG), 20, &self.layout.root)
    }

    /// Force off: ask the worker to stop, kill it if it does not.
    pub async fn stop(&self, id: &str) -> AgentResult<Vm> {
        let op = self.entry(id, |e| e.op.clone())?;
        let _g = op.lock().await;
        self.require(
            id,
            &[
                VmState::Starting,
                VmState::Running,
                VmState::Paused,
                VmState::Stopping,
            ],
            "stop it",
        )?;
        let running = self.running(id)?;
        let mut exited = running.exited.subscribe();
        self.update(id, |e| {
            e.state = VmState::Stopping;
            e.reason = "stopping".into();
            e.stopping = true;
        });
        let _ = running.conn.call(request::Kind::Stop(Empty {})).await;
        let done = tokio::time::timeout(Duration::from_secs(10), exited.wait_for(|x| *x))
            .await
            .is_ok();
        if !done {
            tracing::warn!("VM {id}: worker {} did not stop; killing it", running.pid);
            process::kill(running.pid);
            let _ = tokio::time::timeout(Duration::from_secs(10), exited.wait_for(|x| *x)).await;
        }
        self.get(id)
    }

    /// Press the power button.
    pub async fn shutdown(&self, id: &str) -> AgentResult<Vm> {
        self.require(id, &[VmState::Running], "shut it down")?;
        let running = self.running(id)?;
        running
            .conn
            .call(request::Kind::PowerButton(Empty {}))
            .await?;
        self.update(id, |e| {
            e.reason = "shutdown requested (power button)".into()
        })
        .ok_or_else(|| AgentError::not_found("VM", id))
    }

    pub async fn pause(&self, id: &str) -> AgentResult<Vm> {
        self.simple(
            id,
            &[VmState::Running],
            "pause it",
            request::Kind::Pause(Empty {}),
            VmState::Paused,
            "paused",
        )
        .await
    }

    pub async fn resume(&self, id: &str) -> AgentResult<Vm> {
        self.simple(
            id,
            &[VmState::Paused],
            "resume it",
            request::Kind::Resume(Empty {}),
            VmState::Running,
            "running",
        )
        .await
    }

    pub async fn reset(&self, id: &str) -> AgentResult<Vm> {
        self.simple(
            id,
            &[VmState::Running, VmState::Paused],
            "reset it",
            request::Kind::Reset(Empty {}),
            VmState::Running,
            "reset",
        )
        .await
    }

    async fn simple(
        &self,
        id: &str,
        from: &[VmState],
        to: &str,
        req: request::Kind,
        state: VmState,
        reason: &str,
    ) -> AgentResult<Vm> {
        let op = self.entry(id, |e| e.op.clone())?;
        let _g = op.lock().await;
        self.require(id, from, to)?;
        let running = self.running(id)?;
        running.conn.call(req).await?;
        self.update(id, |e| {
            e.state = state;
            e.reason = reason.into();
        })
        .ok_or_else(|| AgentError::not_found("VM", id))
    }

    /// The VM's screen, started on first use.
    pub async fn screen(&self, id: &str) -> AgentResult<Arc<Screen>> {
        let running = self.running(id)?;
        let mut slot = running.screen.lock().await;
        if let Some(s) = slot.as_ref() {
            return Ok(s.clone());
        }
        let (fb, fd) = running.conn.framebuffer().await?;
        let len = rustix::fs::fstat(&fd)
            .map_err(|e| AgentError::internal("guest memory file", std::io::Error::from(e)))?
            .st_size as u64;
        let g = Geometry::validate(&fb, len).ok_or_else(|| {
            AgentError::internal(
                "framebuffer",
                anyhow::anyhow!("worker sent a bad geometry {fb:?}"),
            )
        })?;
        // With a synthetic video device, its geometry and dirty rectangles drive the capture
        // once the guest driver takes over from the boot framebuffer; with KVM's dirty page
        // log, the boot framebuffer's written rows do before that. Without either, the boot
        // framebuffer is polled.
        let socket = running.conn.socket().to_owned();
        let display = tokio::task::spawn_blocking(move || crate::worker::display_blocking(&socket))
            .await
            .map_err(|e| AgentError::internal("display subscription", e))?
            .ok();
        let s = Screen::start_with_display(fd, g, display)
            .map_err(|e| AgentError::internal("starting screen capture", e))?;
        *slot = Some(s.clone());
        Ok(s)
    }

    /// VMs marked autostart that are off.
    pub fn autostart_ids(&self) -> Vec<String> {
        self.lock()
            .values()
            .filter(|e| e.config.autostart && e.state == VmState::Off)
            .map(|e| e.config.id.clone())
            .collect()
    }

    /// The path of a VM's directory (tests and diagnostics).
    pub fn dir(&self, id: &str) -> PathBuf {
        self.layout.vm(id)
    }

    /// Whether any VM has this name (for the demo VM).
    pub fn find_by_name(&self, name: &str) -> Option<String> {
        self.lock()
            .values()
            .find(|e| e.config.name == name)
            .map(|e| e.config.id.clone())
    }
}

fn state_word(s: VmState) -> &'static str {
    match s {
        VmState::Off | VmState::Unspecified => "off",
        VmState::Starting => "starting",
        VmState::Running => "running",
        VmState::Paused => "paused",
        VmState::Stopping => "stopping",
        VmState::Crashed => "crashed",
    }
}

/// Text from a worker made fit for clients: terminal escape sequences (a log's colours) and
/// other control characters but newlines and tabs removed, the state directory replaced with
/// a neutral word.
pub fn scrub(text: &str, root: &Path) -> String {
    let plain = strip_controls(text);
    let root = root.display().to_string();
    if root.is_empty() {
        return plain;
    }
    plain.replace(&root, "<state>")
}

/// `text` without ANSI escape sequences (CSI `ESC [ … final`, OSC `ESC ] … BEL/ST`, and
/// two-character `ESC x`) and without control characters other than `\n` and `\t`.
fn strip_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.next() {
                // CSI: parameters and intermediates, then one final byte in @..=~.
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC: up to BEL or ESC \.
                Some(']') => {
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' {
                            break;
                        }
                        if c == '\u{1b}' {
                            chars.next_if_eq(&'\\');
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\n' | '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// The first disk of `config` that another VM which is not off also uses, where either of
/// the two writes it: (disk id, (other VM's name, its state)).
fn disk_conflict(
    map: &HashMap<String, Entry>,
    id: &str,
    config: &VmConfig,
) -> Option<(String, (String, VmState))> {
    map.iter()
        .filter(|(other, e)| {
            other.as_str() != id && !matches!(e.state, VmState::Off | VmState::Crashed)
        })
        .find_map(|(_, e)| {
            config.disks.iter().find_map(|d| {
                e.config
                    .disks
                    .iter()
                    .find(|o| o.disk_id == d.disk_id && !(o.read_only && d.read_only))
                    .map(|_| (d.disk_id.clone(), (e.config.name.clone(), e.state)))
            })
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn worker_text_loses_colours_and_control_characters() {
        let root = std::path::Path::new("/var/lib/parvis");
        let log = "\u{1b}[2m2026-12-07T18:00:00Z\u{1b}[0m \u{1b}[31mERROR\u{1b}[0m \
                   \u{1b}]8;;http://x\u{7}link\u{1b}]8;;\u{1b}\\ cannot open \
                   /var/lib/parvis/vms/a/disk\r\u{0}\n\tnext";
        assert_eq!(
            super::scrub(log, root),
            "2026-12-07T18:00:00Z ERROR link cannot open <state>/vms/a/disk\n\tnext"
        );
    }

    use super::*;
    use config::DiskRef;

    fn entry(name: &str, state: VmState, disks: &[(&str, bool)]) -> Entry {
        Entry {
            config: VmConfig {
                id: name.into(),
                name: name.into(),
                cpus: 1,
                memory_bytes: 64 << 20,
                disks: disks
                    .iter()
                    .map(|(d, ro)| DiskRef {
                        disk_id: (*d).into(),
                        read_only: *ro,
                        bus: Bus::Virtio,
                        controller: 0,
                        lun: None,
                    })
                    .collect(),
                boot_image: "default".into(),
                boot_source: config::Boot::Image,
                boot_entry: String::new(),
                cmdline: String::new(),
                display_width: 1024,
                display_height: 768,
                autostart: false,
                created_ms: 0,
                nics: Vec::new(),
            },
            state,
            reason: String::new(),
            changed_ms: 0,
            crash_log: String::new(),
            run: None,
            op: Arc::default(),
            stopping: false,
            guest: None,
        }
    }

    #[test]
    fn a_written_disk_belongs_to_one_running_vm() {
        let mut map = HashMap::new();
        map.insert(
            "a".to_string(),
            entry("a", VmState::Running, &[("d1", false)]),
        );
        map.insert("b".to_string(), entry("b", VmState::Off, &[("d1", false)]));
        map.insert(
            "c".to_string(),
            entry("c", VmState::Paused, &[("d2", true)]),
        );
        let me = |disks: &[(&str, bool)]| entry("me", VmState::Off, disks).config;
        // Written by a running VM: refused, whichever way this VM attaches it.
        let hit = disk_conflict(&map, "me", &me(&[("d1", true)])).unwrap();
        assert_eq!(hit, ("d1".to_string(), ("a".to_string(), VmState::Running)));
        assert!(disk_conflict(&map, "me", &me(&[("d1", false)])).is_some());
        // Read-only on both sides: shared. Writing what a paused VM reads: refused.
        assert!(disk_conflict(&map, "me", &me(&[("d2", true)])).is_none());
        assert!(disk_conflict(&map, "me", &me(&[("d2", false)])).is_some());
        // A VM that is off holds nothing, and a VM never conflicts with itself.
        map.get_mut("a").unwrap().state = VmState::Off;
        assert!(disk_conflict(&map, "me", &me(&[("d1", false)])).is_none());
        assert!(disk_conflict(&map, "c", &map["c"].config).is_none());
        // Unrelated disks never conflict.
        assert!(disk_conflict(&map, "me", &me(&[("d3", false)])).is_none());
    }
}
