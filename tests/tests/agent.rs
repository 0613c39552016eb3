//! End-to-end tests of the agent: a real `parvis-agent` with real workers and real guests in
//! the test host, reached from this machine over TCP with TLS (a forwarded port).
//!
//! One test-host boot serves every check: `run()` drives the whole story once and records
//! each check's result; each `#[test]` asserts one of them.

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use parvis_tests::checks::{Checks, Run, record};
use parvis_tests::live::Live;
use proto::client::{self, Clients, Target};
use proto::v1::{
    BeginUploadRequest, CreateVmRequest, DiskAttachment, DiskBus, DiskFormat, DiskRef,
    FramebufferRequest, GetHostInfoRequest, ListDisksRequest, TaskRef, TaskState, TileEncoding,
    UploadChunk, UploadRef, UploadState, Vm, VmRef, VmSpec, VmState, WatchEventsRequest, event,
};
use sha2::{Digest, Sha256};
use tonic::Code;

fn results() -> &'static Run {
    static RUN: OnceLock<Run> = OnceLock::new();
    RUN.get_or_init(|| Run::of(run))
}

fn assert_check(name: &str) {
    results().assert(name);
}

const SCRIPT: &str = r#"
STATE=$(mktemp -d)/state
mkdir -p "$STATE/boot/default"
ln -s "$IMAGES/vmlinuz" "$STATE/boot/default/kernel"
ln -s "$IMAGES/l2-initramfs.cpio" "$STATE/boot/default/initrd"
echo "console=ttyS0 quiet parvis.test=hold" >"$STATE/boot/default/cmdline"
cat >start-agent.sh <<EOF
parvis-agent --state-dir "$STATE" --listen "$AGENT_LISTEN" $AGENT_TLS --worker "$BIN/parvis-worker" >>agent.out 2>>agent.err &
echo \$! >agent.pid
EOF
echo "$STATE" >state.path
sh start-agent.sh
serve_commands
kill "$(cat agent.pid)" 2>/dev/null
for p in $(cat "$STATE"/vms/*/run.json 2>/dev/null | sed -n 's/.*"pid": *\([0-9]*\).*/\1/p'); do kill -9 "$p" 2>/dev/null; done
true
"#;

fn marker_value(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
}

fn run(checks: &mut Checks) -> Result<()> {
    let mut live = Live::start("agent", SCRIPT, Duration::from_secs(1500), 2048)?;
    let out = live.wait_file("agent.out", "token: ", Duration::from_secs(300))?;
    let token = marker_value(&out, "token: ").context("no token printed")?;
    let fp = marker_value(&out, "TLS certificate SHA-256 fingerprint: ")
        .context("no fingerprint printed")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(story(&mut live, checks, &token, &fp));
    let outcome = live.finish();
    result?;
    let outcome = outcome?;
    ensure!(
        outcome.status == 0,
        "scenario ended with {}:\n{}",
        outcome.status,
        parvis_tests::testhost::tail(&outcome.log(), 30)
    );
    Ok(())
}

async fn story(live: &mut Live, checks: &mut Checks, token: &str, fp: &str) -> Result<()> {
    let addr = live.addr.clone();
    let target = Target {
        addr: addr.clone(),
        fingerprint: Some(fp.to_string()),
        token: token.to_string(),
    };
    record(checks, "tls_and_auth", tls_and_auth(&target).await);
    let mut c = client::connect(&target)
        .await
        .context("connecting with TLS")?;
    record(checks, "host_info", host_info(&mut c).await);
    record(checks, "bad_requests", bad_requests(&mut c).await);
    record(checks, "python_client", python_client(live, &target));
    record(checks, "vm_lifecycle", vm_lifecycle(&mut c).await);
    let disk = upload(live, &mut c, &target).await;
    let disk_id = disk.as_ref().ok().cloned();
    record(checks, "upload_resume", disk.map(|_| ()));
    if let Some(d) = disk_id {
        record(
            checks,
            "boot_from_uploaded_disk",
            boot_from_disk(&mut c, &d).await,
        );
    }
    record(checks, "faults", faults(live, &target).await);
    Ok(())
}

async fn tls_and_auth(t: &Target) -> Result<()> {
    let seen = client::fetch_fingerprint(&t.addr).await?;
    ensure!(
        client::same_fingerprint(&seen, t.fingerprint.as_deref().unwrap_or("")),
        "the certificate ({seen}) is not the one the agent printed"
    );
    // Wrong token.
    let mut bad = client::connect(&Target {
        token: "pvs_not_the_token".into(),
        ..t.clone()
    })
    .await?;
    let e = bad
        .host
        .get_host_info(GetHostInfoRequest {})
        .await
        .unwrap_err();
    ensure!(e.code() == Code::Unauthenticated, "wrong token gave {e:?}");
    // No token at all.
    let ch = client::channel(t).await?;
    let e = proto::v1::host_service_client::HostServiceClient::new(ch)
        .get_host_info(GetHostInfoRequest {})
        .await
        .unwrap_err();
    ensure!(e.code() == Code::Unauthenticated, "no token gave {e:?}");
    // A pinned fingerprint that is not the agent's certificate.
    let wrong_fp = client::fingerprint_of(b"some other certificate");
    let r = client::connect(&Target {
        fingerprint: Some(wrong_fp),
        ..t.clone()
    })
    .await;
    match r {
        Err(_) => {}
        Ok(mut c) => {
            let e = c.host.get_host_info(GetHostInfoRequest {}).await;
            ensure!(e.is_err(), "a wrong certificate pin was accepted");
        }
    }
    // Plain HTTP/2 to the TLS port.
    if let Ok(mut c) = client::connect(&Target {
        fingerprint: None,
        ..t.clone()
    })
    .await
    {
        ensure!(
            c.host.get_host_info(GetHostInfoRequest {}).await.is_err(),
            "plaintext was served on a TLS port"
        );
    }
    Ok(())
}

async fn host_info(c: &mut Clients) -> Result<()> {
    let h = c
        .host
        .get_host_info(GetHostInfoRequest {})
        .await?
        .into_inner();
    ensure!(h.api_version == "parvis.v1", "{h:?}");
    let kvm = h.kvm.clone().unwrap_or_default();
    ensure!(
        kvm.usable,
        "KVM not usable in the test host: {}",
        kvm.reason
    );
    ensure!(kvm.max_vcpus > 0, "{kvm:?}");
    ensure!(h.logical_cpus >= 1 && h.memory_bytes > 0, "{h:?}");
    ensure!(
        h.boot_images
            .iter()
            .any(|b| b.name == "default" && b.has_initrd),
        "boot images: {:?}",
        h.boot_images
    );
    Ok(())
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

async fn expect_invalid(c: &mut Clients, s: VmSpec, field: &str) -> Result<()> {
    let e =
        c.vm.create_vm(CreateVmRequest { spec: Some(s) })
            .await
            .err()
            .with_context(|| format!("a spec with a bad {field} was accepted"))?;
    ensure!(e.code() == Code::InvalidArgument, "{field}: {e:?}");
    ensure!(e.message().contains(field), "{field}: {}", e.message());
    Ok(())
}

async fn bad_requests(c: &mut Clients) -> Result<()> {
    expect_invalid(
        c,
        VmSpec {
            cpus: 0,
            ..spec("x", "")
        },
        "spec.cpus",
    )
    .await?;
    expect_invalid(
        c,
        VmSpec {
            memory_bytes: 1 << 50,
            ..spec("x", "")
        },
        "spec.memory_bytes",
    )
    .await?;
    expect_invalid(
        c,
        VmSpec {
            disks: vec![DiskAttachment {
                disk_id: "0123456789ab".into(),
                read_only: false,
                bus: DiskBus::Virtio as i32,
                ..Default::default()
            }],
            ..spec("x", "")
        },
        "spec.disks[0].disk_id",
    )
    .await?;
    let e =
        c.vm.get_vm(VmRef {
            vm_id: "0123456789ab".into(),
        })
        .await
        .unwrap_err();
    ensure!(e.code() == Code::NotFound, "{e:?}");
    let e =
        c.vm.start_vm(VmRef {
            vm_id: "../../etc".into(),
        })
        .await
        .unwrap_err();
    ensure!(e.code() == Code::NotFound, "{e:?}");
    let e = c
        .disk
        .get_disk(DiskRef {
            disk_id: "nope".into(),
        })
        .await
        .unwrap_err();
    ensure!(e.code() == Code::NotFound, "{e:?}");
    Ok(())
}

async fn wait_state(c: &mut Clients, id: &str, want: VmState, secs: u64) -> Result<Vm> {
    let start = Instant::now();
    loop {
        let vm =
            c.vm.get_vm(VmRef {
                vm_id: id.to_string(),
            })
            .await?
            .into_inner();
        if vm.state == want as i32 {
            return Ok(vm);
        }
        if start.elapsed() > Duration::from_secs(secs) {
            bail!(
                "VM {id} is {:?} ({}), not {want:?}, after {secs} s; crash log:\n{}",
                VmState::try_from(vm.state),
                vm.state_reason,
                vm.crash_log
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The guest's fb pattern: four horizontal bands, red, green, blue, white (BGRX bytes).
fn expected_pixel(y: u32, h: u32) -> [u8; 4] {
    let band = h / 4;
    match (y / band).min(3) {
        0 => [0, 0, 255, 0],
        1 => [0, 255, 0, 0],
        2 => [255, 0, 0, 0],
        _ => [255, 255, 255, 0],
    }
}

fn decode(t: &proto::v1::Tile) -> Result<Vec<u8>> {
    let want = (t.width * t.height * 4) as usize;
    ensure!(
        t.encoding == TileEncoding::Lz4 as i32,
        "tile encoding {}",
        t.encoding
    );
    let px = proto::tiles::decode(t)?;
    ensure!(px.len() == want, "tile length");
    Ok(px)
}

async fn open_screen(
    c: &mut Clients,
    id: &str,
) -> Result<tonic::Streaming<proto::v1::FrameUpdate>> {
    Ok(c.console
        .stream_framebuffer(FramebufferRequest {
            vm_id: id.into(),
            encoding: TileEncoding::Lz4 as i32,
        })
        .await?
        .into_inner())
}

/// Read `stream` until the screen shows the guest's pattern. With `as_changes`, the first
/// (full) frame must not show it yet: the pattern has to arrive as changes.
async fn screen_shows_pattern(
    mut stream: tonic::Streaming<proto::v1::FrameUpdate>,
    as_changes: bool,
) -> Result<()> {
    let mut fb: Vec<u8> = Vec::new();
    let (mut w, mut h) = (0u32, 0u32);
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut updates = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let u = match tokio::time::timeout(left, stream.message()).await {
            Ok(Ok(Some(u))) => u,
            other => bail!("framebuffer stream: {other:?} after {updates} updates"),
        };
        updates += 1;
        if updates == 1 {
            ensure!(u.full && u.active, "the first update is not a full frame");
            w = u.width;
            h = u.height;
            ensure!((w, h) == (1024, 768), "{w}x{h}");
            fb = vec![0; (w * h * 4) as usize];
        }
        for t in &u.tiles {
            let px = decode(t)?;
            for r in 0..t.height {
                let dst = (((t.y + r) * w + t.x) * 4) as usize;
                let src = (r * t.width * 4) as usize;
                fb[dst..dst + (t.width * 4) as usize]
                    .copy_from_slice(&px[src..src + (t.width * 4) as usize]);
            }
        }
        let matches = (0..h).step_by(7).all(|y| {
            (0..w).step_by(13).all(|x| {
                let i = ((y * w + x) * 4) as usize;
                fb[i..i + 3] == expected_pixel(y, h)[..3]
            })
        });
        if matches {
            ensure!(
                !(as_changes && updates == 1),
                "the pattern was on the screen before the stream began"
            );
            return Ok(());
        }
    }
}

async fn vm_lifecycle(c: &mut Clients) -> Result<()> {
    let mut events = c
        .host
        .watch_events(WatchEventsRequest {})
        .await?
        .into_inner();
    let first = events.message().await?.context("no snapshot")?;
    ensure!(
        matches!(first.kind, Some(event::Kind::Snapshot(_))),
        "the first event is not a snapshot"
    );
    let vm =
        c.vm.create_vm(CreateVmRequest {
            spec: Some(spec("web", "console=ttyS0 parvis.test=fb,hold")),
        })
        .await?
        .into_inner();
    ensure!(vm.state == VmState::Off as i32);
    let e =
        c.vm.pause_vm(VmRef {
            vm_id: vm.id.clone(),
        })
        .await
        .unwrap_err();
    ensure!(
        e.code() == Code::FailedPrecondition,
        "pause while off: {e:?}"
    );
    let started =
        c.vm.start_vm(VmRef {
            vm_id: vm.id.clone(),
        })
        .await?
        .into_inner();
    ensure!(started.state == VmState::Running as i32, "{started:?}");
    let e =
        c.vm.start_vm(VmRef {
            vm_id: vm.id.clone(),
        })
        .await
        .unwrap_err();
    ensure!(e.code() == Code::FailedPrecondition, "start twice: {e:?}");
    let e =
        c.vm.delete_vm(VmRef {
            vm_id: vm.id.clone(),
        })
        .await
        .unwrap_err();
    ensure!(
        e.code() == Code::FailedPrecondition,
        "delete while running: {e:?}"
    );
    // Watching from before the guest draws: the pattern can only arrive as the boot
    // framebuffer's written rows (KVM's dirty page log; the agent does not search).
    let screen = open_screen(c, &vm.id).await?;
    parvis_tests::client::serial_until(c, &vm.id, "PARVIS-FB-DRAWN=1024x768x32", false, 240)
        .await
        .context("serial shows the guest booting and drawing")?;
    screen_shows_pattern(screen, true)
        .await
        .context("the framebuffer stream shows the guest's pattern")?;
    c.vm.shutdown_vm(VmRef {
        vm_id: vm.id.clone(),
    })
    .await?;
    let off = wait_state(c, &vm.id, VmState::Off, 120).await?;
    ensure!(
        off.state_reason.contains("powered off"),
        "{}",
        off.state_reason
    );
    // The event stream saw the VM run and stop.
    let mut saw_running = false;
    let mut saw_off = false;
    while let Ok(Ok(Some(ev))) =
        tokio::time::timeout(Duration::from_millis(500), events.message()).await
    {
        if let Some(event::Kind::VmChanged(v)) = ev.kind
            && v.id == vm.id
        {
            saw_running |= v.state == VmState::Running as i32;
            saw_off |= v.state == VmState::Off as i32;
        }
    }
    ensure!(
        saw_running && saw_off,
        "events: running {saw_running}, off {saw_off}"
    );
    c.vm.delete_vm(VmRef { vm_id: vm.id }).await?;
    Ok(())
}

/// A 64 MiB dynamic VHDX whose first 6 MiB hold a pattern; returns the file and the
/// SHA-256 of the whole virtual disk.
fn make_vhdx(dir: &Path) -> Result<(std::path::PathBuf, String)> {
    use parvis_disk::image::{CreateOptions, Variant, create};
    let path = dir.join("upload.vhdx");
    let img = create(
        &path,
        &CreateOptions {
            format: parvis_disk::ImageFormat::Vhdx,
            variant: Variant::Dynamic,
            size: 64 << 20,
            block_size: None,
            logical_sector_size: 512,
        },
    )?;
    let data = parvis_tests::pattern(6 << 20, 42);
    img.device().write_at(&data, 0)?;
    img.device().flush()?;
    drop(img);
    let mut h = Sha256::new();
    h.update(&data);
    h.update(vec![0u8; (64 << 20) - (6 << 20)]);
    Ok((path, hex::encode(h.finalize())))
}

async fn send_range(c: &mut Clients, id: &str, file: &[u8], from: u64, to: u64) -> Result<()> {
    let mut msgs = Vec::new();
    let mut off = from;
    while off < to {
        let end = (off + (256 << 10)).min(to);
        msgs.push(UploadChunk {
            upload_id: if off == from {
                id.into()
            } else {
                String::new()
            },
            offset: off,
            data: bytes::Bytes::copy_from_slice(&file[off as usize..end as usize]),
        });
        off = end;
    }
    c.disk.upload_disk(tokio_stream::iter(msgs)).await?;
    Ok(())
}

async fn upload(live: &mut Live, c: &mut Clients, t: &Target) -> Result<String> {
    let (path, virtual_sha) = make_vhdx(live.share())?;
    let file = std::fs::read(&path)?;
    let sha = hex::encode(Sha256::digest(&file));
    let st = c
        .disk
        .begin_upload(BeginUploadRequest {
            name: "uploaded".into(),
            size: file.len() as u64,
            sha256: sha,
        })
        .await?
        .into_inner();
    let id = st.upload_id.clone();
    // Part of the file, then the connection is cut mid-stream (the client goes away).
    let half = (file.len() as u64 / 2) & !511;
    {
        let mut c2 = client::connect(t).await?;
        let id2 = id.clone();
        let part = file[..half as usize].to_vec();
        let h = tokio::spawn(async move { send_range(&mut c2, &id2, &part, 0, half).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        h.abort();
        let _ = h.await;
    }
    // The agent may still be storing chunks that arrived before the cut: wait until the
    // verified offset stops moving. Then a wrong resume offset is refused with it.
    let mut resume = u64::MAX;
    loop {
        let st = c
            .disk
            .get_upload(UploadRef {
                upload_id: id.clone(),
            })
            .await?
            .into_inner();
        if st.verified_offset == resume {
            break;
        }
        resume = st.verified_offset;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    ensure!(resume <= half, "verified {resume} > sent {half}");
    if resume + 512 < file.len() as u64 {
        let e = send_range(c, &id, &file, resume + 512, file.len() as u64)
            .await
            .unwrap_err();
        ensure!(
            format!("{e:#}").contains(&resume.to_string()),
            "a wrong offset was not refused with the expected one: {e:#}"
        );
    }
    // The agent is killed with SIGKILL in the middle; what it had verified survives.
    let (rc, out) = live.exec(
        "kill -9 \"$(cat agent.pid)\"; sleep 0.5; sh start-agent.sh; sleep 1; echo restarted",
        Duration::from_secs(60),
    )?;
    ensure!(rc == 0, "restart: {out}");
    let mut c = reconnect(t).await?;
    let st = c
        .disk
        .get_upload(UploadRef {
            upload_id: id.clone(),
        })
        .await?
        .into_inner();
    ensure!(
        st.state == UploadState::Receiving as i32,
        "after an agent restart the upload is {st:?}"
    );
    send_range(&mut c, &id, &file, st.verified_offset, file.len() as u64).await?;
    let st = c
        .disk
        .get_upload(UploadRef {
            upload_id: id.clone(),
        })
        .await?
        .into_inner();
    if !st.task_id.is_empty() {
        let mut w = c
            .disk
            .watch_task(TaskRef {
                task_id: st.task_id.clone(),
            })
            .await?
            .into_inner();
        while let Some(task) = w.message().await? {
            if task.state != TaskState::Running as i32 {
                break;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let st = loop {
        let st = c
            .disk
            .get_upload(UploadRef {
                upload_id: id.clone(),
            })
            .await?
            .into_inner();
        if st.state != UploadState::Verifying as i32 && st.state != UploadState::Receiving as i32 {
            break st;
        }
        ensure!(Instant::now() < deadline, "upload never finished: {st:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    ensure!(
        st.state == UploadState::Done as i32,
        "upload ended as {st:?}"
    );
    let disks = c
        .disk
        .list_disks(ListDisksRequest {})
        .await?
        .into_inner()
        .disks;
    let d = disks
        .iter()
        .find(|d| d.id == st.disk_id)
        .context("the new disk is not listed")?;
    ensure!(
        d.format == DiskFormat::Vhdx as i32 && d.virtual_size == 64 << 20,
        "{d:?}"
    );
    std::fs::write(live.path("upload.virtual.sha256"), virtual_sha)?;
    Ok(st.disk_id)
}

async fn reconnect(t: &Target) -> Result<Clients> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut c) = client::connect(t).await
            && c.host.get_host_info(GetHostInfoRequest {}).await.is_ok()
        {
            return Ok(c);
        }
        ensure!(Instant::now() < deadline, "the agent did not come back");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

async fn boot_from_disk(c: &mut Clients, disk_id: &str) -> Result<()> {
    let vm =
        c.vm.create_vm(CreateVmRequest {
            spec: Some(VmSpec {
                disks: vec![DiskAttachment {
                    disk_id: disk_id.into(),
                    read_only: true,
                    bus: DiskBus::Virtio as i32,
                    ..Default::default()
                }],
                ..spec("from-upload", "console=ttyS0 parvis.test=disk")
            }),
        })
        .await?
        .into_inner();
    c.vm.start_vm(VmRef {
        vm_id: vm.id.clone(),
    })
    .await?;
    let text = parvis_tests::client::serial_until(c, &vm.id, "PARVIS-POWEROFF", false, 240).await?;
    let got = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("PARVIS-DISK-SHA256="))
        .context("no disk checksum from the guest")?
        .trim()
        .to_string();
    ensure!(got.len() == 64, "{got}");
    let off = wait_state(c, &vm.id, VmState::Off, 60).await?;
    ensure!(
        off.state_reason.contains("powered off"),
        "{}",
        off.state_reason
    );
    // A disk in use can't be deleted.
    let e = c
        .disk
        .delete_disk(DiskRef {
            disk_id: disk_id.into(),
        })
        .await
        .unwrap_err();
    ensure!(e.code() == Code::FailedPrecondition, "{e:?}");
    c.vm.delete_vm(VmRef { vm_id: vm.id }).await?;
    VIRTUAL_SHA_CHECK.set(got).ok();
    Ok(())
}

static VIRTUAL_SHA_CHECK: OnceLock<String> = OnceLock::new();

async fn faults(live: &mut Live, t: &Target) -> Result<()> {
    let mut c = reconnect(t).await?;
    let victim =
        c.vm.create_vm(CreateVmRequest {
            spec: Some(spec("victim", "console=ttyS0 parvis.test=hold")),
        })
        .await?
        .into_inner();
    let bystander =
        c.vm.create_vm(CreateVmRequest {
            spec: Some(spec("bystander", "console=ttyS0 parvis.test=ticks,hold")),
        })
        .await?
        .into_inner();
    for id in [&victim.id, &bystander.id] {
        c.vm.start_vm(VmRef { vm_id: id.clone() }).await?;
    }
    parvis_tests::client::serial_until(&mut c, &victim.id, "PARVIS-L2-USERSPACE", false, 240)
        .await?;
    // SIGKILL the victim's worker: it is reported crashed; the other VM runs on.
    let state = std::fs::read_to_string(live.path("state.path"))?;
    let (rc, out) = live.exec(
        &format!(
            "pid=$(sed -n 's/.*\"pid\": *\\([0-9]*\\).*/\\1/p' {}/vms/{}/run.json); kill -9 \"$pid\"; echo killed $pid",
            state.trim(),
            victim.id
        ),
        Duration::from_secs(30),
    )?;
    ensure!(rc == 0 && out.contains("killed"), "{out}");
    let crashed = wait_state(&mut c, &victim.id, VmState::Crashed, 60).await?;
    ensure!(
        crashed.state_reason.contains("signal 9"),
        "{}",
        crashed.state_reason
    );
    wait_state(&mut c, &bystander.id, VmState::Running, 5).await?;
    parvis_tests::client::serial_until(&mut c, &bystander.id, "PARVIS-TICK=5", false, 120).await?;
    // SIGKILL the agent right after a create: the config is there after the restart, and
    // the running VM is adopted, not lost.
    let made =
        c.vm.create_vm(CreateVmRequest {
            spec: Some(spec("made-before-kill", "console=ttyS0")),
        })
        .await?
        .into_inner();
    let (rc, out) = live.exec(
        &format!(
            "kill -9 \"$(cat agent.pid)\"; mkdir -p {s}/vms/.new-0123456789ab; echo '{{' >{s}/vms/.new-0123456789ab/vm.json; sleep 0.5; sh start-agent.sh; echo restarted",
            s = state.trim()
        ),
        Duration::from_secs(60),
    )?;
    ensure!(rc == 0, "{out}");
    let mut c = reconnect(t).await?;
    let again =
        c.vm.get_vm(VmRef {
            vm_id: made.id.clone(),
        })
        .await?
        .into_inner();
    ensure!(
        again.spec == made.spec,
        "the config changed across the restart"
    );
    let all =
        c.vm.list_vms(proto::v1::ListVmsRequest {})
            .await?
            .into_inner()
            .vms;
    ensure!(
        all.len() == 3,
        "a half-created VM became visible: {:?}",
        all.iter()
            .map(|v| &v.spec.as_ref().unwrap().name)
            .collect::<Vec<_>>()
    );
    let b = wait_state(&mut c, &bystander.id, VmState::Running, 10)
        .await
        .context("the running VM was not adopted after the agent restart")?;
    ensure!(b.state_reason.contains("adopted"), "{}", b.state_reason);
    let v =
        c.vm.get_vm(VmRef {
            vm_id: victim.id.clone(),
        })
        .await?
        .into_inner();
    ensure!(
        v.state == VmState::Crashed as i32,
        "the crashed VM is {:?} after the restart",
        v.state
    );
    // The adopted worker still serves its console, and obeys stop.
    parvis_tests::client::serial_until(&mut c, &bystander.id, "PARVIS-TICK=", false, 30).await?;
    let stopped =
        c.vm.stop_vm(VmRef {
            vm_id: bystander.id.clone(),
        })
        .await?
        .into_inner();
    ensure!(
        stopped.state == VmState::Off as i32,
        "stop left the VM {:?} ({})",
        stopped.state,
        stopped.state_reason
    );
    Ok(())
}

fn python_client(_live: &Live, t: &Target) -> Result<()> {
    let schema = parvis_tests::build::workspace().join("proto/schema");
    let out_dir = tempfile::tempdir()?;
    let gen_ok = std::process::Command::new("python3")
        .args(["-m", "grpc_tools.protoc"])
        .arg(format!("-I{}", schema.display()))
        .arg(format!("--python_out={}", out_dir.path().display()))
        .arg(format!("--grpc_python_out={}", out_dir.path().display()))
        .args([
            "parvis/v1/common.proto",
            "parvis/v1/host.proto",
            "parvis/v1/vm.proto",
            "parvis/v1/console.proto",
            "parvis/v1/disk.proto",
        ])
        .current_dir(&schema)
        .output()
        .context("cannot run python3 -m grpc_tools.protoc (run tests/setup-host.sh)")?;
    ensure!(
        gen_ok.status.success(),
        "grpc_tools.protoc failed (is grpcio-tools installed? tests/setup-host.sh installs it): {}",
        String::from_utf8_lossy(&gen_ok.stderr)
    );
    // The certificate is fetched the way a foreign client would: from the handshake.
    let pem = fetch_cert_pem(&t.addr)?;
    std::fs::write(out_dir.path().join("agent.pem"), pem)?;
    let script = parvis_tests::build::workspace().join("tests/python/client.py");
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(&t.addr)
        .arg(&t.token)
        .arg(out_dir.path().join("agent.pem"))
        .env("PYTHONPATH", out_dir.path())
        .output()?;
    ensure!(
        out.status.success(),
        "python client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(text.contains("PYTHON-CLIENT-OK"), "{text}");
    Ok(())
}

/// The agent's certificate as PEM, read from the TLS handshake with openssl.
fn fetch_cert_pem(addr: &str) -> Result<String> {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo | openssl s_client -connect {addr} -alpn h2 2>/dev/null | openssl x509"
        ))
        .output()
        .context("cannot run openssl")?;
    let pem = String::from_utf8_lossy(&out.stdout).to_string();
    ensure!(
        pem.contains("BEGIN CERTIFICATE"),
        "no certificate from openssl"
    );
    Ok(pem)
}

#[test]
fn tls_pins_the_printed_certificate_and_rejects_bad_credentials() {
    assert_check("tls_and_auth");
}

#[test]
fn host_info_reports_kvm_and_boot_images() {
    assert_check("host_info");
}

#[test]
fn bad_specs_and_unknown_ids_get_clear_errors() {
    assert_check("bad_requests");
}

#[test]
fn a_python_grpcio_client_generated_from_the_protos_works() {
    assert_check("python_client");
}

#[test]
fn create_start_serial_framebuffer_shutdown() {
    assert_check("vm_lifecycle");
}

#[test]
fn an_interrupted_upload_resumes_across_an_agent_kill() {
    assert_check("upload_resume");
}

#[test]
fn a_vm_boots_with_the_uploaded_disk() {
    assert_check("boot_from_uploaded_disk");
    let got = VIRTUAL_SHA_CHECK.get().expect("checksum recorded");
    let (_, want) = make_vhdx(tempfile::tempdir().unwrap().path()).unwrap();
    assert_eq!(
        got, &want,
        "the guest read other bytes than the uploaded disk holds"
    );
}

#[test]
fn killed_workers_and_a_killed_agent_lose_nothing() {
    assert_check("faults");
}
