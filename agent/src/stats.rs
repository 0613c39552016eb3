//! Resource use over time: every 2 s the agent samples the host (CPU, memory, free space
//! where the disk library lives) and each running VM (its worker's CPU and resident memory,
//! the guest's RAM, what the guest read and wrote on its disks), keeps an hour of samples
//! and a day of one-minute averages, and streams new samples to whoever watches
//! (`HostService.WatchStats`).
//!
//! Sampling is cheap by design: two small `/proc` reads per VM and one status request to
//! its worker on the connection the agent keeps anyway.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::v1::StatsSample;
use tokio::sync::broadcast;

use crate::store::now_ms;

/// Time between samples.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// Samples kept at [`INTERVAL`]: one hour.
const FINE: usize = 1800;
/// Fine samples averaged into one coarse sample: one minute.
const PER_COARSE: usize = 30;
/// Coarse samples kept: one day.
const COARSE: usize = 1440;

/// Whose samples: the host (`""`) or a VM's id.
pub type Source = String;

/// One source's samples.
#[derive(Debug, Default)]
struct History {
    fine: VecDeque<StatsSample>,
    coarse: VecDeque<StatsSample>,
    /// Fine samples since the last coarse one.
    since_coarse: usize,
}

impl History {
    fn push(&mut self, s: StatsSample) {
        self.fine.push_back(s);
        if self.fine.len() > FINE {
            self.fine.pop_front();
        }
        self.since_coarse += 1;
        if self.since_coarse == PER_COARSE {
            self.since_coarse = 0;
            let last: Vec<&StatsSample> = self.fine.iter().rev().take(PER_COARSE).collect();
            self.coarse.push_back(average(&last));
            if self.coarse.len() > COARSE {
                self.coarse.pop_front();
            }
        }
    }

    /// Oldest first: the coarse samples older than the fine ones, then the fine ones.
    fn all(&self) -> Vec<StatsSample> {
        let first_fine = self.fine.front().map_or(i64::MAX, |s| s.time_ms);
        self.coarse
            .iter()
            .filter(|c| c.time_ms < first_fine)
            .chain(self.fine.iter())
            .cloned()
            .collect()
    }
}

/// The average of `samples` (newest first), dated as the newest, covering them all.
fn average(samples: &[&StatsSample]) -> StatsSample {
    let n = samples.len().max(1) as u64;
    let sum = |f: fn(&StatsSample) -> u64| samples.iter().map(|s| f(s)).sum::<u64>() / n;
    let newest = samples.first().map(|s| **s).unwrap_or_default();
    StatsSample {
        time_ms: newest.time_ms,
        interval_s: samples.iter().map(|s| s.interval_s).sum(),
        cpu_cores: samples.iter().map(|s| s.cpu_cores).sum::<f64>() / n as f64,
        memory_used_bytes: sum(|s| s.memory_used_bytes),
        memory_total_bytes: newest.memory_total_bytes,
        disk_read_bytes_per_s: sum(|s| s.disk_read_bytes_per_s),
        disk_write_bytes_per_s: sum(|s| s.disk_write_bytes_per_s),
        disk_read_ops_per_s: sum(|s| s.disk_read_ops_per_s),
        disk_write_ops_per_s: sum(|s| s.disk_write_ops_per_s),
        disk_free_bytes: newest.disk_free_bytes,
        disk_total_bytes: newest.disk_total_bytes,
    }
}

/// Every source's history and the stream of new samples.
#[derive(Debug)]
pub struct Stats {
    histories: Mutex<HashMap<Source, History>>,
    tx: broadcast::Sender<(Source, StatsSample)>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            histories: Mutex::default(),
            tx: broadcast::channel(256).0,
        }
    }
}

impl Stats {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Source, History>> {
        self.histories.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record a sample of `source` and pass it to the watchers.
    pub fn record(&self, source: &str, s: StatsSample) {
        self.lock().entry(source.to_string()).or_default().push(s);
        let _ = self.tx.send((source.to_string(), s));
    }

