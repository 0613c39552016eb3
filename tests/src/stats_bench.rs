//! `bench --only stats`: what sampling resource use costs the agent. A `parvis-agent` on
//! loopback runs 50 VMs whose workers are `fake-worker` (each answers the status request
//! with its disk totals, as the real worker does); with nobody watching anything else, the
//! agent's CPU over a minute is the sampler's (every 2 s: the host, and per VM two `/proc`
//! reads and one request to its worker). Target: < 1 % of one core.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use proto::client;
use proto::v1::{CreateVmRequest, VmRef, VmSpec, WatchStatsRequest};

use crate::fb_bench::cpu_secs;

/// What was measured.
#[derive(Debug)]
pub struct StatsBench {
    pub vms: usize,
    pub secs: f64,
    /// Agent CPU seconds over `secs`.
    pub agent_cpu: f64,
    /// Samples of one VM seen by a watcher meanwhile (there should be about secs / 2).
    pub samples_seen: usize,
}

/// Run with `vms` VMs for `secs` seconds.
pub fn run(dir: &Path, vms: usize, secs: f64) -> Result<StatsBench> {
    let worker = crate::fb_bench::fake_worker()?;
    let state = dir.join("agent-state");
    crate::agent_proc::placeholder_boot_image(&state)?;
    let worker_arg = worker.to_string_lossy().into_owned();
    let (mut agent, target) =
        crate::agent_proc::spawn_agent(&state, &["--worker", &worker_arg], None)?;
    let pid = agent.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let mut c = client::connect(&target).await?;
        let mut ids = Vec::new();
        for i in 0..vms {
            let vm =
                c.vm.create_vm(CreateVmRequest {
                    spec: Some(VmSpec {
                        name: format!("stats-{i}"),
                        cpus: 1,
                        memory_bytes: 64 << 20,
                        boot_image: "default".into(),
                        display_width: 640,
                        display_height: 480,
                        ..Default::default()
                    }),
                })
                .await?
                .into_inner();
            c.vm.start_vm(VmRef {
                vm_id: vm.id.clone(),
            })
            .await
            .with_context(|| format!("starting VM {i}"))?;
            ids.push(vm.id);
        }
        // Let every worker settle and the sampler see each once.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let mut watch = c
            .host
            .watch_stats(WatchStatsRequest {
                vm_id: ids[0].clone(),
            })
            .await?
            .into_inner();
        let _history = watch.message().await?;
        let cpu0 = cpu_secs(pid);
        let t0 = Instant::now();
        let mut seen = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(secs);
        while let Ok(Ok(Some(u))) = tokio::time::timeout_at(deadline, watch.message()).await {
            seen += u.samples.len();
        }
        let elapsed = t0.elapsed().as_secs_f64();
        let cpu = cpu_secs(pid) - cpu0;
        for id in ids {
            let _ = c.vm.stop_vm(VmRef { vm_id: id }).await;
        }
        anyhow::Ok(StatsBench {
            vms,
            secs: elapsed,
            agent_cpu: cpu,
            samples_seen: seen,
        })
    });
    let _ = agent.kill();
    let _ = agent.wait();
    result
}

pub fn print(r: &StatsBench) {
    let pct = r.agent_cpu / r.secs * 100.0;
    println!(
        "\n== Resource sampling: agent CPU with {} running VMs (fake-worker), {:.0} s ==",
        r.vms, r.secs
    );
    println!(
        "agent CPU {:.3} s = {:.2} % of one core ({:.1} µs per VM per sample); a watcher \
         got {} samples of one VM; target < 1 %: {}",
        r.agent_cpu,
        pct,
        r.agent_cpu * 1e6 / (r.vms as f64 * r.secs / 2.0),
        r.samples_seen,
        if pct < 1.0 { "met" } else { "missed" }
    );
}
