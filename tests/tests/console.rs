//! The desktop console (`console_gui`) driven through egui_kittest against real agents:
//! a `parvis-agent` started on loopback by each test (hosts, inventory, uploads, dead
//! hosts), and, in `test_host_console_shows_the_running_guest`, an agent with real VMs
//! inside the emulated test host (start a VM, watch its screen, send keys, serial), which
//! also launches the real window under Xvfb and saves a screenshot to
//! `tests/output/console-running-guest.png`.
//!
//! Agents whose worker is the `fake-worker` program run "VMs" (a framebuffer, a guest disk
//! read at 1 MiB/s) without KVM: they show resource graphs, running VMs and their console.
//!
//! Run: `cargo test -p parvis-tests --test console` (the test-host one takes minutes;
//! `-- --skip test_host` leaves it out).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use console_gui::ConsoleApp;
use console_gui::app::{JobState, Selection};
use console_gui::backend::HostStatus;
use console_gui::config::{Config, HostConfig};
use console_gui::upload::Phase;
use egui::accesskit::Role;
use egui_kittest::Harness;
use egui_kittest::kittest::{NodeT, Queryable};
use proto::client::{self, Clients, Target};
use proto::v1::{CreateVmRequest, UploadRef, UploadState, VmRef, VmSpec, VmState};

// ---- A real agent on loopback ----------------------------------------------------------------

struct Agent {
    child: Child,
    addr: String,
    token: String,
    fingerprint: String,
    /// The agent's state folder.
    state: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Agent {
    /// `parvis-agent` with TLS on 127.0.0.1 (a free port), no usable worker: it serves
    /// hosts, VMs, disks and uploads; VMs cannot run.
    fn start() -> Agent {
        Agent::with_worker("/bin/false")
    }

    /// An agent whose VMs run on `fake-worker` (no KVM needed): they have a screen and
    /// resource use, and their guest reads its disk at 1 MiB/s.
    fn with_fake_worker() -> Agent {
        Agent::with_worker(env!("CARGO_BIN_EXE_fake-worker"))
    }

    fn with_worker(worker: &str) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(state.join("boot/default")).unwrap();
        std::fs::write(state.join("boot/default/kernel"), b"not a kernel").unwrap();
        let (child, target) = parvis_tests::agent_proc::spawn_agent(
            &state,
            &["--worker", worker],
            Some(&dir.path().join("agent.log")),
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        Agent {
            child,
            addr: target.addr,
            token: target.token,
            fingerprint: target
                .fingerprint
                .expect("the agent printed its fingerprint"),
            state,
            _dir: dir,
        }
    }

    fn target(&self) -> Target {
        Target {
            addr: self.addr.clone(),
            fingerprint: Some(self.fingerprint.clone()),
            token: self.token.clone(),
        }
    }

    fn host(&self, name: &str) -> HostConfig {
        HostConfig {
            name: name.into(),
            addr: self.addr.clone(),
            token: self.token.clone(),
            fingerprint: Some(self.fingerprint.clone()),
        }
    }
}

/// A tokio runtime and a client for checking the agent's side.
struct Check {
    rt: tokio::runtime::Runtime,
    c: Clients,
}

impl Check {
    fn new(t: &Target) -> Check {
        // A worker thread drives the connection between calls too: the agent pings every
        // 30 s and closes a connection whose pings go unanswered, and the test spends
        // minutes watching the console between its own calls.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let c = rt
            .block_on(client::connect(t))
            .expect("the test connects to the agent");
        Check { rt, c }
    }

    fn create_vm(&mut self, spec: VmSpec) -> String {
        let c = &mut self.c;
        self.rt
            .block_on(c.vm.create_vm(CreateVmRequest { spec: Some(spec) }))
            .expect("CreateVm")
            .into_inner()
            .id
    }

    /// Type `bytes` into the VM's serial console.
    fn serial_send(&mut self, vm_id: &str, bytes: &[u8]) {
        let msg = proto::v1::SerialInput {
            vm_id: vm_id.to_string(),
            data: bytes.to_vec().into(),
        };
        let c = &mut self.c;
        self.rt.block_on(async {
            let mut out = c
                .console
                .serial_console(tokio_stream::iter(vec![msg]))
                .await
                .expect("SerialConsole")
                .into_inner();
            // Read until the guest echoes the command: the bytes reached it.
            let want = String::from_utf8_lossy(bytes).trim().to_string();
            let mut seen = String::new();
            let echo = async {
                while let Ok(Some(m)) = out.message().await {
                    seen.push_str(&String::from_utf8_lossy(&m.data));
                    if !m.scrollback && seen.contains(&want) {
                        break;
                    }
                }
            };
            // The screen check that follows says whether the command ran.
            let _ = tokio::time::timeout(Duration::from_secs(30), echo).await;
        });
    }

    fn get_vm(&mut self, id: &str) -> proto::v1::Vm {
        let c = &mut self.c;
        self.rt
            .block_on(c.vm.get_vm(VmRef {
                vm_id: id.to_string(),
            }))
            .expect("GetVm")
            .into_inner()
    }

    fn start_vm(&mut self, id: &str) {
        let c = &mut self.c;
        self.rt
            .block_on(c.vm.start_vm(VmRef {
                vm_id: id.to_string(),
            }))
            .expect("StartVm");
    }

    fn stop_vm(&mut self, id: &str) {
        let c = &mut self.c;
        let _ = self.rt.block_on(c.vm.stop_vm(VmRef {
            vm_id: id.to_string(),
        }));
    }

    fn create_disk(&mut self, name: &str, format: proto::v1::DiskFormat) -> String {
        let c = &mut self.c;
        let variant = if format == proto::v1::DiskFormat::Raw {
            proto::v1::DiskVariant::Fixed
        } else {
            proto::v1::DiskVariant::Dynamic
        };
        self.rt
            .block_on(c.disk.create_disk(proto::v1::CreateDiskRequest {
                name: name.into(),
                format: format as i32,
                variant: variant as i32,
                size: 16 << 20,
                logical_sector_size: 0,
            }))
            .expect("CreateDisk")
            .into_inner()
            .id
    }

    fn upload_state(&mut self, id: &str) -> proto::v1::UploadStatus {
        let c = &mut self.c;
        self.rt
            .block_on(c.disk.get_upload(UploadRef {
                upload_id: id.to_string(),
            }))
            .expect("GetUpload")
            .into_inner()
    }
}

fn spec(name: &str, cmdline: &str) -> VmSpec {
    VmSpec {
        name: name.into(),
        cpus: 1,
        memory_bytes: 256 << 20,
        boot_image: "default".into(),
        cmdline: cmdline.into(),
        display_width: 1024,
        display_height: 768,
        ..Default::default()
    }
}

// ---- Driving the app ----------------------------------------------------------------------------

type App = Harness<'static, ConsoleApp>;

fn app(config: Option<PathBuf>) -> App {
    app_sized(config, [1400.0, 900.0])
}

fn app_sized(config: Option<PathBuf>, size: [f32; 2]) -> App {
    Harness::builder()
        .with_size(size)
        .with_accessibility_check(false)
        .build_eframe(move |cc| ConsoleApp::new(&cc.egui_ctx, config).expect("the app starts"))
}

fn steps(h: &mut App, n: usize) {
    for _ in 0..n {
        h.step();
    }
}

/// Run frames until `cond` holds (the network answers on its own threads), then one more:
/// the state may change between a frame and the check, and the next click must find the
/// widgets that state shows.
fn wait(h: &mut App, what: &str, secs: u64, mut cond: impl FnMut(&mut App) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        h.step();
        if cond(h) {
            h.step();
            return;
        }
        if Instant::now() > deadline {
            let s = h.state();
            let jobs: Vec<String> = s
                .jobs()
                .iter()
                .map(|j| format!("{} {:?}", j.title, j.state))
                .collect();
            let hosts: Vec<String> = s
                .hosts()
                .iter()
                .map(|h| format!("{}: {:?}, {} VMs", h.cfg.name, h.status, h.vms.len()))
                .collect();
            panic!(
                "{what}: not within {secs} s\nhosts: {hosts:?}\njobs: {jobs:?}\nevents: {:?}",
                s.event_log().take(10).collect::<Vec<_>>()
            );
        }
        std::thread::sleep(Duration::from_millis(15));
    }
}

