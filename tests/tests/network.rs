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
timeout -k 10 300 parvis-worker $K --nic tap=pvtap0,mac=02:50:76:00:00:0a --log info \
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
kill $apid $bpid
wait $apid
wait $bpid
echo 0 >b.rc
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
    let (b, berr, rc) = o.worker_run("b");
    assert_eq!(
        marker(&b, "PARVIS-PING-10.77.0.2"),
        Some("ok"),
        "{b}\n{berr}"
    );
    assert_eq!(rc, 0, "b powers off cleanly");
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
