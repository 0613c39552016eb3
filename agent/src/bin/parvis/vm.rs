//! `parvis vm …`: VMs on the agent's host.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use proto::client::Clients;
use proto::v1::{
    AttachDiskRequest, BootSource, CreateVmRequest, DetachDiskRequest, DiskAttachment, DiskBus,
    GetHostInfoRequest, ListDisksRequest, ListVmsRequest, StatsSample, UpdateVmRequest, Vm, VmRef,
    VmSpec, WatchStatsRequest,
};
use serde_json::json;

use crate::console;
use crate::disk::{human, parse_size};
use crate::remote::{self, Rpc, print_json, print_table, resolve, time_ms, vm_state};

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// List the VMs.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Show one VM.
    Get {
        /// VM id or name.
        vm: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Create a VM (it starts off).
    Create {
        /// The VM's name.
        #[arg(long)]
        name: String,
        /// Virtual CPUs.
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// Memory, e.g. 512M or 2G (a bare number is MiB).
        #[arg(long, default_value = "512M")]
        memory: String,
        /// A disk from the host's library by id or name; options after commas: `ro`
        /// (read-only), `scsi` or `virtio` (default: SCSI for VHD/VHDX, virtio-blk for raw),
        /// `lun=N` and `controller=N` (SCSI). Repeat for more, in boot order.
        #[arg(long = "disk", value_name = "DISK[,ro][,scsi|virtio][,lun=N]")]
        disks: Vec<String>,
        /// What the VM starts: `disk` (the first disk's own boot entry, as its boot loader
        /// would start it) or `image` (a boot image on the host). Default: the disk for a
        /// disk that was imported or has boot entries, else the boot image.
        #[arg(long, value_parser = ["disk", "image"])]
        boot: Option<String>,
        /// Boot image on the host (default: the host's only one); implies --boot image.
        #[arg(long)]
        boot_image: Option<String>,
        /// The disk's boot entry to start, by kernel version or title (default: the disk's
        /// own default); implies --boot disk.
        #[arg(long)]
        boot_entry: Option<String>,
        /// Kernel command line (default: the boot image's); with --boot disk, parameters
        /// added to the entry's own.
        #[arg(long)]
        cmdline: Option<String>,
        /// Screen size, WIDTHxHEIGHT (default 1024x768).
        #[arg(long, value_name = "WxH")]
        display: Option<String>,
        /// Start the VM whenever the agent starts.
        #[arg(long)]
        autostart: bool,
        /// A network adapter on a switch of the host (`parvis switch list`), with an
        /// optional MAC address (default: one the agent picks and keeps). Repeat for more.
        #[arg(long = "nic", value_name = "SWITCH[,mac=XX:XX:XX:XX:XX:XX]")]
        nics: Vec<String>,
        /// Print the new VM as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Choose what a VM that is off starts next: its disk's own boot entry (by kernel
    /// version or title) or a boot image. Kept until changed.
    Boot {
        /// VM id or name.
        vm: String,
        /// `disk` or `image`.
        #[arg(long, value_parser = ["disk", "image"])]
        from: Option<String>,
        /// With --from image: the boot image.
        #[arg(long)]
        image: Option<String>,
        /// The disk's boot entry, by kernel version or title; `default` for the disk's own
        /// default. See `parvis disk get` for the entries.
        #[arg(long)]
        entry: Option<String>,
    },
    /// Start a VM.
    Start {
        /// VM id or name.
        vm: String,
    },
    /// Turn a VM off at once (like pulling the plug).
    Stop {
        /// VM id or name.
        vm: String,
    },
    /// Press the VM's power button (the guest decides what to do).
    Shutdown {
        /// VM id or name.
        vm: String,
    },
    /// Pause a running VM.
    Pause {
        /// VM id or name.
        vm: String,
    },
    /// Resume a paused VM.
    Resume {
        /// VM id or name.
        vm: String,
    },
    /// Reset a VM (hard reboot).
    Reset {
        /// VM id or name.
        vm: String,
    },
    /// Delete a VM that is off (its disks stay in the library).
    Delete {
        /// VM id or name.
        vm: String,
    },
    /// Attach the terminal to the VM's serial console (Ctrl-] detaches).
    Console {
        /// VM id or name.
        vm: String,
    },
    /// Show a running VM's resource use: CPU, memory, disk reads and writes, over the last
    /// minutes (the agent keeps an hour at 2 s and a day at 1 min).
    Stats {
        /// VM id or name.
        vm: String,
        /// The last this many minutes.
        #[arg(long, default_value_t = 5)]
        minutes: u64,
        /// Keep printing each new sample (Ctrl-C stops).
        #[arg(long)]
        watch: bool,
        /// Machine-readable output: the samples as JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Add or remove a disk; SCSI disks also while the VM runs (the guest sees it at once).
    Disk {
        #[command(subcommand)]
        cmd: VmDiskCommand,
    },
    /// Save the VM's screen as a PNG image.
    Screenshot {
        /// VM id or name.
        vm: String,
        /// The PNG file to write.
        file: PathBuf,
        /// Seconds to wait for the screen.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum VmDiskCommand {
    /// Attach a disk from the library.
    Add {
        /// VM id or name.
        vm: String,
        /// The disk's id or name, with options as for `vm create --disk`.
        #[arg(value_name = "DISK[,ro][,scsi|virtio][,lun=N]")]
        disk: String,
        /// Machine-readable output: the VM as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Detach a disk (it stays in the library).
    Remove {
        /// VM id or name.
        vm: String,
        /// The disk's id or name.
        disk: String,
        /// Machine-readable output: the VM as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(cmd: VmCommand, host: Option<&str>) -> Result<i32> {
    let mut c = remote::connect(host).await?;
    match cmd {
        VmCommand::List { json } => {
            let vms = list(&mut c).await?;
            if json {
                return print_json(&json!(vms.iter().map(vm_json).collect::<Vec<_>>())).map(|()| 0);
            }
            if vms.is_empty() {
                eprintln!("No VMs.");
                return Ok(0);
            }
            let mut rows = vec![vec![
                "ID".into(),
                "NAME".into(),
                "STATE".into(),
                "CPUS".into(),
                "MEMORY".into(),
                "DISKS".into(),
                "HEARTBEAT".into(),
                "ADDRESSES".into(),
            ]];
            for v in &vms {
                let s = v.spec.clone().unwrap_or_default();
                let g = v.guest.clone().unwrap_or_default();
                rows.push(vec![
                    v.id.clone(),
                    s.name,
                    vm_state(v.state),
                    s.cpus.to_string(),
                    human(s.memory_bytes),
                    s.disks.len().to_string(),
                    heartbeat_word(&g).into(),
                    if g.addresses.is_empty() {
                        "-".into()
                    } else {
                        g.addresses.join(", ")
                    },
                ]);
            }
            print_table(&rows);
            Ok(0)
        }
        VmCommand::Stats {
            vm,
            minutes,
            watch,
            json,
        } => {
            let id = vm_id(&mut c, &vm).await?;
            stats(&mut c, &id, minutes, watch, json).await
        }
        VmCommand::Get { vm, json } => {
            let id = vm_id(&mut c, &vm).await?;
            let v =
                c.vm.get_vm(VmRef { vm_id: id })
                    .await
                    .rpc("reading the VM")?;
            if json {
                print_json(&vm_json(&v))?;
            } else {
                print_vm(&v);
            }
            Ok(0)
        }
        VmCommand::Create {
            name,
            cpus,
            memory,
            disks,
            boot,
            boot_image,
            boot_entry,
            cmdline,
            display,
            autostart,
            nics,
            json,
        } => {
            let nics = nics
                .iter()
                .map(|n| parse_nic(n))
                .collect::<Result<Vec<_>>>()?;
            let memory_bytes = if memory.trim().bytes().all(|b| b.is_ascii_digit()) {
                parse_size(&format!("{}M", memory.trim()))?
            } else {
                parse_size(&memory)?
            };
            let (display_width, display_height) = match &display {
                Some(d) => parse_display(d)?,
                None => (0, 0),
            };
            let attachments = disk_attachments(&mut c, &disks).await?;
            let boot_source = match (boot.as_deref(), &boot_image, &boot_entry) {
                (Some("disk"), Some(_), _) => {
                    bail!("--boot-image and --boot disk ask for two different things")
                }
                (Some("image"), _, Some(_)) => {
                    bail!("--boot-entry and --boot image ask for two different things")
                }
                (_, Some(_), Some(_)) => {
                    bail!("--boot-image and --boot-entry ask for two different things")
                }
                (Some("disk"), ..) | (_, _, Some(_)) => BootSource::Disk,
                (Some(_), ..) | (_, Some(_), _) => BootSource::Image,
                // Nothing said: the agent decides from the first disk.
                (None, None, None) if !attachments.is_empty() => BootSource::Unspecified,
                (None, None, None) => BootSource::Image,
            };
            let boot_image = match boot_image {
                Some(b) => b,
                None if boot_source == BootSource::Image => default_boot_image(&mut c).await?,
                None => String::new(),
            };
            let spec = VmSpec {
                name,
                cpus,
                memory_bytes,
                disks: attachments,
                boot_image,
                cmdline: cmdline.unwrap_or_default(),
                display_width,
                display_height,
                autostart,
                boot_source: boot_source as i32,
                boot_entry: boot_entry.unwrap_or_default(),
                nics,
            };
            let v =
                c.vm.create_vm(CreateVmRequest { spec: Some(spec) })
                    .await
                    .rpc("creating the VM")?;
            if json {
                print_json(&vm_json(&v))?;
            } else {
                println!("Created VM '{}' ({}).", vm_name(&v), v.id);
            }
            Ok(0)
        }
        VmCommand::Boot {
            vm,
            from,
            image,
            entry,
        } => {
            let id = vm_id(&mut c, &vm).await?;
            let v =
                c.vm.get_vm(VmRef { vm_id: id.clone() })
                    .await
                    .rpc(&format!("reading VM '{vm}'"))?;
            let mut spec = v.spec.unwrap_or_default();
            match (from.as_deref(), image, entry) {
                (Some("disk"), Some(_), _)
                | (Some("image"), _, Some(_))
                | (_, Some(_), Some(_)) => {
                    bail!("a VM starts either a boot image or its disk's entry, not both")
                }
                (None, None, None) => bail!("say what to start: --from, --image or --entry"),
                (_, Some(image), None) => {
                    spec.boot_source = BootSource::Image as i32;
                    spec.boot_image = image;
                    spec.boot_entry.clear();
                }
                (Some("image"), None, None) => {
                    spec.boot_source = BootSource::Image as i32;
                    if spec.boot_image.is_empty() {
                        spec.boot_image = default_boot_image(&mut c).await?;
                    }
                    spec.boot_entry.clear();
                }
                (_, None, entry) => {
                    spec.boot_source = BootSource::Disk as i32;
                    if let Some(e) = entry {
                        spec.boot_entry = if e == "default" { String::new() } else { e };
                    }
                }
            }
            let v =
                c.vm.update_vm(UpdateVmRequest {
                    vm_id: id,
                    spec: Some(spec),
                })
                .await
                .rpc(&format!("changing VM '{vm}'"))?;
            let s = v.spec.unwrap_or_default();
            println!("VM '{}' starts {} next.", s.name, boot_words(&s));
            Ok(0)
        }
        VmCommand::Start { vm } => act(&mut c, &vm, Action::Start).await,
        VmCommand::Stop { vm } => act(&mut c, &vm, Action::Stop).await,
        VmCommand::Shutdown { vm } => act(&mut c, &vm, Action::Shutdown).await,
        VmCommand::Pause { vm } => act(&mut c, &vm, Action::Pause).await,
        VmCommand::Resume { vm } => act(&mut c, &vm, Action::Resume).await,
        VmCommand::Reset { vm } => act(&mut c, &vm, Action::Reset).await,
        VmCommand::Delete { vm } => {
            let id = vm_id(&mut c, &vm).await?;
            c.vm.delete_vm(VmRef { vm_id: id.clone() })
                .await
                .rpc(&format!("deleting VM '{vm}'"))?;
            println!("Deleted VM '{vm}' ({id}).");
            Ok(0)
        }
        VmCommand::Console { vm } => {
            let id = vm_id(&mut c, &vm).await?;
            console::serial(&mut c, &id, &vm).await
        }
        VmCommand::Disk { cmd } => disk(&mut c, cmd).await,
        VmCommand::Screenshot { vm, file, timeout } => {
            let id = vm_id(&mut c, &vm).await?;
            console::screenshot(&mut c, &id, &file, timeout).await
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Start,
    Stop,
    Shutdown,
    Pause,
    Resume,
    Reset,
}

async fn act(c: &mut Clients, vm: &str, a: Action) -> Result<i32> {
    let id = vm_id(c, vm).await?;
    let r = VmRef { vm_id: id };
    let (doing, res) = match a {
        Action::Start => ("starting", c.vm.start_vm(r).await),
        Action::Stop => ("stopping", c.vm.stop_vm(r).await),
        Action::Shutdown => ("shutting down", c.vm.shutdown_vm(r).await),
        Action::Pause => ("pausing", c.vm.pause_vm(r).await),
        Action::Resume => ("resuming", c.vm.resume_vm(r).await),
        Action::Reset => ("resetting", c.vm.reset_vm(r).await),
    };
    let v = match res {
        Ok(v) => v.into_inner(),
        Err(s) => {
            let e = remote::status_error(&format!("{doing} VM '{vm}'"), &s);
            if matches!(a, Action::Start) && s.code() == tonic::Code::FailedPrecondition {
                bail!("{e} (`parvis vm get {vm}` shows its state and crash log)");
            }
            return Err(e);
        }
    };
    let state = vm_state(v.state);
    if matches!(a, Action::Shutdown) {
        println!(
            "Pressed the power button of VM '{}'; it is {state}.",
            vm_name(&v)
        );
    } else {
        println!("VM '{}' is {state}.", vm_name(&v));
    }
    Ok(0)
}

pub async fn list(c: &mut Clients) -> Result<Vec<Vm>> {
    Ok(c.vm
        .list_vms(ListVmsRequest {})
        .await
        .rpc("listing VMs")?
        .vms)
}

/// A VM id from an id, a name or a unique id prefix.
pub async fn vm_id(c: &mut Clients, query: &str) -> Result<String> {
    let vms = list(c).await?;
    let items: Vec<(&str, &str)> = vms
        .iter()
        .map(|v| {
            (
                v.id.as_str(),
                v.spec.as_ref().map_or("", |s| s.name.as_str()),
            )
        })
        .collect();
    resolve("VM", items.iter().copied(), query)
}

/// `parvis vm stats`: the samples of the last `minutes`, then (with `watch`) each new one.
async fn stats(c: &mut Clients, id: &str, minutes: u64, watch: bool, json: bool) -> Result<i32> {
    let mut stream = c
        .host
        .watch_stats(WatchStatsRequest {
            vm_id: id.to_string(),
        })
        .await
        .rpc("reading the VM's resource use")?;
    let what = "reading the VM's resource use";
    let first = stream
        .message()
        .await
        .map_err(|s| remote::status_error(what, &s))?
        .unwrap_or_default();
    let since = time_ms_now() - (minutes * 60_000) as i64;
    let recent: Vec<StatsSample> = first
        .samples
        .into_iter()
        .filter(|s| s.time_ms >= since)
        .collect();
    if recent.is_empty() && !watch {
        eprintln!("No samples yet: the agent samples a running VM every 2 s (is the VM running?).");
        return Ok(0);
    }
    if !json {
        print_stats_header();
    }
    for s in &recent {
        print_sample(s, json)?;
    }
    if watch {
        // Ctrl-C ends the process (nothing to clean up).
        while let Some(u) = stream
            .message()
            .await
            .map_err(|s| remote::status_error(what, &s))?
        {
            for s in &u.samples {
                print_sample(s, json)?;
            }
        }
    }
    Ok(0)
}

fn time_ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn print_stats_header() {
    println!(
        "{:<8} {:>6} {:>9} {:>9} {:>10} {:>10} {:>7} {:>7}",
        "TIME", "CPU", "MEMORY", "OF", "READ/S", "WRITE/S", "RD OP/S", "WR OP/S"
    );
}

fn print_sample(s: &StatsSample, json: bool) -> Result<()> {
    if json {
        let v = json!({
            "time_ms": s.time_ms,
            "interval_s": s.interval_s,
            "cpu_cores": s.cpu_cores,
            "memory_used_bytes": s.memory_used_bytes,
            "memory_total_bytes": s.memory_total_bytes,
            "disk_read_bytes_per_s": s.disk_read_bytes_per_s,
            "disk_write_bytes_per_s": s.disk_write_bytes_per_s,
            "disk_read_ops_per_s": s.disk_read_ops_per_s,
            "disk_write_ops_per_s": s.disk_write_ops_per_s,
        });
        println!("{v}");
        return Ok(());
    }
    let t = time_ms(s.time_ms);
    let clock = t.split_whitespace().nth(1).unwrap_or(&t).to_string();
    println!(
        "{:<8} {:>5.0}% {:>9} {:>9} {:>10} {:>10} {:>7} {:>7}",
        clock,
        s.cpu_cores * 100.0,
        human(s.memory_used_bytes),
        human(s.memory_total_bytes),
        human(s.disk_read_bytes_per_s),
        human(s.disk_write_bytes_per_s),
        s.disk_read_ops_per_s,
        s.disk_write_ops_per_s
    );
    Ok(())
}

fn vm_name(v: &Vm) -> &str {
    v.spec.as_ref().map_or("", |s| s.name.as_str())
}

fn parse_display(d: &str) -> Result<(u32, u32)> {
    let (w, h) = d
        .split_once(['x', 'X'])
        .with_context(|| format!("'{d}' is not WIDTHxHEIGHT"))?;
    let w: u32 = w
        .trim()
        .parse()
        .with_context(|| format!("'{d}' is not WIDTHxHEIGHT"))?;
    let h: u32 = h
        .trim()
        .parse()
        .with_context(|| format!("'{d}' is not WIDTHxHEIGHT"))?;
    Ok((w, h))
}

async fn disk(c: &mut Clients, cmd: VmDiskCommand) -> Result<i32> {
    let (v, json) = match cmd {
        VmDiskCommand::Add { vm, disk, json } => {
            let id = vm_id(c, &vm).await?;
            let mut a = disk_attachments(c, std::slice::from_ref(&disk)).await?;
            let v =
                c.vm.attach_disk(AttachDiskRequest {
                    vm_id: id,
                    disk: a.pop(),
                })
                .await
                .rpc(&format!("adding a disk to VM '{vm}'"))?;
            if !json {
                let s = v.spec.clone().unwrap_or_default();
                if let Some(d) = s.disks.last() {
                    println!(
                        "Added disk '{}' to VM '{}' as {}.",
                        d.disk_id,
                        vm_name(&v),
                        place(d)
                    );
                }
            }
            (v, json)
        }
        VmDiskCommand::Remove { vm, disk, json } => {
            let id = vm_id(c, &vm).await?;
            let disk_id = resolve_disk(c, &disk).await?;
            let v =
                c.vm.detach_disk(DetachDiskRequest { vm_id: id, disk_id })
                    .await
                    .rpc(&format!("removing disk '{disk}' from VM '{vm}'"))?;
            if !json {
                println!("Removed disk '{disk}' from VM '{}'.", vm_name(&v));
            }
            (v, json)
        }
    };
    if json {
        print_json(&vm_json(&v))?;
    }
    Ok(0)
}

async fn resolve_disk(c: &mut Clients, query: &str) -> Result<String> {
    let disks = c
        .disk
        .list_disks(ListDisksRequest {})
        .await
        .rpc("listing disks")?
        .disks;
    resolve(
        "disk",
        disks.iter().map(|d| (d.id.as_str(), d.name.as_str())),
        query,
    )
}

/// `DISK[,ro][,scsi|virtio][,lun=N][,controller=N]`: the disk's id or name and the
/// attachment's options.
fn parse_disk_option(spec: &str) -> Result<(&str, DiskAttachment)> {
    let mut parts = spec.split(',');
    let disk = parts.next().unwrap_or_default();
    if disk.is_empty() {
        bail!("'{spec}' names no disk");
    }
    let mut a = DiskAttachment::default();
    let number = |k: &str, v: &str| -> Result<u32> {
        v.parse()
            .with_context(|| format!("'{v}' is not a {k} number in '{spec}'"))
    };
    for opt in parts {
        match opt.split_once('=') {
            None if matches!(opt, "ro" | "readonly" | "read-only") => a.read_only = true,
            None if opt == "rw" => a.read_only = false,
            None if opt == "scsi" => a.bus = DiskBus::Scsi as i32,
            None if opt == "virtio" => a.bus = DiskBus::Virtio as i32,
            Some(("lun", v)) => a.lun = Some(number("LUN", v)?),
            Some(("controller", v)) => a.controller = number("controller", v)?,
            _ => bail!(
                "unknown disk option '{opt}' in '{spec}' (ro, rw, scsi, virtio, lun=N, controller=N)"
            ),
        }
    }
    Ok((disk, a))
}

async fn disk_attachments(c: &mut Clients, specs: &[String]) -> Result<Vec<DiskAttachment>> {
    if specs.is_empty() {
        return Ok(Vec::new());
    }
    let parsed = specs
        .iter()
        .map(|s| parse_disk_option(s))
        .collect::<Result<Vec<_>>>()?;
    let disks = c
        .disk
        .list_disks(ListDisksRequest {})
        .await
        .rpc("listing disks")?
        .disks;
    let items: Vec<(&str, &str)> = disks
        .iter()
        .map(|d| (d.id.as_str(), d.name.as_str()))
        .collect();
    let mut out = Vec::new();
    for (disk, mut a) in parsed {
        a.disk_id = resolve("disk", items.iter().copied(), disk)?;
        out.push(a);
    }
    Ok(out)
}

/// Where a disk sits, in words: "SCSI 0:2" (controller:LUN) or "virtio-blk".
fn place(d: &DiskAttachment) -> String {
    match DiskBus::try_from(d.bus) {
        Ok(DiskBus::Scsi) => format!("SCSI {}:{}", d.controller, d.lun.unwrap_or(0)),
        _ => "virtio-blk".into(),
    }
}

fn bus_word(d: &DiskAttachment) -> &'static str {
    match DiskBus::try_from(d.bus) {
        Ok(DiskBus::Scsi) => "scsi",
        _ => "virtio",
    }
}

async fn default_boot_image(c: &mut Clients) -> Result<String> {
    let info = c
        .host
        .get_host_info(GetHostInfoRequest {})
        .await
        .rpc("reading the host's boot images")?;
    match info.boot_images.as_slice() {
        [one] => Ok(one.name.clone()),
        [] => bail!("the host has no boot images; give --boot-image"),
        many => bail!(
            "give --boot-image (this host has {})",
            many.iter()
                .map(|b| b.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The heartbeat as Hyper-V Manager words it.
fn heartbeat_word(g: &proto::v1::GuestInfo) -> &'static str {
    match g.heartbeat.as_str() {
        "ok" => "OK",
        "lost" => "No contact",
        _ => "-",
    }
}

/// `SWITCH[,mac=XX:XX:XX:XX:XX:XX]` as an adapter.
fn parse_nic(s: &str) -> Result<proto::v1::NetworkAdapter> {
    let mut parts = s.split(',');
    let switch_name = parts.next().unwrap_or_default().trim().to_string();
    if switch_name.is_empty() {
        bail!("--nic needs a switch name");
    }
    let mut mac = String::new();
    for p in parts {
        match p.split_once('=') {
            Some(("mac", m)) => mac = m.trim().to_string(),
            _ => bail!("unknown --nic option '{p}' (use mac=XX:XX:XX:XX:XX:XX)"),
        }
    }
    Ok(proto::v1::NetworkAdapter { switch_name, mac })
}

fn print_vm(v: &Vm) {
    let s = v.spec.clone().unwrap_or_default();
    println!("name:             {}", s.name);
    println!("id:               {}", v.id);
    if v.state_reason.is_empty() {
        println!("state:            {}", vm_state(v.state));
    } else {
        println!(
            "state:            {} ({})",
            vm_state(v.state),
            v.state_reason
        );
    }
    println!("since:            {}", time_ms(v.state_changed_ms));
    println!("cpus:             {}", s.cpus);
    println!("memory:           {}", human(s.memory_bytes));
    if s.disks.is_empty() {
        println!("disks:            none");
    }
    for (i, d) in s.disks.iter().enumerate() {
        println!(
            "{:<18}{} on {}{}",
            if i == 0 { "disks:" } else { "" },
            d.disk_id,
            place(d),
            if d.read_only { " (read-only)" } else { "" }
        );
    }
    for (i, n) in s.nics.iter().enumerate() {
        println!(
            "{:<18}{} on switch {}",
            if i == 0 { "network:" } else { "" },
            n.mac,
            n.switch_name
        );
    }
    if let Some(g) = &v.guest {
        println!("heartbeat:        {}", heartbeat_word(g));
        if !g.hostname.is_empty() {
            println!("guest name:       {}", g.hostname);
        }
        if !g.os.is_empty() {
            println!("guest OS:         {}", g.os);
        }
        if !g.addresses.is_empty() {
            println!("addresses:        {}", g.addresses.join(", "));
        }
    }
    println!("boots:            {}", boot_words(&s));
    let disk_boot = s.boot_source == BootSource::Disk as i32;
    println!(
        "cmdline:          {}",
        match (s.cmdline.is_empty(), disk_boot) {
            (true, false) => "(the boot image's default)",
            (true, true) => "(the boot entry's own)",
            (false, _) => &s.cmdline,
        }
    );
    let (w, h) = if s.display_width == 0 {
        (1024, 768)
    } else {
        (s.display_width, s.display_height)
    };
    println!("display:          {w}x{h}");
    println!(
        "autostart:        {}",
        if s.autostart { "yes" } else { "no" }
    );
    println!("created:          {}", time_ms(v.created_ms));
    if !v.crash_log.trim().is_empty() {
        println!("crash log:");
        for l in v.crash_log.lines() {
            println!("  {l}");
        }
    }
}

/// What a VM starts, in words: "the disk's default boot entry", "boot image 'default'".
fn boot_words(s: &VmSpec) -> String {
    if s.boot_source == BootSource::Disk as i32 {
        if s.boot_entry.is_empty() {
            "its disk's default boot entry".into()
        } else {
            format!("its disk's boot entry '{}'", s.boot_entry)
        }
    } else {
        format!("boot image '{}'", s.boot_image)
    }
}

pub fn vm_json(v: &Vm) -> serde_json::Value {
    let s = v.spec.clone().unwrap_or_default();
    json!({
        "id": v.id,
        "name": s.name,
        "state": vm_state(v.state),
        "state_reason": v.state_reason,
        "cpus": s.cpus,
        "memory_bytes": s.memory_bytes,
        "disks": s.disks.iter().map(|d| json!({
            "disk_id": d.disk_id,
            "read_only": d.read_only,
            "bus": bus_word(d),
            "controller": d.controller,
            "lun": d.lun,
        })).collect::<Vec<_>>(),
        "boot_source": if s.boot_source == BootSource::Disk as i32 { "disk" } else { "image" },
        "boot_image": s.boot_image,
        "boot_entry": s.boot_entry,
        "cmdline": s.cmdline,
        "display_width": s.display_width,
        "display_height": s.display_height,
        "autostart": s.autostart,
        "nics": s.nics.iter().map(|n| json!({
            "switch": n.switch_name,
            "mac": n.mac,
        })).collect::<Vec<_>>(),
        "guest": v.guest.as_ref().map(|g| json!({
            "heartbeat": heartbeat_word(g),
            "shutdown_service": g.shutdown_service,
            "hostname": g.hostname,
            "os": g.os,
            "addresses": g.addresses,
        })),
        "created_ms": v.created_ms,
        "state_changed_ms": v.state_changed_ms,
        "crash_log": v.crash_log,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays() {
        assert_eq!(parse_display("800x600").unwrap(), (800, 600));
        assert_eq!(parse_display("1920X1080").unwrap(), (1920, 1080));
        assert!(parse_display("800").is_err());
    }

    #[test]
    fn disk_options() {
        let (d, a) = parse_disk_option("web,ro,scsi,lun=3").unwrap();
        assert_eq!(d, "web");
        assert!(a.read_only);
        assert_eq!(
            (a.bus, a.lun, a.controller),
            (DiskBus::Scsi as i32, Some(3), 0)
        );
        let (_, a) = parse_disk_option("web").unwrap();
        assert_eq!((a.bus, a.lun), (DiskBus::Unspecified as i32, None));
        let (_, a) = parse_disk_option("web,virtio,rw").unwrap();
        assert_eq!(a.bus, DiskBus::Virtio as i32);
        assert!(parse_disk_option("web,ide").is_err());
        assert!(parse_disk_option("web,lun=x").is_err());
        assert!(parse_disk_option(",ro").is_err());
    }
}