fn type_into(h: &mut App, label: &str, text: &str) {
    h.get_by_label(label).focus();
    h.step();
    h.get_by_label(label).type_text(text);
    h.step();
}

/// Some widget's label contains `text`.
fn has_text(h: &App, text: &str) -> bool {
    h.query_all_by_label_contains(text).next().is_some()
}

/// Click, then let new windows lay themselves out (a window is invisible in its first frame).
fn click(h: &mut App, label: &str) {
    h.get_by_label(label).click();
    steps(h, 4);
}

/// The value field (a DragValue) labelled `label`; the same words may label other things.
fn spin<'a>(h: &'a App, label: &'a str) -> egui_kittest::Node<'a> {
    h.get_all_by_label(label)
        .find(|n| n.accesskit_node().role() == Role::SpinButton)
        .unwrap_or_else(|| panic!("no value field labelled {label}"))
}

/// Click the entry `label` of the open right-click menu (the toolbar may show the same
/// action; the menu is drawn last).
fn menu_click(h: &mut App, label: &str) {
    h.get_all_by_label(label)
        .last()
        .unwrap_or_else(|| panic!("no menu entry {label}"))
        .click();
    steps(h, 4);
}

fn disabled(h: &App, label: &str) -> bool {
    h.get_by_label(label).accesskit_node().is_disabled()
}

/// The text of the first label containing `text`.
fn text_with(h: &App, text: &str) -> Option<String> {
    h.query_all_by_label_contains(text).next().map(|n| {
        let n = n.accesskit_node();
        n.value().or_else(|| n.label()).unwrap_or_default()
    })
}

/// One sentence for people: no status dumps, transport chains or line breaks.
fn assert_plain(what: &str, s: &str) {
    assert!(!s.is_empty(), "{what}: empty");
    for bad in [
        "Status {",
        "transport error",
        "tcp connect",
        "os error",
        "rustls",
        "h2 protocol",
        "Unauthenticated",
        "code:",
        "\n",
    ] {
        assert!(!s.contains(bad), "{what}: {bad:?} in {s:?}");
    }
    assert!(!s.contains(". "), "{what}: more than one sentence: {s:?}");
    assert!(s.len() < 200, "{what}: too long for one sentence: {s:?}");
}

fn host_status(h: &App, name: &str) -> Option<HostStatus> {
    h.state().host_by_name(name).map(|h| h.status.clone())
}

