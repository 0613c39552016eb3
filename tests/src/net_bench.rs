//! `bench --only net`: TCP throughput both ways and ping round trips between the test host
//! and one guest, for Parvis's synthetic NIC (netvsc over VMBus, TAP backend) and QEMU's
//! virtio-net (userspace, TAP backend; the test host's kernel has no vhost-net), in one
//! test host, the same kernel and initramfs, the same bridge.
//!
//! The guest fetches a blob from the test host's busybox httpd (host → guest), then serves
//! one the test host fetches (guest → host); each side times its own wget with
//! /proc/uptime (10 ms resolution). Then the test host pings the guest 20 times.
//!
//! Figures are from the emulated test host (nested KVM under TCG): they compare the two
//! devices on the same path, they are not what real hardware does.

use anyhow::{Context, Result, bail};

use crate::Scenario;
use crate::bench_support::pack_qemu;
use crate::markers::marker;

/// MiB moved each way.
pub const MIB: u32 = 32;

const SCRIPT: &str = r#"
K="--kernel $IMAGES/vmlinux --initrd $IMAGES/l2-initramfs.cpio --memory 256M"
C="console=ttyS0 quiet panic=-1 parvis.test=net,netbench parvis.ip=10.77.0.2/24 parvis.ping=10.77.0.1 parvis.netmib=$MIB"
Q=$(mktemp -d)
cp -r "$SHARE/q/." "$Q/" && chmod +x "$Q/qemu-system-x86_64" "$Q/ld-linux-x86-64.so.2"
QEMU="$Q/ld-linux-x86-64.so.2 --library-path $Q $Q/qemu-system-x86_64 -L $Q/share"
modprobe tun
modprobe bridge
brctl addbr pvbr0
ip link set pvbr0 up
ip addr add 10.77.0.1/24 dev pvbr0
mkdir -p /tmp/www
dd if=/dev/zero of=/tmp/www/blob bs=1048576 count=$MIB 2>/dev/null
httpd -p 10.77.0.1:8080 -h /tmp/www
attach() {
    n=0
    while [ ! -e "/sys/class/net/$1" ] && [ $n -lt 300 ]; do n=$((n + 1)); sleep 0.1; done
    brctl addif pvbr0 "$1"
    ip link set "$1" up
}
# measure NAME PID: once the guest serves, fetch its blob and ping it, then stop it.
measure() {
    if wait_for PARVIS-NETBENCH-SERVING "$1.out" 400; then
        t0=$(cut -d' ' -f1 /proc/uptime)
        wget -q -O /dev/null http://10.77.0.2:8080/blob
        rc=$?
        t1=$(cut -d' ' -f1 /proc/uptime)
        echo "$rc $t0 $t1" >"$1.g2h"
        ping -c 20 10.77.0.2 >"$1.ping" 2>&1
    fi
    kill "$2"
    wait "$2"
    # The TAP goes with its owner; wait until it has.
    n=0
    while [ -e "/sys/class/net/$3" ] && [ $n -lt 100 ]; do n=$((n + 1)); sleep 0.1; done
}

echo "BENCH: parvis netvsc"
timeout -k 10 600 parvis-worker $K --hyperv kernel --nic tap=pvtap0,mac=02:50:76:00:00:0a \
    --cmdline "$C" </dev/null >parvis.out 2>parvis.err &
pid=$!
attach pvtap0
measure parvis $pid pvtap0

echo "BENCH: qemu virtio-net"
timeout -k 10 600 $QEMU -enable-kvm -M q35 -nodefaults -vga none -m 256M -smp 1 -cpu host \
    -display none -monitor none -serial stdio -no-reboot \
    -netdev tap,id=n0,ifname=qtap0,script=no,downscript=no \
    -device virtio-net-pci,netdev=n0,mac=02:50:76:00:00:0b,romfile= \
    -kernel "$IMAGES/vmlinux" -initrd "$IMAGES/l2-initramfs.cpio" -append "$C" \
    </dev/null >qemu.out 2>qemu.err &
pid=$!
attach qtap0
measure qemu $pid qtap0
"#;