    /// What is kept of `source`, oldest first, and the new samples of every source from
    /// now on (subscribed under the same lock, so none falls between the two).
    pub fn watch(
        &self,
        source: &str,
    ) -> (Vec<StatsSample>, broadcast::Receiver<(Source, StatsSample)>) {
        let map = self.lock();
        let rx = self.tx.subscribe();
        (map.get(source).map(History::all).unwrap_or_default(), rx)
    }

    /// Forget a deleted VM's samples.
    pub fn forget(&self, source: &str) {
        self.lock().remove(source);
    }
}

/// CPU ticks (user + system) of a process, from `/proc/PID/stat`.
fn process_ticks(stat: &str) -> Option<u64> {
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let (_, rest) = stat.rsplit_once(')')?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. 12 and 13 after the state (field 3).
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// (busy, total) ticks of all CPUs, from `/proc/stat`.
fn host_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle and iowait are not busy.
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total.saturating_sub(idle), total))
}

/// A value of `/proc/meminfo` in bytes.
fn meminfo(text: &str, key: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line[key.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// Resident bytes of a process, from `/proc/PID/statm`.
fn resident_bytes(statm: &str, page: u64) -> Option<u64> {
    Some(statm.split_whitespace().nth(1)?.parse::<u64>().ok()? * page)
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`: 100 on every Linux that matters).
const TICKS_PER_SEC: f64 = 100.0;

/// `(now - before) / secs`, 0 when the counter went backwards (a new worker).
fn rate(now: u64, before: u64, secs: f64) -> u64 {
    if secs <= 0.0 {
        return 0;
    }
    (now.saturating_sub(before) as f64 / secs) as u64
}

/// What a VM's previous sample read, to make rates of.
#[derive(Debug, Clone, Copy)]
struct VmReading {
    pid: i32,
    at: Instant,
    ticks: u64,
    disk: DiskTotals,
}

/// A VM's disk I/O summed over its disks.
#[derive(Debug, Clone, Copy, Default)]
struct DiskTotals {
    read_bytes: u64,
    write_bytes: u64,
    read_ops: u64,
    write_ops: u64,
}

/// The host's previous reading.
#[derive(Debug, Clone, Copy)]
struct HostReading {
    at: Instant,
    busy: u64,
    total: u64,
}

/// Turns readings into samples: keeps each source's previous reading.
#[derive(Debug, Default)]
pub struct Sampler {
    host: Option<HostReading>,
    vms: HashMap<String, VmReading>,
}

/// A VM's worker process, as the sampler needs it.
#[derive(Debug, Clone)]
pub struct VmId {
    pub id: String,
    pub pid: i32,
    /// The guest's RAM.
    pub memory_bytes: u64,
}

/// A running VM: its worker process and the connection to ask it for its disks' totals.
#[derive(Debug, Clone)]
pub struct RunningVm {
    pub vm: VmId,
    pub worker: Arc<crate::worker::WorkerConn>,
}

impl Sampler {
    /// The host's sample, from `/proc/stat` and `/proc/meminfo` text and the space where
    /// disks live; None the first time (a rate needs two readings).
    fn host(
        &mut self,
        stat: &str,
        meminfo_text: &str,
        space: (u64, u64),
        now: Instant,
    ) -> Option<StatsSample> {
        let (busy, total) = host_ticks(stat)?;
        let before = self.host.replace(HostReading {
            at: now,
            busy,
            total,
        })?;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let dt = total.saturating_sub(before.total);
        let cpu_cores = if dt == 0 {
            0.0
        } else {
            busy.saturating_sub(before.busy) as f64 / dt as f64 * cpus
        };
        let mem_total = meminfo(meminfo_text, "MemTotal:").unwrap_or(0);
        let mem_avail = meminfo(meminfo_text, "MemAvailable:").unwrap_or(0);
        Some(StatsSample {
            time_ms: now_ms(),
            interval_s: now
                .saturating_duration_since(before.at)
                .as_secs_f64()
                .round() as u32,
            cpu_cores,
            memory_used_bytes: mem_total.saturating_sub(mem_avail),
            memory_total_bytes: mem_total,
            disk_free_bytes: space.0,
            disk_total_bytes: space.1,
            ..Default::default()
        })
    }

    /// A VM's sample from its worker's `/proc` text and disk totals; None the first time
    /// (or for a new worker).
    fn vm(
        &mut self,
        vm: &VmId,
        stat: &str,
        statm: &str,
        disks: &[proto::worker::DiskIo],
        now: Instant,
    ) -> Option<StatsSample> {
        let ticks = process_ticks(stat)?;
        let mut disk = DiskTotals::default();
        for d in disks {
            disk.read_bytes += d.read_bytes;
            disk.write_bytes += d.write_bytes;
            disk.read_ops += d.read_ops;
            disk.write_ops += d.write_ops;
        }
        let before = self.vms.insert(
            vm.id.clone(),
            VmReading {
                pid: vm.pid,
                at: now,
                ticks,
                disk,
            },
        )?;
        if before.pid != vm.pid {
            return None;
        }
        let secs = now.saturating_duration_since(before.at).as_secs_f64();
        let page = rustix::param::page_size() as u64;
        Some(StatsSample {
            time_ms: now_ms(),
            interval_s: secs.round() as u32,
            cpu_cores: if secs > 0.0 {
                ticks.saturating_sub(before.ticks) as f64 / TICKS_PER_SEC / secs
            } else {
                0.0
            },
            memory_used_bytes: resident_bytes(statm, page).unwrap_or(0),
            memory_total_bytes: vm.memory_bytes,
            disk_read_bytes_per_s: rate(disk.read_bytes, before.disk.read_bytes, secs),
            disk_write_bytes_per_s: rate(disk.write_bytes, before.disk.write_bytes, secs),
            disk_read_ops_per_s: rate(disk.read_ops, before.disk.read_ops, secs),
            disk_write_ops_per_s: rate(disk.write_ops, before.disk.write_ops, secs),
            ..Default::default()
        })
    }

    /// Forget the VMs not in `running`.
    fn retain(&mut self, running: &[RunningVm]) {
        self.vms
            .retain(|id, _| running.iter().any(|v| &v.vm.id == id));
    }
}

/// Sample the host and every running VM every [`INTERVAL`] until the process ends.
pub async fn run(
    stats: Arc<Stats>,
    disks_dir: std::path::PathBuf,
    running: impl Fn() -> Vec<RunningVm> + Send + 'static,
    guest: impl Fn(&str, Option<proto::worker::GuestReport>) + Send + 'static,
) {
    let mut sampler = Sampler::default();
    let mut tick = tokio::time::interval(INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let vms = running();
        sampler.retain(&vms);
        // Each worker's disk totals (a worker that does not answer is left out this time).
        let mut disks = Vec::with_capacity(vms.len());
        for v in &vms {
            let status = v
                .worker
                .call(proto::worker::request::Kind::Query(proto::worker::Empty {}))
                .await
                .ok()
                .and_then(|r| r.status);
            if let Some(s) = &status {
                guest(&v.vm.id, s.guest.clone());
            }
            disks.push(status.map(|s| s.disks));
        }
        let now = Instant::now();
        let read = |p: String| std::fs::read_to_string(p).unwrap_or_default();
        let space = rustix::fs::statvfs(&disks_dir)
            .map(|s| (s.f_bavail * s.f_frsize, s.f_blocks * s.f_frsize))
            .unwrap_or((0, 0));
        if let Some(s) = sampler.host(
            &read("/proc/stat".into()),
            &read("/proc/meminfo".into()),
            space,
            now,
        ) {
            stats.record("", s);
        }
        for (v, disks) in vms.iter().zip(disks) {
            let Some(disks) = disks else { continue };
            let stat = read(format!("/proc/{}/stat", v.vm.pid));
            let statm = read(format!("/proc/{}/statm", v.vm.pid));
            if let Some(s) = sampler.vm(&v.vm, &stat, &statm, &disks, now) {
                stats.record(&v.vm.id, s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\n";
    const STAT2: &str = "cpu  200 0 100 900 50 0 0 0 0 0\ncpu0 100 0 50 450 25 0 0 0 0 0\n";

    #[test]
    fn proc_text_is_read_as_the_kernel_writes_it() {
        let stat = "4242 (parvis worker) S 1 2 3 4 5 6 7 8 9 10 300 200 0 0 20 0 3 0";
        assert_eq!(process_ticks(stat), Some(500));
        assert_eq!(process_ticks("garbage"), None);
        assert_eq!(host_ticks(STAT), Some((150, 1000)));
        let mi = "MemTotal:       16384 kB\nMemAvailable:    4096 kB\n";
        assert_eq!(meminfo(mi, "MemTotal:"), Some(16 << 20));
        assert_eq!(resident_bytes("100 25 3 1 0 20 0", 4096), Some(25 * 4096));
    }

    #[test]
    fn rates_need_two_readings_of_the_same_worker() {
        let mut s = Sampler::default();
        let t0 = Instant::now();
        assert!(s.host(STAT, "", (10, 20), t0).is_none());
        let h = s
            .host(
                STAT2,
                "MemTotal: 4 kB\nMemAvailable: 1 kB\n",
                (10, 20),
                t0 + INTERVAL,
            )
            .unwrap();
        // 150 of 250 ticks busy.
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        assert!((h.cpu_cores - 0.6 * cpus).abs() < 1e-9, "{}", h.cpu_cores);
        assert_eq!((h.memory_used_bytes, h.memory_total_bytes), (3072, 4096));
        assert_eq!((h.disk_free_bytes, h.disk_total_bytes), (10, 20));
        assert_eq!(h.interval_s, 2);

        let vm = VmId {
            id: "0123456789ab".into(),
            pid: 7,
            memory_bytes: 1 << 30,
        };
        let io = |rb, wb, ro, wo| proto::worker::DiskIo {
            read_bytes: rb,
            write_bytes: wb,
            read_ops: ro,
            write_ops: wo,
            ..Default::default()
        };
        let stat = |t: u64| format!("7 (w) S 1 2 3 4 5 6 7 8 9 10 {t} 0 0 0");
        assert!(
            s.vm(&vm, &stat(100), "10 5", &[io(0, 0, 0, 0)], t0)
                .is_none()
        );
        let v = s
            .vm(
                &vm,
                &stat(200),
                "10 5",
                &[io(4 << 20, 0, 4, 0), io(0, 2 << 20, 0, 8)],
                t0 + INTERVAL,
            )
            .unwrap();
        assert!((v.cpu_cores - 0.5).abs() < 1e-9, "{}", v.cpu_cores);
        assert_eq!(v.memory_total_bytes, 1 << 30);
        assert_eq!(v.disk_read_bytes_per_s, 2 << 20);
        assert_eq!(v.disk_write_bytes_per_s, 1 << 20);
        assert_eq!((v.disk_read_ops_per_s, v.disk_write_ops_per_s), (2, 4));
        // A restarted VM (another worker) starts over.
        let other = VmId {
            pid: 8,
            ..vm.clone()
        };
        assert!(
            s.vm(&other, &stat(5), "10 5", &[], t0 + 2 * INTERVAL)
                .is_none()
        );
    }

    #[test]
    fn an_hour_of_samples_then_a_day_of_minutes() {
        let stats = Stats::default();
        let (_, mut rx) = stats.watch("");
        for i in 0..(FINE + 2 * PER_COARSE) as i64 {
            stats.record(
                "",
                StatsSample {
                    time_ms: i * 2000,
                    interval_s: 2,
                    cpu_cores: (i % 2) as f64,
                    ..Default::default()
                },
            );
            if i == 0 {
                // Watchers get each sample as it comes.
                let (src, first) = rx.try_recv().unwrap();
                assert_eq!((src.as_str(), first.time_ms), ("", 0));
            }
        }
        let (all, _) = stats.watch("");
        // The hour of fine samples, and the coarse minutes from before it.
        let fine: Vec<_> = all.iter().filter(|s| s.interval_s == 2).collect();
        let coarse: Vec<_> = all.iter().filter(|s| s.interval_s == 60).collect();
        assert_eq!(fine.len(), FINE);
        assert_eq!(coarse.len(), 2);
        assert!((coarse[0].cpu_cores - 0.5).abs() < 1e-9);
        assert!(all.windows(2).all(|w| w[0].time_ms < w[1].time_ms));
        assert!(stats.watch("nope").0.is_empty());
    }
}