fn vm_names(h: &App, host: &str) -> Vec<String> {
    let mut v: Vec<String> = h
        .state()
        .host_by_name(host)
        .map(|h| {
            h.vms
                .values()
                .filter_map(|v| v.spec.as_ref().map(|s| s.name.clone()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn vm_state(h: &App, host: &str, vm: &str) -> Option<i32> {
    h.state().host_by_name(host).and_then(|h| {
        h.vms
            .values()
            .find(|v| v.spec.as_ref().is_some_and(|s| s.name == vm))
            .map(|v| v.state)
    })
}

fn write_config(dir: &Path, hosts: Vec<HostConfig>) -> PathBuf {
    let p = dir.join("console.json");
    Config { hosts }.save(&p).unwrap();
    p
}

/// A file dropped onto the window (only its path: the console streams from it).
#[derive(Debug)]
struct Dropped(PathBuf);

impl egui::DroppedFile for Dropped {
    fn path(&self) -> &Path {
        &self.0
    }

    fn bytes(&self) -> Result<Vec<u8>, String> {
        Err("the console must not load a dropped disk image into memory".into())
    }
}

fn drop_file(h: &mut App, path: &Path) {
    h.input_mut()
        .dropped_files
        .push(Arc::new(Dropped(path.to_path_buf())));
    h.step();
}

/// A 64 MiB dynamic VHDX whose first 6 MiB hold a pattern.
fn make_vhdx(path: &Path) {
    use parvis_disk::image::{CreateOptions, Variant, create};
    let img = create(
        path,
        &CreateOptions {
            format: parvis_disk::ImageFormat::Vhdx,
            variant: Variant::Dynamic,
            size: 64 << 20,
            block_size: None,
            logical_sector_size: 512,
        },
    )
    .unwrap();
    img.device()
        .write_at(&parvis_tests::pattern(6 << 20, 7), 0)
        .unwrap();
    img.device().flush().unwrap();
}

fn last_job(h: &App) -> (u64, String, JobState) {
    let j = &h.state().jobs()[0];
    (j.id, j.title.clone(), j.state.clone())
}

fn upload_phase(h: &App, job: u64) -> Option<(Phase, u64, u64, String)> {
    h.state()
        .jobs()
        .iter()
        .find(|j| j.id == job)
        .and_then(|j| j.upload.as_ref())
        .map(|(p, _)| {
            let (phase, done, total) = p.get();
            (phase, done, total, p.upload_id())
        })
}

// ---- Tests against a loopback agent ----------------------------------------------------------

#[test]
fn add_host_confirm_fingerprint_and_follow_the_inventory() {
    let agent = Agent::start();
    let mut check = Check::new(&agent.target());
    check.create_vm(spec("alpha", ""));
    check.create_vm(spec("beta", ""));
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("console.json");
    let mut h = app(Some(cfg.clone()));
    steps(&mut h, 2);

    click(&mut h, "Add host…");
    type_into(&mut h, "Host name", "lab");
    type_into(&mut h, "Address", &agent.addr);
    type_into(&mut h, "Token", &agent.token);
    click(&mut h, "Connect to host");
    // Trust on first use: the fingerprint is shown for confirmation before anything is saved.
    let fp = agent.fingerprint.clone();
    wait(&mut h, "the fingerprint shown for confirmation", 30, |h| {
        h.query_by_label(&fp).is_some()
    });
    assert!(!cfg.exists(), "nothing is saved before the user confirms");
    click(&mut h, "Trust and save");
    wait(&mut h, "the host online with its two VMs", 30, |h| {
        host_status(h, "lab") == Some(HostStatus::Online) && vm_names(h, "lab").len() == 2
    });
    assert!(h.query_by_label("alpha").is_some() && h.query_by_label("beta").is_some());
    let saved = Config::load(&cfg).unwrap();
    assert_eq!(saved.hosts.len(), 1);
    assert!(client::same_fingerprint(
        saved.hosts[0].fingerprint.as_deref().unwrap(),
        &agent.fingerprint
    ));

    // Live updates from the event stream: a VM made elsewhere appears by itself.
    check.create_vm(spec("gamma", ""));
    wait(&mut h, "the new VM listed", 20, |h| {
        h.query_by_label("gamma").is_some()
    });

    // Search narrows the list.
    type_into(&mut h, "Search:", "gam");
    steps(&mut h, 2);
    assert!(h.query_by_label("gamma").is_some());
    assert!(h.query_by_label("alpha").is_none(), "search hides alpha");
    h.get_by_label("Search:").focus();
    h.step();
    for _ in 0..3 {
        h.key_press(egui::Key::Backspace);
    }
    steps(&mut h, 3);
    assert!(h.query_by_label("alpha").is_some());

    // Start (this machine cannot run VMs: the outcome is reported in plain words).
    click(&mut h, "alpha");
    assert!(matches!(h.state().selection, Some(Selection::Vm(..))));
    click(&mut h, "Start");
    let (_, title, _) = last_job(&h);
    assert_eq!(title, "Start VM 'alpha'");
    wait(&mut h, "the start to end", 30, |h| {
        last_job(h).2 != JobState::Running
    });
    if let JobState::Failed(e) = last_job(&h).2 {
        assert!(!e.contains("Status {"), "errors are in plain words: {e}");
        assert!(has_text(&h, "cannot start the VM"));
    }

    // Delete, with confirmation.
    click(&mut h, "beta");
    click(&mut h, "Delete…");
    assert!(has_text(&h, "Delete VM 'beta'?"));
    click(&mut h, "Delete");
    wait(&mut h, "beta gone", 20, |h| {
        !vm_names(h, "lab").contains(&"beta".into())
    });

    // A fresh app connects to the saved host at once.
    drop(h);
    let mut h = app(Some(cfg));
    wait(&mut h, "the saved host reconnected", 30, |h| {
        host_status(h, "lab") == Some(HostStatus::Online) && vm_names(h, "lab").len() == 2
    });
}

#[test]
fn dropped_vhdx_uploads_and_becomes_a_vm() {
    let agent = Agent::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), vec![agent.host("lab")]);
    let image = dir.path().join("web.vhdx");
    make_vhdx(&image);
    let mut h = app(Some(cfg));
    wait(&mut h, "online", 30, |h| {
        host_status(h, "lab") == Some(HostStatus::Online)
    });

    // Not a disk image: refused before anything is sent.
    let junk = dir.path().join("notes.vhdx");
    std::fs::write(&junk, vec![b'x'; 4 << 20]).unwrap();
    drop_file(&mut h, &junk);
    wait(&mut h, "the bad file refused", 20, |h| {
        last_job(h).2 != JobState::Running
    });
    match last_job(&h).2 {
        JobState::Failed(e) => assert!(e.contains("neither a VHDX"), "{e}"),
        s => panic!("a text file was accepted: {s:?}"),
    }

    drop_file(&mut h, &image);
    let (job, title, _) = last_job(&h);
    assert_eq!(title, "Import web.vhdx");
    let mut saw_progress = false;
    wait(&mut h, "the upload to finish", 120, |h| {
        if let Some((_, done, total, _)) = upload_phase(h, job) {
            saw_progress |= total > 0 && done > 0;
        }
        last_job(h).2 != JobState::Running
    });
    assert!(saw_progress, "progress was shown");
    match last_job(&h).2 {
        JobState::Succeeded(t) => assert!(t.contains("web.vhdx"), "{t}"),
        s => panic!("the upload did not succeed: {s:?}"),
    }
    // On success the console offers a VM made from the new disk.
    wait(&mut h, "the offer to create a VM", 10, |h| {
        has_text(h, "Create a VM from it?")
    });
    click(&mut h, "Create VM…");
    assert!(
        h.query_by_label("VM name").is_some(),
        "the create-VM dialog opened"
    );
    click(&mut h, "Create");
    wait(&mut h, "the VM made from the disk", 30, |h| {
        vm_names(h, "lab") == vec!["web".to_string()]
    });
    let host = h.state().host_by_name("lab").unwrap();
    let vm = host.vms.values().next().unwrap();
    let disk = host.disks.values().find(|d| d.name == "web.vhdx").unwrap();
    assert_eq!(vm.spec.as_ref().unwrap().disks[0].disk_id, disk.id);
    assert_eq!(disk.virtual_size, 64 << 20);

    // The disk library lists it, with its format and sizes and the VM that uses it.
    click(&mut h, "Disk library");
    wait(&mut h, "the uploaded disk listed with its VM", 10, |h| {
        h.query_by_label("web.vhdx").is_some() && h.query_by_label("web").is_some()
    });
    assert!(h.query_by_label("VHDX, dynamic").is_some());
    assert!(h.query_by_label("64.0 MiB").is_some());
    // Its right-click menu: a disk in use cannot be deleted, and says why.
    h.get_by_label("web.vhdx").click_secondary();
    steps(&mut h, 4);
    assert!(
        disabled(&h, "Delete disk…"),
        "a disk in use is not deletable"
    );
    // Convert it into a VHD, from the menu.
    menu_click(&mut h, "Convert…");
    assert!(has_text(&h, "A new disk is made"));
    click(&mut h, "Convert");
    wait(&mut h, "the converted disk listed", 60, |h| {
        h.query_by_label("web.vhd").is_some() && last_job(h).2 != JobState::Running
    });
    assert_eq!(last_job(&h).1, "Convert disk 'web.vhdx' to VHD");
    assert!(
        matches!(last_job(&h).2, JobState::Succeeded(_)),
        "{:?}",
        last_job(&h).2
    );
    assert!(h.query_by_label("VHD, dynamic").is_some());
    // Delete the copy, which no VM uses.
    h.get_by_label("web.vhd").click_secondary();
    steps(&mut h, 4);
    assert!(
        h.get_all_by_label("Delete disk…")
            .all(|n| !n.accesskit_node().is_disabled())
    );
    menu_click(&mut h, "Delete disk…");
    click(&mut h, "Delete");
    wait(&mut h, "the copy deleted", 30, |h| {
        h.query_by_label("web.vhd").is_none()
    });
    assert!(h.query_by_label("web.vhdx").is_some(), "the original stays");
}

/// An agent whose worker program is the real `parvis-worker` (VMs are never started here):
/// it reads each imported disk's boot entries with the worker's confined reader.
#[test]
fn an_imported_disk_shows_what_it_boots_and_new_vm_picks_its_boot_entry() {
    let art = parvis_tests::build::artifacts().unwrap_or_else(|e| panic!("{e:#}"));
    let release = std::fs::read_to_string(art.images.join("kernel-release"))
        .unwrap()
        .trim()
        .to_string();
    let agent = Agent::with_worker(art.bin.join("parvis-worker").to_str().unwrap());
    let dir = tempfile::tempdir().unwrap();
    parvis_tests::boot_disks::make(dir.path()).unwrap_or_else(|e| panic!("{e:#}"));
    let cfg = write_config(dir.path(), vec![agent.host("lab")]);
    let mut h = app(Some(cfg));
    wait(&mut h, "online", 30, |h| {
        host_status(h, "lab") == Some(HostStatus::Online)
    });
    drop_file(&mut h, &dir.path().join("gen2.vhdx"));
    wait(&mut h, "the offer to create a VM", 120, |h| {
        has_text(h, "Create a VM from it?")
    });
    // The host reads the disk in the background; the console hears when it has.
    wait(&mut h, "the disk's boot entries", 60, |h| {
        h.state().host_by_name("lab").is_some_and(|x| {
            x.disks
                .values()
                .any(|d| d.boot.as_ref().is_some_and(|b| b.inspected))
        })
    });
    click(&mut h, "Create VM…");
    let summary = "Debian GNU/Linux 12 (bookworm), 2 boot entries";
    assert!(has_text(&h, summary), "New VM shows what the disk boots");
    assert!(has_text(&h, "Its disk's own system"));
    // The entry picker offers the disk's own entries, its default first.
    h.get(egui_kittest::kittest::By::new().predicate(|n| {
        n.value().is_some_and(|v| {
            v == format!("the disk's default (Debian GNU/Linux, with Linux {release})")
        })
    }))
    .click();
    steps(&mut h, 4);
    let options: Vec<String> = h
        .query_all(egui_kittest::kittest::By::new().predicate(|n| {
            n.role() == Role::Button && n.label().is_some_and(|l| l.starts_with("Debian GNU/Linux"))
        }))
        .map(|n| n.accesskit_node().label().unwrap_or_default())
        .collect();
    assert_eq!(
        options,
        [
            "Debian GNU/Linux".to_string(),
            format!("Debian GNU/Linux, with Linux {release}")
        ]
    );
    // Closed again as it was opened, with the default kept.
    h.get(egui_kittest::kittest::By::new().predicate(|n| {
        n.role() == Role::ComboBox
            && n.value()
                .is_some_and(|v| v.starts_with("the disk's default"))
    }))
    .click();
    steps(&mut h, 4);
    click(&mut h, "Create");
    wait(&mut h, "the VM made from the disk", 30, |h| {
        vm_names(h, "lab") == vec!["gen2".to_string()]
    });
    let host = h.state().host_by_name("lab").unwrap();
    let spec = host.vms.values().next().unwrap().spec.clone().unwrap();
    assert_eq!(spec.boot_source, proto::v1::BootSource::Disk as i32);
    assert_eq!(spec.boot_entry, "", "the disk's default");
    // The library says what the disk boots.
    click(&mut h, "Disk library");
    wait(&mut h, "the library's Boots column", 10, |h| {
        has_text(h, "Boots") && has_text(h, summary)
    });
}

#[test]
fn uploads_pause_resume_and_cancel() {
    let agent = Agent::start();
    let mut check = Check::new(&agent.target());
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), vec![agent.host("lab")]);
    let mut h = app(Some(cfg.clone()));
    wait(&mut h, "online", 30, |h| {
        host_status(h, "lab") == Some(HostStatus::Online)
    });
    h.state_mut().selection = h.state().host_by_name("lab").map(|x| Selection::Host(x.id));
    // Every upload pauses by itself once the agent holds 2 MiB.
    h.state_mut().upload_pause_at = Some(2 << 20);

    // Pause, then resume from the agent's verified offset. A new upload has no checksum
    // pass before it: the file is hashed as it is sent.
    let first = dir.path().join("first.vhdx");
    make_vhdx(&first);
    drop_file(&mut h, &first);
    let (job, _, _) = last_job(&h);
    let mut hashed = false;
    wait(&mut h, "the upload paused", 60, |h| {
        hashed |= upload_phase(h, job).is_some_and(|p| p.0 == Phase::Hashing);
        upload_phase(h, job).is_some_and(|p| p.0 == Phase::Paused)
    });
    assert!(!hashed, "a new upload is not hashed before it is sent");
    let (_, done, total, id) = upload_phase(&h, job).unwrap();
    assert_eq!(done, 2 << 20);
    assert!(total > done);
    // The disk library shows the upload while it runs.
    click(&mut h, "Disk library");
    assert!(
        h.query_by_label("first.vhdx").is_some(),
        "the running upload is listed"
    );
    assert!(has_text(&h, "importing: paused"));
    let s = check.upload_state(&id);
    assert_eq!(s.state, UploadState::Receiving as i32);
    assert_eq!(s.verified_offset, 2 << 20, "the agent holds what was sent");
    click(&mut h, "Resume");
    wait(&mut h, "the resumed upload to finish", 120, |h| {
        last_job(h).2 != JobState::Running
    });
    assert!(
        matches!(last_job(&h).2, JobState::Succeeded(_)),
        "{:?}",
        last_job(&h).2
    );
    assert_eq!(check.upload_state(&id).state, UploadState::Done as i32);
    steps(&mut h, 3);
    if h.query_by_label("Not now").is_some() {
        click(&mut h, "Not now");
    }
    wait(&mut h, "the finished upload in the library", 10, |h| {
        h.state()
            .host_by_name("lab")
            .is_some_and(|x| x.disks.values().any(|d| d.name == "first.vhdx"))
    });
    assert!(
        !has_text(&h, "importing"),
        "a finished upload is a disk, not an import"
    );
    click(&mut h, "Inventory");

    // Cancel mid-way: the agent drops the upload.
    let second = dir.path().join("second.vhdx");
    make_vhdx(&second);
    drop_file(&mut h, &second);
    let (job, _, _) = last_job(&h);
    wait(&mut h, "the second upload paused", 60, |h| {
        upload_phase(h, job).is_some_and(|p| p.0 == Phase::Paused)
    });
    let id = upload_phase(&h, job).unwrap().3;
    click(&mut h, "Cancel");
    wait(&mut h, "the cancel to land", 30, |h| {
        last_job(h).2 != JobState::Running
    });
    match last_job(&h).2 {
        JobState::Failed(e) => assert!(e.contains("cancelled"), "{e}"),
        s => panic!("not cancelled: {s:?}"),
    }
    assert_eq!(check.upload_state(&id).state, UploadState::Cancelled as i32);

    // Restart: importing the same file again resumes the host's upload (the console
    // remembers unfinished uploads beside its config), hashing only what the host has.
    let third = dir.path().join("third.vhdx");
    make_vhdx(&third);
    drop_file(&mut h, &third);
    let (job, _, _) = last_job(&h);
    wait(&mut h, "the third upload paused", 60, |h| {
        upload_phase(h, job).is_some_and(|p| p.0 == Phase::Paused)
    });
    let id = upload_phase(&h, job).unwrap().3;
    drop(h);
    let mut h = app(Some(cfg));
    wait(&mut h, "online again", 30, |h| {
        host_status(h, "lab") == Some(HostStatus::Online)
    });
    h.state_mut().selection = h.state().host_by_name("lab").map(|x| Selection::Host(x.id));
    drop_file(&mut h, &third);
    let (job, _, _) = last_job(&h);
    let mut hashed_of = 0;
    wait(&mut h, "the resumed upload to finish", 120, |h| {
        if let Some(p) = upload_phase(h, job).filter(|p| p.0 == Phase::Hashing) {
            hashed_of = hashed_of.max(p.2);
        }
        last_job(h).2 != JobState::Running
    });
    assert!(
        matches!(last_job(&h).2, JobState::Succeeded(_)),
        "{:?}",
        last_job(&h).2
    );
    assert_eq!(
        upload_phase(&h, job).unwrap().3,
        id,
        "the same upload went on"
    );
    assert!(
        hashed_of <= 2 << 20,
        "a resumed upload hashes what the host has, not the file ({hashed_of} bytes)"
    );
    assert_eq!(check.upload_state(&id).state, UploadState::Done as i32);
}

#[test]
fn dead_hosts_are_shown_offline_and_the_ui_keeps_responding() {
    let agent = Agent::start();
    // Nothing listens here.
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    // Accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let fake_fp = client::fingerprint_of(b"no certificate");
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        vec![
            agent.host("alive"),
            HostConfig {
                name: "refused".into(),
                addr: refused,
                token: "pvs_x".into(),
                fingerprint: Some(fake_fp.clone()),
            },
            HostConfig {
                name: "silent".into(),
                addr: silent_addr,
                token: "pvs_x".into(),
                fingerprint: Some(fake_fp),
            },
        ],
    );
    let mut h = app(Some(cfg));
    let mut slowest = Duration::ZERO;
    let mut frames = 0u32;
    let mut timed = |h: &mut App, what: &str, secs: u64, cond: &dyn Fn(&App) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let t = Instant::now();
            h.step();
            slowest = slowest.max(t.elapsed());
            frames += 1;
            if cond(h) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: not within {secs} s");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    timed(&mut h, "alive online, refused offline", 30, &|h| {
        host_status(h, "alive") == Some(HostStatus::Online)
            && matches!(host_status(h, "refused"), Some(HostStatus::Offline { .. }))
    });
    if let Some(HostStatus::Offline { error, .. }) = host_status(&h, "refused") {
        assert!(error.contains("nothing answers"), "{error}");
    }
    assert!(has_text(&h, "offline: nothing answers"));
    // The silent host stays "connecting" without holding up a single frame, then gives up.
    timed(&mut h, "silent offline", 40, &|h| {
        matches!(host_status(h, "silent"), Some(HostStatus::Offline { .. }))
    });
    // A host that dies is noticed.
    drop(agent);
    timed(&mut h, "the killed host offline", 40, &|h| {
        matches!(host_status(h, "alive"), Some(HostStatus::Offline { .. }))
    });
    assert!(frames > 100, "only {frames} frames");
    assert!(
        slowest < Duration::from_millis(250),
        "a frame took {slowest:?} while hosts were slow or dead"
    );
    drop(silent);
}

