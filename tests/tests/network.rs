//! End-to-end network tests in the test host: two VMs with the synthetic NIC (netvsc over
//! VMBus) on TAPs in one bridge of the test host, the bridge holding the host's address
//! (an internal switch). Traffic stays inside the test host.

use std::sync::OnceLock;

use parvis_tests::{Outcome, Scenario, marker};

const SCRIPT: &str = r#"
K="--kernel $IMAGES/vmlinux --initrd $IMAGES/l2-initramfs.cpio --memory 256M --hyperv kernel"
C="console=ttyS0 quiet panic=-1"
modprobe tun
modprobe bridge
brctl addbr pvbr0
ip link set pvbr0 up
ip addr add 10.77.0.1/24 dev pvbr0
mkdir -p /tmp/www
dd if=/dev/zero of=/tmp/www/blob bs=1048576 count=8 2>/dev/null
httpd -p 10.77.0.1:8080 -h /tmp/www
# attach TAP: wait until the worker has created it, then put it on the bridge.
attach() {
    n=0
    while [ ! -e "/sys/class/net/$1" ] && [ $n -lt 300 ]; do n=$((n + 1)); sleep 0.1; done
    brctl addif pvbr0 "$1"
    ip link set "$1" up
}

# VM a answers pings until it is stopped.
echo "SCENARIO: a starts at $(cut -d' ' -f1 /proc/uptime) s"
D=$(mktemp -d)
timeout -k 10 300 parvis-worker $K --nic tap=pvtap0,mac=02:50:76:00:00:0a --log info \
    --control "$D/a.sock" \
    --cmdline "$C parvis.test=net,hold parvis.ip=10.77.0.2/24 parvis.ping=10.77.0.1" \
    </dev/null >a.out 2>a.err &
apid=$!
attach pvtap0
wait_for PARVIS-PING-10.77.0.1 a.out 200
# The test host reaches the guest through the bridge.
ping -c 3 -W 2 10.77.0.2 >hostping.out 2>&1
echo $? >hostping.rc

# VM b reaches the host and a, then moves 8 MiB each way over TCP.
echo "SCENARIO: b starts at $(cut -d' ' -f1 /proc/uptime) s"
timeout -k 10 300 parvis-worker $K --nic tap=pvtap1,mac=02:50:76:00:00:0b --log info \
    --cmdline "$C parvis.test=net,netbench parvis.ip=10.77.0.3/24 parvis.ping=10.77.0.1,10.77.0.2 parvis.netmib=8" \
    </dev/null >b.out 2>b.err &
bpid=$!
attach pvtap1
if wait_for PARVIS-NETBENCH-SERVING b.out 200; then
    wget -q -O /tmp/got http://10.77.0.3:8080/blob
    echo $? >g2h.rc
    wc -c </tmp/got >g2h.size
fi
kill $bpid
wait $bpid
echo 0 >b.rc
# a's integration services: its heartbeat while it runs, stops while it is paused (a
# hung guest), comes back; then "shut down" ends it through its shutdown service.
C2="parvis-worker ctl $D/a.sock"
$C2 state >a.state 2>&1
$C2 pause >/dev/null 2>&1
sleep 14
$C2 state >a.state-paused 2>&1
$C2 resume >/dev/null 2>&1
sleep 6
$C2 state >a.state-resumed 2>&1
$C2 power-button >a.shutdown 2>&1
wait $apid
echo $? >a.rc
echo "SCENARIO: a and b stopped"
"#;

fn outcome() -> &'static Outcome {
    static CELL: OnceLock<Result<Outcome, String>> = OnceLock::new();
    let r = CELL.get_or_init(|| {
        Scenario::new("network", SCRIPT)
            .run(|_| Ok(()))
            .map_err(|e| format!("{e:#}"))
    });
    match r {
        Ok(o) => o,
        Err(e) => panic!("the network scenario could not run: {e}"),
    }
}

