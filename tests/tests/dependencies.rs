//! The dependency rules of DESIGN.md, checked against `cargo metadata`:
//! - console-gui depends on `proto` and portable crates only (it must build for Windows);
//! - the agent never links the VMM or kvm-ioctls;
//! - the disk-format crate stays pure (no KVM, no unsafe-needing system crates of the VMM).

use std::collections::{BTreeSet, HashMap};
use std::process::Command;

use serde_json::Value;

struct Graph {
    /// package id -> (name, normal/build dependency ids)
    nodes: HashMap<String, (String, Vec<String>)>,
    workspace: Vec<String>,
}

fn graph() -> Graph {
    graph_for(None)
}

/// The graph as resolved for one target platform (`--filter-platform`): only the
/// dependencies that platform builds.
fn graph_for(platform: Option<&str>) -> Graph {
    let mut args = vec!["metadata", "--format-version", "1", "--locked"];
    if let Some(p) = platform {
        args.extend(["--filter-platform", p]);
    }
    let out = Command::new(env!("CARGO"))
        .args(&args)
        .current_dir(parvis_tests::build::workspace())
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: HashMap<String, String> = v["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["id"].as_str().unwrap().to_string(),
                p["name"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut nodes = HashMap::new();
    for n in v["resolve"]["nodes"].as_array().unwrap() {
        let id = n["id"].as_str().unwrap().to_string();
        let deps = n["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| {
                // Only what ships: normal and build dependencies, not dev-dependencies.
                d["dep_kinds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|k| k["kind"].is_null() || k["kind"] == "build")
            })
            .map(|d| d["pkg"].as_str().unwrap().to_string())
            .collect();
        nodes.insert(id.clone(), (names[&id].clone(), deps));
    }
    let workspace = v["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect();
    Graph { nodes, workspace }
}

impl Graph {
    fn id(&self, name: &str) -> String {
        self.workspace
            .iter()
            .find(|id| self.nodes[*id].0 == name)
            .unwrap_or_else(|| panic!("workspace member {name} not found"))
            .clone()
    }

    /// Names of every crate `name` pulls in (transitively).
    fn closure(&self, name: &str) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut stack = vec![self.id(name)];
        let mut out = BTreeSet::new();
        while let Some(id) = stack.pop() {
            if !seen.insert(id.clone()) {
                continue;
            }
            for d in &self.nodes[&id].1 {
                out.insert(self.nodes[d].0.clone());
                stack.push(d.clone());
            }
        }
        out
    }

    fn workspace_names(&self) -> BTreeSet<String> {
        self.workspace
            .iter()
            .map(|id| self.nodes[id].0.clone())
            .collect()
    }
}

const VMM_CRATES: &[&str] = &[
    "hypervisor",
    "kvm-ioctls",
    "kvm-bindings",
    "vm-superio",
    "linux-loader",
    "virtio-queue",
    "vmm-sys-util",
];

#[test]
fn console_gui_depends_on_proto_and_portable_crates_only() {
    let g = graph();
    let deps = g.closure("console_gui");
    let ours: BTreeSet<_> = deps.intersection(&g.workspace_names()).cloned().collect();
    assert_eq!(ours, BTreeSet::from(["proto".to_string()]));
    for bad in VMM_CRATES.iter().chain(&["parvis_disk", "agent"]) {
        assert!(!deps.contains(*bad), "console-gui must not depend on {bad}");
    }
}

/// Crates that exist for Linux only (or for the VMM): none may reach the console's Windows
/// build.
const LINUX_ONLY: &[&str] = &[
    "nix",
    "rustix-linux-procfs",
    "vm-memory",
    "kvm-ioctls",
    "kvm-bindings",
    "vmm-sys-util",
    "linux-loader",
    "wayland-client",
    "wayland-sys",
    "x11-dl",
    "x11rb",
    "smithay-clipboard",
    "xkbcommon-dl",
    "zbus",
    "ashpd",
];

#[test]
fn console_gui_resolves_for_windows_without_linux_only_crates() {
    // Only the linux target's std is installed here, so Windows cannot be compiled; this
    // checks what a Windows build would link.
    let g = graph_for(Some("x86_64-pc-windows-msvc"));
    let deps = g.closure("console_gui");
    for bad in LINUX_ONLY
        .iter()
        .chain(VMM_CRATES)
        .chain(&["parvis_disk", "agent"])
    {
        assert!(
            !deps.contains(*bad),
            "console-gui's Windows build would pull in {bad}"
        );
    }
    // The filter really selected Windows: its platform crates are there, and so is the UI.
    assert!(
        deps.contains("windows-sys") || deps.contains("windows"),
        "no Windows platform crate in {deps:?}"
    );
    for needed in ["eframe", "egui_glow", "rfd", "proto", "tokio", "arboard"] {
        assert!(deps.contains(needed), "console-gui should use {needed}");
    }
    // And on Linux the same crate does use the Linux window-system crates (the check above
    // is not vacuous).
    let linux = graph_for(Some("x86_64-unknown-linux-gnu")).closure("console_gui");
    assert!(linux.contains("x11-dl") || linux.contains("wayland-client"));
}

#[test]
fn agent_never_links_the_vmm() {
    let g = graph();
    let deps = g.closure("agent");
    for bad in VMM_CRATES {
        assert!(!deps.contains(*bad), "agent must not depend on {bad}");
    }
    assert!(deps.contains("proto"));
}

#[test]
fn disk_formats_are_a_pure_leaf() {
    let g = graph();
    let deps = g.closure("parvis_disk");
    let ours: BTreeSet<_> = deps.intersection(&g.workspace_names()).cloned().collect();
    assert!(
        ours.is_empty(),
        "parvis_disk depends on workspace crates {ours:?}"
    );
    for bad in VMM_CRATES {
        assert!(!deps.contains(*bad), "parvis_disk must not depend on {bad}");
    }
}

#[test]
fn proto_depends_on_no_workspace_crate() {
    let g = graph();
    let deps = g.closure("proto");
    let ours: BTreeSet<_> = deps.intersection(&g.workspace_names()).cloned().collect();
    assert!(ours.is_empty(), "{ours:?}");
}

/// Workspace crates `name` depends on (directly or not).
fn ours(g: &Graph, name: &str) -> BTreeSet<String> {
    g.closure(name)
        .intersection(&g.workspace_names())
        .cloned()
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn the_vmm_library_speaks_no_wire_protocol_and_its_parsers_stand_alone() {
    let g = graph();
    // The library: disks and the VMBus crates, never the agent's protocol (the worker
    // binary translates).
    assert_eq!(
        ours(&g, "hypervisor"),
        set(&["parvis_disk", "vmbus_core", "vmbus_devices"])
    );
    assert_eq!(
        ours(&g, "parvis_worker"),
        set(&[
            "bootdisk",
            "hypervisor",
            "icvsp",
            "netvsp",
            "parvis_disk",
            "proto",
            "scsi_disk",
            "storvsp",
            "vmbus_core",
            "vmbus_devices"
        ])
    );
    // What parses the guest's VMBus data knows neither KVM nor the VMM.
    assert!(ours(&g, "vmbus_core").is_empty());
    assert_eq!(ours(&g, "vmbus_devices"), set(&["vmbus_core"]));
    assert_eq!(ours(&g, "scsi_disk"), set(&["parvis_disk"]));
    assert_eq!(
        ours(&g, "storvsp"),
        set(&["parvis_disk", "scsi_disk", "vmbus_core"])
    );
    assert_eq!(ours(&g, "netvsp"), set(&["vmbus_core"]));
    assert_eq!(ours(&g, "icvsp"), set(&["vmbus_core"]));
    // The boot-disk reader stands alone: it reads guest file systems in a confined process
    // and knows nothing of Parvis.
    assert!(ours(&g, "bootdisk").is_empty());
    for krate in [
        "vmbus_core",
        "vmbus_devices",
        "storvsp",
        "netvsp",
        "icvsp",
        "scsi_disk",
        "bootdisk",
    ] {
        let deps = g.closure(krate);
        for bad in VMM_CRATES.iter().filter(|c| **c != "vmm-sys-util") {
            assert!(!deps.contains(*bad), "{krate} must not depend on {bad}");
        }
    }
}

/// The crates that parse hostile input (guest VMBus data, disk images) forbid `unsafe`;
/// everywhere else `unsafe` is allowed module by module, never for a whole crate.
#[test]
fn parsers_forbid_unsafe_and_elsewhere_it_is_allowed_per_module() {
    let root = parvis_tests::build::workspace();
    for lib in [
        "hypervisor/vmbus_core/src/lib.rs",
        "hypervisor/vmbus_devices/src/lib.rs",
        "hypervisor/disk/src/lib.rs",
        "hypervisor/scsi_disk/src/lib.rs",
        "hypervisor/storvsp/src/lib.rs",
        "hypervisor/netvsp/src/lib.rs",
        "hypervisor/icvsp/src/lib.rs",
        "hypervisor/bootdisk/src/lib.rs",
    ] {
        let text = std::fs::read_to_string(root.join(lib)).unwrap();
        assert!(
            text.contains("#![forbid(unsafe_code)]"),
            "{lib} does not forbid unsafe code"
        );
    }
    let mut allows = Vec::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if p.is_dir() {
                if !name.starts_with('.') && name != "target" {
                    stack.push(p);
                }
            } else if name.ends_with(".rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                for l in text.lines().filter(|l| l.contains("allow(unsafe_code")) {
                    allows.push((
                        p.strip_prefix(&root).unwrap().to_path_buf(),
                        l.trim().to_string(),
                    ));
                }
            }
        }
    }
    assert!(
        !allows.is_empty(),
        "the VMM needs some unsafe code: found no allow at all"
    );
    for (path, line) in &allows {
        let crate_root = path.ends_with("lib.rs") || path.ends_with("main.rs");
        assert!(
            !(crate_root && line.starts_with("#![")),
            "{}: unsafe is allowed for a whole crate: {line}",
            path.display()
        );
    }
}