/// Select `name`'s row (a host or a VM) in the inventory.
fn select(h: &mut App, name: &str) {
    click(h, name);
}

#[test]
fn the_details_pane_graphs_fill_from_the_agent() {
    let agent = Agent::with_fake_worker();
    let mut check = Check::new(&agent.target());
    let id = check.create_vm(VmSpec {
        memory_bytes: 64 << 20,
        ..spec("sampled", "")
    });
    check.start_vm(&id);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), vec![agent.host("lab")]);
    let mut h = app(Some(cfg));
    wait(&mut h, "the host online with its running VM", 30, |h| {
        vm_state(h, "lab", "sampled") == Some(VmState::Running as i32)
    });
    select(&mut h, "sampled");
    assert!(
        has_text(&h, "VM 'sampled'"),
        "the details pane names the VM"
    );
    // The agent's history first, then a sample every 2 s: the guest reads 1 MiB/s.
    wait(&mut h, "the VM's graphs filled", 30, |h| {
        h.state().watched_stats().is_some_and(|(n, last)| {
            n >= 3 && last.is_some_and(|s| s.disk_read_bytes_per_s > 512 << 10)
        })
    });
    let (_, last) = h.state().watched_stats().unwrap();
    let last = last.unwrap();
    assert_eq!(last.memory_total_bytes, 64 << 20);
    let disk = text_with(&h, "Disk: read ").expect("the disk graph's title");
    assert!(
        disk.contains("MiB/s") || disk.contains("KiB/s"),
        "the disk graph says how fast: {disk}"
    );
    assert!(has_text(&h, "CPU: "));
    assert!(has_text(&h, "guest RAM 64.0 MiB"));
    assert!(has_text(&h, "Disk operations: "));
    assert!(has_text(&h, "vda (virtio-blk)") || has_text(&h, "No disks"));

    // The settings of a running VM are greyed, saying why.
    click(&mut h, "Settings…");
    assert!(has_text(
        &h,
        "VM 'sampled' is running; shut it down to change its settings."
    ));
    assert!(spin(&h, "CPUs").accesskit_node().is_disabled());
    assert!(disabled(&h, "Save"));
    click(&mut h, "Cancel");

    // The host's pane: what it is, and its own graphs (CPU, memory, free space).
    select(&mut h, "lab");
    assert!(has_text(&h, "Host lab"));
    wait(&mut h, "the host's graphs filled", 30, |h| {
        h.state().watched_stats().is_some_and(|(n, last)| {
            n >= 1 && last.is_some_and(|s| s.disk_total_bytes > 0 && s.memory_total_bytes > 0)
        })
    });
    assert!(has_text(&h, "Disk space for the library: "));
    assert!(has_text(&h, "Memory: "));
    check.stop_vm(&id);
}

