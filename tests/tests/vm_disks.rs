//! Disks and buses end to end, with a real `parvis-agent` on loopback (its workers are
//! `fake-worker`) and the `parvis` CLI: VHD/VHDX disks default to SCSI and raw ones to
//! virtio-blk, SCSI disks get the lowest free LUN, SCSI disks come and go on a running VM
//! while virtio-blk ones are refused with a reason, and `vm get --json` says where each
//! disk sits.

use proto::client::{self, Clients, Target};
use proto::v1::{
    AttachDiskRequest, CreateDiskRequest, CreateVmRequest, DetachDiskRequest, DiskAttachment,
    DiskBus, DiskFormat, DiskVariant, VmRef, VmSpec,
};
use tonic::Code;

fn cli(target: &Target, args: &[&str]) -> (bool, String, String) {
    parvis_tests::client::parvis(target, args).unwrap_or_else(|e| panic!("{e:#}"))
}

async fn disk(c: &mut Clients, name: &str, format: DiskFormat) -> anyhow::Result<String> {
    Ok(c.disk
        .create_disk(CreateDiskRequest {
            name: name.into(),
            format: format as i32,
            variant: if format == DiskFormat::Raw {
                DiskVariant::Fixed
            } else {
                DiskVariant::Dynamic
            } as i32,
            size: 16 << 20,
            logical_sector_size: 0,
        })
        .await?
        .into_inner()
        .id)
}

fn bus(d: &DiskAttachment) -> DiskBus {
    DiskBus::try_from(d.bus).unwrap()
}

#[test]
fn scsi_disks_come_and_go_on_a_running_vm_and_virtio_ones_wait_for_it_to_be_off() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    parvis_tests::agent_proc::placeholder_boot_image(&state).unwrap();
    let (mut agent, target) = parvis_tests::agent_proc::spawn_agent(
        &state,
        &["--worker", env!("CARGO_BIN_EXE_fake-worker")],
        Some(&dir.path().join("agent.log")),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let result = rt.block_on(async {
        let mut c = client::connect(&target).await?;
        let imported = disk(&mut c, "imported", DiskFormat::Vhdx).await?;
        let raw = disk(&mut c, "scratch", DiskFormat::Raw).await?;
        let extra = disk(&mut c, "extra", DiskFormat::Vhdx).await?;
        let more = disk(&mut c, "more", DiskFormat::Raw).await?;
        let att = |id: &str| DiskAttachment {
            disk_id: id.into(),
            ..Default::default()
        };
        let vm =
            c.vm.create_vm(CreateVmRequest {
                spec: Some(VmSpec {
                    name: "disks".into(),
                    cpus: 1,
                    memory_bytes: 64 << 20,
                    boot_image: "default".into(),
                    disks: vec![att(&imported), att(&raw)],
                    ..Default::default()
                }),
            })
            .await?
            .into_inner();
        let d = vm.spec.clone().unwrap().disks;
        assert_eq!((bus(&d[0]), d[0].lun), (DiskBus::Scsi, Some(0)));
        assert_eq!((bus(&d[1]), d[1].lun), (DiskBus::Virtio, None));

        // The CLI says where each disk sits.
        let (ok, out, err) = cli(&target, &["vm", "get", "disks", "--json"]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out)?;
        assert_eq!(v["disks"][0]["bus"], "scsi");
        assert_eq!(v["disks"][0]["lun"], 0);
        assert_eq!(v["disks"][1]["bus"], "virtio");
        assert!(v["disks"][1]["lun"].is_null());

        c.vm.start_vm(VmRef {
            vm_id: vm.id.clone(),
        })
        .await?;

        // A SCSI disk joins the running VM at the next free LUN.
        let (ok, out, err) = cli(&target, &["vm", "disk", "add", "disks", "extra"]);
        assert!(ok, "{err}");
        assert!(out.contains("as SCSI 0:1"), "{out}");
        let (ok, out, err) = cli(&target, &["vm", "get", "disks", "--json"]);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out)?;
        assert_eq!(v["disks"][2]["disk_id"], extra.as_str());
        assert_eq!(v["disks"][2]["lun"], 1);

        // virtio-blk cannot join or leave while it runs; the reason says so.
        let e =
            c.vm.attach_disk(AttachDiskRequest {
                vm_id: vm.id.clone(),
                disk: Some(DiskAttachment {
                    bus: DiskBus::Virtio as i32,
                    ..att(&more)
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.message().contains("only SCSI disks"), "{}", e.message());
        let (ok, _, err) = cli(&target, &["vm", "disk", "remove", "disks", "scratch"]);
        assert!(!ok);
        assert!(err.contains("virtio-blk"), "{err}");
        // A LUN already taken, a disk attached twice, a disk that does not exist.
        let e =
            c.vm.attach_disk(AttachDiskRequest {
                vm_id: vm.id.clone(),
                disk: Some(DiskAttachment {
                    bus: DiskBus::Scsi as i32,
                    lun: Some(1),
                    ..att(&more)
                }),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        let e =
            c.vm.attach_disk(AttachDiskRequest {
                vm_id: vm.id.clone(),
                disk: Some(att(&extra)),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let e =
            c.vm.attach_disk(AttachDiskRequest {
                vm_id: vm.id.clone(),
                disk: Some(att("0123456789ab")),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);

        // It leaves again; the stored settings follow.
        let (ok, out, err) = cli(&target, &["vm", "disk", "remove", "disks", "extra"]);
        assert!(ok, "{err}");
        assert!(out.contains("Removed disk 'extra'"), "{out}");
        let v =
            c.vm.get_vm(VmRef {
                vm_id: vm.id.clone(),
            })
            .await?
            .into_inner();
        assert_eq!(v.spec.unwrap().disks.len(), 2);

        // A disk another running VM writes cannot join.
        let other =
            c.vm.create_vm(CreateVmRequest {
                spec: Some(VmSpec {
                    name: "other".into(),
                    cpus: 1,
                    memory_bytes: 64 << 20,
                    boot_image: "default".into(),
                    disks: vec![att(&extra)],
                    ..Default::default()
                }),
            })
            .await?
            .into_inner();
        c.vm.start_vm(VmRef {
            vm_id: other.id.clone(),
        })
        .await?;
        let e =
            c.vm.attach_disk(AttachDiskRequest {
                vm_id: vm.id.clone(),
                disk: Some(att(&extra)),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(
            e.message().contains("in use by VM 'other'"),
            "{}",
            e.message()
        );

        // With the VM off, virtio-blk disks come and go too.
        c.vm.stop_vm(VmRef {
            vm_id: vm.id.clone(),
        })
        .await?;
        let v =
            c.vm.attach_disk(AttachDiskRequest {
                vm_id: vm.id.clone(),
                disk: Some(att(&more)),
            })
            .await?
            .into_inner();
        let d = v.spec.unwrap().disks;
        assert_eq!((d.len(), bus(&d[2])), (3, DiskBus::Virtio));
        let v =
            c.vm.detach_disk(DetachDiskRequest {
                vm_id: vm.id.clone(),
                disk_id: raw.clone(),
            })
            .await?
            .into_inner();
        assert_eq!(v.spec.unwrap().disks.len(), 2);
        c.vm.stop_vm(VmRef { vm_id: other.id }).await?;
        anyhow::Ok(())
    });
    let _ = agent.kill();
    let _ = agent.wait();
    result.unwrap();
}
