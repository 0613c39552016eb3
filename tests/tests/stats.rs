//! Resource use end to end: a real `parvis-agent` on loopback samples a running VM (its
//! worker is `fake-worker`, whose guest reads its disk at a steady 1 MiB/s) and the host;
//! `WatchStats` streams the history, then each new sample; `parvis vm stats` prints them.

use std::time::Duration;

use proto::client;
use proto::v1::{CreateVmRequest, VmRef, VmSpec, WatchStatsRequest};
use tonic::Code;

#[test]
fn the_agent_samples_the_host_and_a_running_vm_and_streams_them() {
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
        let vm =
            c.vm.create_vm(CreateVmRequest {
                spec: Some(VmSpec {
                    name: "sampled".into(),
                    cpus: 1,
                    memory_bytes: 64 << 20,
                    boot_image: "default".into(),
                    ..Default::default()
                }),
            })
            .await?
            .into_inner();
        c.vm.start_vm(VmRef {
            vm_id: vm.id.clone(),
        })
        .await?;
        let mut s = c
            .host
            .watch_stats(WatchStatsRequest {
                vm_id: vm.id.clone(),
            })
            .await?
            .into_inner();
        let first = s.message().await?.unwrap();
        assert!(first.history);
        // Two samples after the first reading: rates need two readings.
        let mut got = first.samples;
        while got.len() < 3 {
            let u = tokio::time::timeout(Duration::from_secs(10), s.message())
                .await??
                .unwrap();
            assert!(!u.history);
            got.extend(u.samples);
        }
        let last = got.last().unwrap();
        assert_eq!(last.memory_total_bytes, 64 << 20, "{last:?}");
        assert!(last.memory_used_bytes > 0, "{last:?}");
        assert_eq!(last.interval_s, 2, "{last:?}");
        // fake-worker's guest reads 1 MiB/s in 100 requests a second.
        let rate = last.disk_read_bytes_per_s as f64 / (1 << 20) as f64;
        assert!((0.8..1.25).contains(&rate), "{last:?}");
        assert!((80..125).contains(&last.disk_read_ops_per_s), "{last:?}");
        assert!(last.cpu_cores >= 0.0 && last.cpu_cores < 2.0, "{last:?}");
        assert!(got.windows(2).all(|w| w[0].time_ms < w[1].time_ms));

        let mut host = c
            .host
            .watch_stats(WatchStatsRequest::default())
            .await?
            .into_inner();
        let h = host.message().await?.unwrap();
        let h = h.samples.last().expect("the host has samples");
        assert!(h.memory_total_bytes > h.memory_used_bytes && h.memory_used_bytes > 0);
        assert!(h.disk_total_bytes >= h.disk_free_bytes && h.disk_free_bytes > 0);

        // An unknown VM is NOT_FOUND.
        let e = c
            .host
            .watch_stats(WatchStatsRequest {
                vm_id: "0123456789ab".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::NotFound);

        // The CLI prints the samples.
        let art = parvis_tests::build::artifacts()?;
        let out = std::process::Command::new(art.bin.join("parvis"))
            .args(["vm", "stats", "sampled", "--json"])
            .env("PARVIS_ADDR", &target.addr)
            .env("PARVIS_TOKEN", &target.token)
            .env(
                "PARVIS_FINGERPRINT",
                target.fingerprint.as_deref().unwrap_or(""),
            )
            .output()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(lines.len() >= 2, "{lines:?}");
        assert_eq!(lines.last().unwrap()["memory_total_bytes"], 64 << 20);
        c.vm.stop_vm(VmRef { vm_id: vm.id }).await?;
        anyhow::Ok(())
    });
    let _ = agent.kill();
    let _ = agent.wait();
    result.unwrap();
}