/// The running VM's disks in the details pane: a SCSI disk added and removed while it runs,
/// a virtio-blk one's Remove greyed with the reason.
#[test]
fn disks_join_and_leave_a_running_vm_from_the_details_pane() {
    let agent = Agent::with_fake_worker();
    let mut check = Check::new(&agent.target());
    let raw = check.create_disk("scratch", proto::v1::DiskFormat::Raw);
    check.create_disk("data", proto::v1::DiskFormat::Vhdx);
    let id = check.create_vm(VmSpec {
        memory_bytes: 64 << 20,
        disks: vec![proto::v1::DiskAttachment {
            disk_id: raw.clone(),
            ..Default::default()
        }],
        ..spec("busy", "")
    });
    check.start_vm(&id);
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), vec![agent.host("lab")]);
    let mut h = app(Some(cfg));
    wait(&mut h, "the host online with its running VM", 30, |h| {
        vm_state(h, "lab", "busy") == Some(VmState::Running as i32)
    });
    select(&mut h, "busy");
    assert!(
        has_text(&h, "vda (virtio-blk)"),
        "the raw disk sits on virtio-blk"
    );
    assert!(disabled(&h, "Remove"), "virtio-blk stays while the VM runs");
    // Add the VHDX: on a running VM it goes on SCSI, at the first LUN.
    click(&mut h, "Add disk (SCSI)…");
    menu_click(&mut h, "data (16.0 MiB)");
    wait(&mut h, "the disk added", 30, |h| has_text(h, "SCSI 0:0"));
    let v = check.get_vm(&id);
    let disks = v.spec.unwrap().disks;
    assert_eq!(disks.len(), 2);
    assert_eq!(disks[1].bus, proto::v1::DiskBus::Scsi as i32);
    // And take it away again: its Remove is the enabled one.
    let remove = h
        .get_all_by_label("Remove")
        .find(|n| !n.accesskit_node().is_disabled())
        .expect("the SCSI disk's Remove is enabled");
    remove.click();
    steps(&mut h, 4);
    wait(&mut h, "the disk removed", 30, |h| !has_text(h, "SCSI 0:0"));
    assert_eq!(check.get_vm(&id).spec.unwrap().disks.len(), 1);
    check.stop_vm(&id);
}