/// The guest's stock hv_netvsc binds the synthetic NIC and sees the MAC the host gave it.
#[test]
fn hv_netvsc_binds_with_the_configured_mac() {
    let o = outcome();
    let a = o.file("a.out");
    let (b, berr, _) = o.worker_run("b");
    assert_eq!(
        marker(&a, "PARVIS-NET-DRIVER"),
        Some("hv_netvsc"),
        "{a}\n{}",
        o.file("a.err")
    );
    assert_eq!(
        marker(&a, "PARVIS-NET-MAC"),
        Some("02:50:76:00:00:0a"),
        "{a}"
    );
    assert_eq!(
        marker(&b, "PARVIS-NET-DRIVER"),
        Some("hv_netvsc"),
        "{b}\n{berr}"
    );
    assert_eq!(
        marker(&b, "PARVIS-NET-MAC"),
        Some("02:50:76:00:00:0b"),
        "{b}"
    );
}

/// Two VMs on one switch reach each other.
#[test]
fn two_vms_on_one_switch_ping_each_other() {
    let o = outcome();
    let (b, berr, _) = o.worker_run("b");
    assert_eq!(
        marker(&b, "PARVIS-PING-10.77.0.2"),
        Some("ok"),
        "{b}\n{berr}"
    );
}

/// Bulk TCP both ways: the guest fetches 8 MiB from the host and the host 8 MiB from the
/// guest (full-size frames, batched sends and partial copies on the guest's side).
#[test]
fn bulk_tcp_both_ways_arrives_whole() {
    let o = outcome();
    let (b, berr, _) = o.worker_run("b");
    let h2g = marker(&b, "PARVIS-NETBENCH-H2G").unwrap_or_default();
    assert!(h2g.starts_with("0 "), "host to guest: {h2g}\n{b}\n{berr}");
    assert_eq!(o.file("g2h.rc").trim(), "0", "guest to host\n{berr}");
    assert_eq!(o.file("g2h.size").trim(), (8 << 20).to_string());
}

/// The host's address on the switch and the guests reach each other both ways.
#[test]
fn host_and_guests_reach_each_other() {
    let o = outcome();
    let a = o.file("a.out");
    let (b, _, _) = o.worker_run("b");
    assert_eq!(
        marker(&a, "PARVIS-PING-10.77.0.1"),
        Some("ok"),
        "{a}\n{}",
        o.file("a.err")
    );
    assert_eq!(marker(&b, "PARVIS-PING-10.77.0.1"), Some("ok"), "{b}");
    assert_eq!(
        o.file("hostping.rc").trim(),
        "0",
        "{}",
        o.file("hostping.out")
    );
}

/// The guest's heartbeat service answers while it runs, stops answering while it is paused
/// (to the host, a hung guest), and answers again after.
#[test]
fn heartbeat_follows_the_guest() {
    let o = outcome();
    let running = o.file("a.state");
    let paused = o.file("a.state-paused");
    let resumed = o.file("a.state-resumed");
    assert!(running.contains("heartbeat=ok"), "{running}");
    assert!(running.contains("shutdown-service=yes"), "{running}");
    assert!(paused.contains("heartbeat=lost"), "{paused}");
    assert!(resumed.contains("heartbeat=ok"), "{resumed}");
}

/// "Shut down" goes through the guest's shutdown service: the guest's init hears the
/// poweroff request and the VM ends cleanly.
#[test]
fn shut_down_uses_the_shutdown_service() {
    let o = outcome();
    let a = o.file("a.out");
    assert!(
        a.contains("PARVIS-SHUTDOWN-REQUEST"),
        "{a}\n{}",
        o.file("a.err")
    );
    assert_eq!(o.file("a.rc").trim(), "0", "{}", o.file("a.err"));
    assert!(
        o.file("a.err")
            .contains("shutdown requested through the shutdown service"),
        "{}",
        o.file("a.err")
    );
}