/// One device's figures.
#[derive(Debug, Clone)]
pub struct NetFigures {
    pub label: &'static str,
    pub driver: String,
    /// Mbit/s host → guest and guest → host.
    pub h2g_mbps: f64,
    pub g2h_mbps: f64,
    /// Average ping round trip, ms.
    pub rtt_ms: f64,
}

/// Throughput of `MIB` MiB over `t0..t1` seconds, in Mbit/s.
fn mbps(line: &str) -> Result<f64> {
    let w: Vec<&str> = line.split_whitespace().collect();
    let [rc, t0, t1] = w[..] else {
        bail!("unexpected timing line '{line}'");
    };
    if rc != "0" {
        bail!("the transfer failed (wget status {rc})");
    }
    let secs = t1.parse::<f64>()? - t0.parse::<f64>()?;
    if secs <= 0.0 {
        bail!("the transfer took no measurable time");
    }
    Ok(f64::from(MIB) * 8.0 * 1.048_576 / secs)
}

/// "round-trip min/avg/max = 0.3/0.5/0.9 ms" → 0.5.
fn rtt(ping: &str) -> Result<f64> {
    let l = ping
        .lines()
        .find(|l| l.contains("min/avg/max"))
        .with_context(|| format!("no round-trip summary in:\n{ping}"))?;
    let nums = l.rsplit('=').next().unwrap_or("").trim();
    let avg = nums.split('/').nth(1).context("no average round trip")?;
    Ok(avg.trim_end_matches(" ms").trim().parse()?)
}

/// Run the scenario.
pub fn run(qemu: &std::path::Path) -> Result<Vec<NetFigures>> {
    let script = format!("MIB={MIB}\n{SCRIPT}");
    let o = Scenario::new("net-bench", &script)
        .timeout(std::time::Duration::from_secs(1800))
        .run(|share| pack_qemu(qemu, &share.join("q")))
        .context("the network benchmark scenario could not run")?;
    let mut out = Vec::new();
    for (name, label) in [("parvis", "Parvis netvsc"), ("qemu", "QEMU virtio-net")] {
        let guest = o.file(&format!("{name}.out"));
        let h2g = marker(&guest, "PARVIS-NETBENCH-H2G")
            .with_context(|| format!("{label}: the guest reported no transfer:\n{guest}"))?;
        out.push(NetFigures {
            label,
            driver: marker(&guest, "PARVIS-NET-DRIVER")
                .unwrap_or("?")
                .to_string(),
            h2g_mbps: mbps(h2g).with_context(|| format!("{label}, host to guest:\n{guest}"))?,
            g2h_mbps: mbps(&o.file(&format!("{name}.g2h")))
                .with_context(|| format!("{label}, guest to host"))?,
            rtt_ms: rtt(&o.file(&format!("{name}.ping")))
                .with_context(|| format!("{label}, ping"))?,
        });
    }
    Ok(out)
}

/// Print the figures and the ratios against QEMU.
pub fn print(r: &[NetFigures]) {
    println!(
        "network, test host (nested KVM under TCG), {MIB} MiB each way over HTTP, TAP on one bridge:"
    );
    for f in r {
        println!(
            "  {:<16} ({:>10}): host->guest {:>7.1} Mbit/s  guest->host {:>7.1} Mbit/s  ping {:>6.2} ms",
            f.label, f.driver, f.h2g_mbps, f.g2h_mbps, f.rtt_ms
        );
    }
    if let [p, q] = r {
        println!(
            "  netvsc / QEMU virtio-net: host->guest {:.2}x  guest->host {:.2}x  round trip {:.2}x (lower is better)",
            p.h2g_mbps / q.h2g_mbps,
            p.g2h_mbps / q.g2h_mbps,
            p.rtt_ms / q.rtt_ms
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_parse() {
        assert!((mbps("0 10.00 12.00").unwrap() - 134.217_728).abs() < 1e-6);
        assert!(mbps("1 10.00 12.00").is_err());
        assert!(mbps("0 10.00 10.00").is_err());
        assert!(mbps("").is_err());
        let ping = "20 packets transmitted, 20 packets received, 0% packet loss\n\
                    round-trip min/avg/max = 0.412/1.234/9.000 ms\n";
        assert!((rtt(ping).unwrap() - 1.234).abs() < 1e-9);
        assert!(rtt("100% packet loss").is_err());
    }
}