#[test]
fn vm_settings_reach_the_agent_and_a_refusal_shows_its_reason() {
    let agent = Agent::start();
    let mut check = Check::new(&agent.target());
    let id = check.create_vm(spec("alpha", ""));
    check.create_vm(spec("beta", ""));
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), vec![agent.host("lab")]);
    let mut h = app(Some(cfg));
    wait(&mut h, "online with two VMs", 30, |h| {
        vm_names(h, "lab").len() == 2
    });
    select(&mut h, "alpha");
    click(&mut h, "Settings…");
    assert!(has_text(&h, "Settings of VM 'alpha' on lab"));
    assert!(disabled(&h, "Save"), "nothing changed yet");
    // Checked here as the agent checks it: a name another VM has.
    h.get_by_label("VM name").focus();
    h.step();
    for _ in 0.."alpha".len() {
        h.key_press(egui::Key::Backspace);
    }
    type_into(&mut h, "VM name", "beta");
    steps(&mut h, 2);
    assert!(has_text(&h, "a VM named 'beta' already exists"));
    assert!(disabled(&h, "Save"));
    h.get_by_label("VM name").focus();
    h.step();
    for _ in 0.."beta".len() {
        h.key_press(egui::Key::Backspace);
    }
    type_into(&mut h, "VM name", "alpha");
    // A change the agent takes: CPUs, memory, autostart.
    spin(&h, "CPUs").set_value_accesskit(2.0);
    h.step();
    spin(&h, "Memory (MiB)").set_value_accesskit(320.0);
    h.step();
    click(&mut h, "Start the VM when the host's agent starts");
    assert!(!disabled(&h, "Save"));
    click(&mut h, "Save");
    wait(
        &mut h,
        "the settings saved and the dialog closed",
        30,
        |h| !h.state().dialog_open(),
    );
    let vm = check.get_vm(&id).spec.unwrap();
    assert_eq!(
        (vm.cpus, vm.memory_bytes, vm.autostart),
        (2, 320 << 20, true)
    );
    assert_eq!(last_job(&h).1, "Change the settings of VM 'alpha'");
    wait(&mut h, "the inventory showing the new settings", 10, |h| {
        h.state()
            .host_by_name("lab")
            .is_some_and(|x| x.vms[&id].spec.as_ref().is_some_and(|s| s.cpus == 2))
    });

    // A change the agent refuses (its boot image went away meanwhile): the dialog stays
    // and says why, in the agent's words.
    std::fs::remove_dir_all(agent.state.join("boot/default")).unwrap();
    click(&mut h, "Settings…");
    spin(&h, "CPUs").set_value_accesskit(3.0);
    h.step();
    click(&mut h, "Save");
    wait(&mut h, "the refusal shown", 30, |h| {
        has_text(h, "no boot image 'default' on this host")
    });
    assert!(h.state().dialog_open(), "the dialog stays open");
    let line = text_with(&h, "no boot image").unwrap();
    assert!(
        line.starts_with("cannot change the settings of VM 'alpha' on lab"),
        "{line}"
    );
    assert_plain("the refusal", &line);
    assert_eq!(check.get_vm(&id).spec.unwrap().cpus, 2, "nothing changed");
    click(&mut h, "Cancel");
}

#[test]
fn a_host_that_cannot_run_vms_says_so() {
    // The agent probes its worker; /bin/false answers nothing, so KVM counts as unusable.
    let agent = Agent::start();
    let mut check = Check::new(&agent.target());
    check.create_vm(spec("alpha", ""));
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), vec![agent.host("lab")]);
    let mut h = app(Some(cfg));
    wait(&mut h, "online", 30, |h| {
        host_status(h, "lab") == Some(HostStatus::Online) && vm_names(h, "lab").len() == 1
    });
    assert!(
        h.query_by_label("online, cannot run VMs").is_some(),
        "the host row does not just say online"
    );
    select(&mut h, "lab");
    let why = text_with(&h, "This host cannot run VMs: ").expect("the host pane says so");
    assert!(
        why.ends_with('.') && why.len() > "This host cannot run VMs: .".len(),
        "{why}"
    );
    assert_plain("the host's capability", why.trim_end_matches('.'));

    // A start there fails with that reason in one sentence naming the VM and the host.
    select(&mut h, "alpha");
    click(&mut h, "Start");
    wait(&mut h, "the start to fail", 30, |h| {
        matches!(last_job(h).2, JobState::Failed(_))
    });
    let JobState::Failed(e) = last_job(&h).2 else {
        unreachable!()
    };
    assert!(
        e.starts_with("cannot start the VM 'alpha' on lab: host lab cannot run VMs"),
        "{e}"
    );
    assert_plain("the failed start", &e);
    let job = &h.state().jobs()[0];
    assert!(
        job.details.contains("FailedPrecondition"),
        "the chain is in the details: {}",
        job.details
    );
    wait(&mut h, "the VM crashed", 10, |h| {
        vm_state(h, "lab", "alpha") == Some(VmState::Crashed as i32)
    });
    assert!(has_text(&h, "It could not run: host lab cannot run VMs"));
    assert!(
        !h.state().event_log().any(|l| l.contains("exit record")),
        "the technical reason stays out of the event log"
    );
}

#[test]
fn the_console_tab_of_an_off_vm_starts_it() {
    let agent = Agent::with_fake_worker();
    let mut check = Check::new(&agent.target());
    let id = check.create_vm(spec("desk", ""));
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), vec![agent.host("lab")]);
    let mut h = app(Some(cfg));
    wait(&mut h, "online", 30, |h| vm_names(h, "lab").len() == 1);
    select(&mut h, "desk");
    click(&mut h, "Open console");
    // Give the screen stream time to be refused (the VM is off): nothing of it shows.
    let settle = Instant::now() + Duration::from_secs(3);
    wait(&mut h, "a moment", 10, |_| Instant::now() > settle);
    assert!(
        h.query_by_label("VM 'desk' is off.").is_some(),
        "one clear state"
    );
    assert!(!has_text(&h, "Waiting for"), "no endless wait");
    assert!(!has_text(&h, "not running"), "no error for an off VM");
    assert!(!has_text(&h, &id), "the VM is named, not numbered");
    for action in [
        "Send keys",
        "Type clipboard text",
        "Screenshot",
        "Screenshot as…",
    ] {
        assert!(disabled(&h, action), "{action} before there is a screen");
    }
    click(&mut h, "Start");
    wait(&mut h, "the VM running and its screen shown", 60, |h| {
        vm_state(h, "lab", "desk") == Some(VmState::Running as i32)
            && h.state().consoles()[0].screen.texture_updates > 0
    });
    assert_eq!(last_job(&h).1, "Start VM 'desk'");
    wait(&mut h, "input enabled", 10, |h| !disabled(h, "Send keys"));
    assert!(!disabled(&h, "Screenshot"));
    assert!(h.query_by_label("VM 'desk' is off.").is_none());
    check.stop_vm(&id);
    wait(&mut h, "the off state again", 30, |h| {
        h.query_by_label("VM 'desk' is off.").is_some()
    });
    assert!(disabled(&h, "Send keys"));
}

#[test]
fn a_dead_host_a_wrong_token_and_a_changed_certificate_read_as_one_sentence() {
    let agent = Agent::start();
    let other = Agent::start();
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(
        dir.path(),
        vec![
            HostConfig {
                name: "dead".into(),
                addr: refused,
                ..agent.host("dead")
            },
            HostConfig {
                token: "pvs_not-the-token".into(),
                ..agent.host("wrong-token")
            },
            HostConfig {
                fingerprint: Some(other.fingerprint.clone()),
                ..agent.host("moved")
            },
        ],
    );
    let mut h = app(Some(cfg));
    wait(&mut h, "all three offline", 40, |h| {
        ["dead", "wrong-token", "moved"]
            .iter()
            .all(|n| matches!(host_status(h, n), Some(HostStatus::Offline { .. })))
    });
    let offline = |h: &App, n: &str| match host_status(h, n) {
        Some(HostStatus::Offline { error, details, .. }) => (error, details),
        s => panic!("{n}: {s:?}"),
    };
    let (dead, tech) = offline(&h, "dead");
    assert!(dead.starts_with("nothing answers at 127.0.0.1:"), "{dead}");
    assert!(
        dead.contains("check that parvis-agent is running"),
        "{dead}"
    );
    assert!(
        tech.to_ascii_lowercase().contains("refused"),
        "details: {tech}"
    );
    let (token, tech) = offline(&h, "wrong-token");
    assert!(
        token.contains("does not accept this console's token"),
        "{token}"
    );
    assert!(token.contains("paste the token"), "{token}");
    assert!(tech.contains("Unauthenticated"), "details: {tech}");
    let (cert, tech) = offline(&h, "moved");
    assert!(
        cert.contains("certificate is not the one you trusted"),
        "{cert}"
    );
    assert!(cert.contains("confirm the new fingerprint"), "{cert}");
    assert!(tech.contains("fingerprint"), "details: {tech}");
    for (n, e) in [("dead", &dead), ("wrong-token", &token), ("moved", &cert)] {
        assert_plain(n, e);
        assert!(has_text(&h, &format!("offline: {e}")), "{n}'s row shows it");
    }
    // The host pane has the sentence and, folded away, the technical details.
    select(&mut h, "moved");
    assert!(has_text(
        &h,
        "Offline: the host's certificate is not the one you trusted"
    ));
    assert!(h.query_by_label("Technical details").is_some());
}

#[test]
fn at_720_px_every_action_is_reachable_and_the_table_fills_the_width() {
    let agent = Agent::start();
    let mut check = Check::new(&agent.target());
    check.create_vm(spec("alpha", ""));
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), vec![agent.host("lab")]);
    let (w, ht) = (720.0, 640.0);
    let mut h = app_sized(Some(cfg), [w, ht]);
    wait(&mut h, "online", 30, |h| vm_names(h, "lab").len() == 1);
    let inside = |h: &App, label: &str| {
        let r = h.get_by_label(label).rect();
        assert!(
            r.min.x >= 0.0 && r.max.x <= w && r.min.y >= 0.0 && r.max.y <= ht,
            "{label} is outside the {w}x{ht} window: {r:?}"
        );
    };
    for t in [
        "Add host…",
        "Inventory",
        "Disk library",
        "Clear finished",
        "Search:",
    ] {
        inside(&h, t);
    }
    select(&mut h, "lab");
    for a in ["New VM…", "Import disk…", "Edit host…", "Remove host…"] {
        inside(&h, a);
    }
    select(&mut h, "alpha");
    for a in [
        "Open console",
        "Start",
        "Shut down",
        "Force off",
        "Pause",
        "Resume",
        "Reset",
        "Settings…",
        "Delete…",
    ] {
        inside(&h, a);
    }
    // The table takes the whole width, not a fixed 600 px.
    let uptime = h.get_by_label("Uptime").rect();
    assert!(
        uptime.max.x > w - 60.0,
        "the table ends at {}",
        uptime.max.x
    );
    // A row's right-click menu has the same actions.
    h.get_by_label("alpha").click_secondary();
    steps(&mut h, 4);
    assert!(
        h.get_all_by_label("Settings…").count() == 2,
        "toolbar and menu"
    );
    h.key_press(egui::Key::Escape);
    steps(&mut h, 3);
    // Dialogs fit, centred: the settings' buttons are on screen.
    click(&mut h, "Settings…");
    for b in ["Save", "Cancel"] {
        inside(&h, b);
    }
    click(&mut h, "Cancel");
    // The console tab's actions too.
    click(&mut h, "Open console");
    for a in [
        "Screen",
        "Serial console",
        "Fit to window",
        "1:1",
        "Send keys",
        "Type clipboard text",
        "Screenshot",
        "Screenshot as…",
        "Start",
    ] {
        inside(&h, a);
    }
}

// ---- The test host: a running guest ---------------------------------------------------------

const SCRIPT: &str = r#"
STATE=$(mktemp -d)/state
mkdir -p "$STATE/boot/default"
ln -s "$IMAGES/vmlinuz" "$STATE/boot/default/kernel"
ln -s "$IMAGES/l2-initramfs.cpio" "$STATE/boot/default/initrd"
echo "console=ttyS0 quiet parvis.test=hold" >"$STATE/boot/default/cmdline"
parvis-agent --state-dir "$STATE" --listen "$AGENT_LISTEN" $AGENT_TLS --worker "$BIN/parvis-worker" >>agent.out 2>>agent.err &
echo $! >agent.pid
serve_commands
kill "$(cat agent.pid)" 2>/dev/null
for p in $(cat "$STATE"/vms/*/run.json 2>/dev/null | sed -n 's/.*"pid": *\([0-9]*\).*/\1/p'); do kill -9 "$p" 2>/dev/null; done
true
"#;

/// The guest's `parvis.test=fb` pattern: four horizontal bands, red, green, blue, white.
fn band(y: usize, h: usize) -> egui::Color32 {
    match (y / (h / 4)).min(3) {
        0 => egui::Color32::from_rgb(255, 0, 0),
        1 => egui::Color32::from_rgb(0, 255, 0),
        2 => egui::Color32::from_rgb(0, 0, 255),
        _ => egui::Color32::from_rgb(255, 255, 255),
    }
}

fn shows_pattern(img: &egui::ColorImage) -> bool {
    let [w, h] = img.size;
    w > 0
        && (0..h).step_by(7).all(|y| {
            (0..w)
                .step_by(13)
                .all(|x| img.pixels[y * w + x] == band(y, h))
        })
}

/// Where the screenshot artefact goes: `tests/output/` in the workspace (git-ignored).
fn output_dir() -> PathBuf {
    parvis_tests::build::workspace().join("tests/output")
}

#[test]
fn test_host_console_shows_the_running_guest() {
    use parvis_tests::live::Live;
    let live = Live::start("console", SCRIPT, Duration::from_secs(1500), 2048)
        .unwrap_or_else(|e| panic!("the test host did not start: {e:#}"));
    let out = live
        .wait_file("agent.out", "token: ", Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let value = |key: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("the agent printed no {key}"))
    };
    let host = HostConfig {
        name: "testhost".into(),
        addr: live.addr.clone(),
        token: value("token: "),
        fingerprint: Some(value("TLS certificate SHA-256 fingerprint: ")),
    };
    let target = Target {
        addr: host.addr.clone(),
        fingerprint: host.fingerprint.clone(),
        token: host.token.clone(),
    };
    let mut check = Check::new(&target);
    // fb draws the pattern; the shell on the serial console then lets the test draw more.
    let web = check.create_vm(spec("web", "console=ttyS0 parvis.test=fb,shell"));

    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), vec![host]);
    let mut h = app(Some(cfg.clone()));
    wait(&mut h, "the test host online with VM web", 60, |h| {
        host_status(h, "testhost") == Some(HostStatus::Online)
            && vm_names(h, "testhost") == vec!["web".to_string()]
    });

    // Start it from the inventory.
    click(&mut h, "web");
    click(&mut h, "Start");
    wait(&mut h, "web running", 180, |h| {
        vm_state(h, "testhost", "web") == Some(VmState::Running as i32)
    });

    // Its console: the screen arrives as tiles and changes as the guest draws.
    click(&mut h, "Open console");
    assert_eq!(h.state().consoles().len(), 1);
    wait(&mut h, "the guest's pattern on the console", 300, |h| {
        let s = &h.state().consoles()[0].screen;
        s.size() == [1024, 768] && shows_pattern(s.image())
    });
    let before = h.state().consoles()[0].screen.patches_applied;
    // The guest blanks its top 16 rows (1024 pixels × 4 bytes × 16); the open console
    // must follow, and only there.
    check.serial_send(&web, b"dd if=/dev/zero of=/dev/fb0 bs=4096 count=16\n");
    wait(
        &mut h,
        "the console following the guest's drawing",
        120,
        |h| {
            let img = h.state().consoles()[0].screen.image();
            let w = img.size[0];
            (0..16).all(|y| {
                (0..w)
                    .step_by(11)
                    .all(|x| img.pixels[y * w + x] == egui::Color32::BLACK)
            }) && (16..img.size[1])
                .step_by(9)
                .all(|y| img.pixels[y * w + w / 2] == band(y, img.size[1]))
        },
    );
    let tab = &h.state().consoles()[0];
    assert!(tab.screen.patches_applied > before);
    eprintln!(
        "console: {} patches in {} texture updates",
        tab.screen.patches_applied, tab.screen.texture_updates
    );

    // Keys go out as scan codes. Until the VM has an input device the agent refuses them,
    // and the console says so politely; otherwise they are accepted.
    click(&mut h, "Send keys");
    click(&mut h, "Ctrl+Alt+F2");
    let input = |h: &App| {
        let sh = h.state().consoles()[0].handle.shared.lock().unwrap();
        (sh.input_forwarded, sh.input_error.clone())
    };
    wait(&mut h, "the keys handed to the input stream", 30, |h| {
        input(h).0 >= 6 || input(h).1.is_some()
    });
    // Give a refusal time to come back.
    let settle = Instant::now() + Duration::from_secs(5);
    wait(&mut h, "an input answer", 10, |h| {
        input(h).1.is_some() || Instant::now() > settle
    });
    match input(&h).1 {
        Some(e) => {
            assert!(
                e.starts_with("keyboard and mouse do not reach this VM"),
                "{e}"
            );
            assert!(!e.contains("Status {"), "{e}");
            assert!(has_text(&h, "keyboard and mouse do not reach this VM"));
            eprintln!("input refused politely: {e}");
        }
        None => eprintln!("input accepted: {} events forwarded", input(&h).0),
    }

    // The serial console tab shows the guest's output.
    click(&mut h, "Serial console");
    wait(&mut h, "serial output", 120, |h| {
        let sh = h.state().consoles()[0].handle.shared.lock().unwrap();
        String::from_utf8_lossy(&sh.serial).contains("PARVIS-FB-DRAWN")
    });
    click(&mut h, "Screen");

    // The real window under Xvfb, screenshotted once it shows the guest.
    let shot = output_dir().join("console-running-guest.png");
    let _ = std::fs::remove_file(&shot);
    std::fs::create_dir_all(output_dir()).unwrap();
    let status = Command::new("timeout")
        .args(["180", "xvfb-run", "-a", "-s", "-screen 0 1440x960x24"])
        .arg(env!("CARGO_BIN_EXE_console-window"))
        .arg("--config")
        .arg(&cfg)
        .args(["--open", "web", "--window-screenshot"])
        .arg(&shot)
        .env("LIBGL_ALWAYS_SOFTWARE", "1")
        .stdin(Stdio::null())
        .output();
    let status = status.unwrap_or_else(|e| {
        panic!("cannot run xvfb-run ({e}); install the packages in tests/setup-host.sh")
    });
    assert!(
        shot.is_file(),
        "the window saved no screenshot ({}):\n{}",
        status.status,
        String::from_utf8_lossy(&status.stderr)
    );
    let img = image::open(&shot).unwrap().to_rgba8();
    let count = |rgb: [u8; 3]| img.pixels().filter(|p| p.0[..3] == rgb).count();
    let (r, g, b) = (count([255, 0, 0]), count([0, 255, 0]), count([0, 0, 255]));
    assert!(
        r > 10_000 && g > 10_000 && b > 10_000,
        "the screenshot {} does not show the guest's bands (red {r}, green {g}, blue {b} px)",
        shot.display()
    );
    eprintln!("saved {}", shot.display());

    // Force off from the inventory.
    click(&mut h, "Inventory");
    click(&mut h, "web");
    click(&mut h, "Force off");
    wait(&mut h, "web off", 60, |h| {
        vm_state(h, "testhost", "web") == Some(VmState::Off as i32)
    });
    drop(h);
    let outcome = live.finish().expect("the test host finishes");
    assert_eq!(outcome.status, 0, "scenario:\n{}", outcome.log());
}

/// `parvis` (the CLI, the static build the test host uses) with the hosts file `hosts`.
fn cli(hosts: &Path, args: &[&str]) -> std::process::Output {
    let art = parvis_tests::build::artifacts().unwrap_or_else(|e| panic!("{e:#}"));
    Command::new(art.bin.join("parvis"))
        .args(args)
        .env("PARVIS_CONFIG", hosts)
        .env_remove("PARVIS_ADDR")
        .env_remove("PARVIS_HOST")
        .stdin(Stdio::null())
        .output()
        .expect("parvis runs")
}

#[test]
fn the_cli_and_the_console_share_their_saved_hosts() {
    let agent = Agent::start();
    let mut check = Check::new(&agent.target());
    check.create_vm(spec("shared", ""));
    let dir = tempfile::tempdir().unwrap();
    let hosts = dir.path().join("hosts.json");
    // A host added with the CLI…
    let out = cli(
        &hosts,
        &[
            "host",
            "add",
            "from-cli",
            &agent.addr,
            "--token",
            &agent.token,
            "--fingerprint",
            &agent.fingerprint,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // …is the console's: it connects to it and lists its VM.
    let mut h = app(Some(hosts.clone()));
    wait(&mut h, "the CLI's host online in the console", 30, |h| {
        host_status(h, "from-cli") == Some(HostStatus::Online)
            && vm_names(h, "from-cli") == ["shared"]
    });
    // A host added in the console is the CLI's: it lists it and reaches its VMs through it.
    click(&mut h, "Add host…");
    type_into(&mut h, "Host name", "from-console");
    type_into(&mut h, "Address", &agent.addr);
    type_into(&mut h, "Token", &agent.token);
    click(&mut h, "Connect to host");
    let fp = agent.fingerprint.clone();
    wait(&mut h, "the fingerprint shown for confirmation", 30, |h| {
        h.query_by_label(&fp).is_some()
    });
    click(&mut h, "Trust and save");
    wait(&mut h, "the console's host online", 30, |h| {
        host_status(h, "from-console") == Some(HostStatus::Online)
    });
    let out = cli(&hosts, &["host", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|h| h["name"].as_str())
        .collect();
    assert_eq!(names, ["from-cli", "from-console"]);
    let out = cli(&hosts, &["--host", "from-console", "vm", "list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vms: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(vms[0]["name"], "shared", "{vms}");
}
