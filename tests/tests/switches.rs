//! End to end, in the test host: the agent's virtual switches and the VMs' network
//! adapters, driven with the `parvis` CLI from this machine.
//!
//! * two VMs on a private switch reach each other;
//! * a VM on an internal switch and the test host (the switch's host address) reach each
//!   other;
//! * the MAC address the agent gave an adapter is the one the guest sees;
//! * a switch a VM uses cannot be deleted, and says why;
//! * after the agent restarts (with an internal switch's bridge deleted meanwhile), the
//!   switches are back and a VM started then is on the network;
//! * deleting a switch removes its bridge.
//!
//! One test-host boot serves every case; each `#[test]` checks one result.

use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use parvis_tests::checks::{Checks, Run, record};
use parvis_tests::client::{Cli, value_after};
use parvis_tests::live::Live;
use parvis_tests::testhost::tail;
use proto::client::{self, Clients, Target};

/// The agent keeps its state in the test host's memory; the boot image is the L2 test
/// guest, whose actions the VMs' command lines choose.
const SCRIPT: &str = r#"
modprobe tun
modprobe bridge
STATE=$(mktemp -d)/state
mkdir -p "$STATE/boot/default"
ln -s "$IMAGES/vmlinux" "$STATE/boot/default/kernel"
ln -s "$IMAGES/l2-initramfs.cpio" "$STATE/boot/default/initrd"
echo "console=ttyS0 quiet parvis.test=hold" >"$STATE/boot/default/cmdline"
echo "$STATE" >state.path
cat >start-agent.sh <<EOF
parvis-agent --state-dir "$STATE" --listen "$AGENT_LISTEN" $AGENT_TLS --worker "$BIN/parvis-worker" >>agent.out 2>>agent.err &
echo \$! >agent.pid
EOF
sh start-agent.sh
serve_commands
kill "$(cat agent.pid)" 2>/dev/null
for p in $(cat "$STATE"/vms/*/run.json 2>/dev/null | sed -n 's/.*"pid": *\([0-9]*\).*/\1/p'); do kill -9 "$p" 2>/dev/null; done
true
"#;

fn results() -> &'static Run {
    static RUN: OnceLock<Run> = OnceLock::new();
    RUN.get_or_init(|| Run::of(run))
}

/// Create VM `name` on `switch` running the guest's `net` action with `ip`, pinging
/// `ping`, then holding; returns its id.
fn vm(cli: &Cli<'_>, name: &str, switch: &str, ip: &str, ping: &str) -> Result<String> {
    let cmdline =
        format!("console=ttyS0 quiet parvis.test=net,hold parvis.ip={ip} parvis.ping={ping}");
    cli.ok(&[
        "vm",
        "create",
        "--name",
        name,
        "--memory",
        "256M",
        "--cmdline",
        &cmdline,
        "--nic",
        switch,
    ])?;
    let v = cli.json(&["vm", "get", name, "--json"])?;
    Ok(v["id"].as_str().context("no VM id")?.to_string())
}

/// The guest's serial output up to the result of its `boot`-th boot's ping to `addr`;
/// that it is `ok`.
async fn pinged(c: &mut Clients, id: &str, addr: &str, boot: usize) -> Result<String> {
    let key = format!("PARVIS-PING-{addr}=");
    let serial = parvis_tests::client::serial_until_nth(c, id, &key, boot, true, 400).await?;
    let v = serial
        .split(key.as_str())
        .nth(boot)
        .and_then(|r| r.lines().next())
        .map(str::trim);
    ensure!(v == Some("ok"), "ping {addr}: {v:?}\n{}", tail(&serial, 20));
    Ok(serial)
}

fn run(checks: &mut Checks) -> Result<()> {
    let mut live = Live::start("switches", SCRIPT, Duration::from_secs(2400), 2048)?;
    let out = live.wait_file("agent.out", "token: ", Duration::from_secs(300))?;
    let target = parvis_tests::client::agent_target(&live.addr, &out)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cli = Cli { target: &target };
    let result = rt.block_on(steps(&cli, &target, &mut live, checks));
    if result.is_err() || checks.values().any(|r| r.is_err()) {
        eprintln!(
            "agent log:\n{}",
            tail(
                &std::fs::read_to_string(live.path("agent.err")).unwrap_or_default(),
                60
            )
        );
    }
    let outcome = live.finish();
    result?;
    outcome?;
    Ok(())
}

async fn steps(cli: &Cli<'_>, target: &Target, live: &mut Live, checks: &mut Checks) -> Result<()> {
    let mut c = client::connect(target).await?;
    cli.ok(&["switch", "create", "lab", "--kind", "private"])?;
    cli.ok(&[
        "switch",
        "create",
        "hostnet",
        "--kind",
        "internal",
        "--address",
        "10.78.0.1/24",
    ])?;
    let list = cli.json(&["switch", "list", "--json"])?;
    let bridge = |name: &str| -> Result<String> {
        list.as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == name))
            .and_then(|s| s["bridge"].as_str())
            .map(str::to_string)
            .with_context(|| format!("no switch {name} in {list}"))
    };
    let (lab_br, host_br) = (bridge("lab")?, bridge("hostnet")?);
    record(
        checks,
        "switches_are_listed_with_their_bridges_up",
        (|| {
            let a = list.as_array().context("not a list")?;
            ensure!(a.len() == 2, "{list}");
            ensure!(a.iter().all(|s| s["up"] == true), "{list}");
            Ok(())
        })(),
    );

    let a = vm(cli, "a", "lab", "10.79.0.2/24", "10.79.0.3")?;
    let b = vm(cli, "b", "lab", "10.79.0.3/24", "10.79.0.2")?;
    let vm_c = vm(cli, "c", "hostnet", "10.78.0.2/24", "10.78.0.1")?;
    for n in ["a", "b", "c"] {
        cli.ok(&["vm", "start", n])?;
    }
    let r = async {
        pinged(&mut c, &a, "10.79.0.3", 1).await?;
        let serial = pinged(&mut c, &b, "10.79.0.2", 1).await?;
        let v = cli.json(&["vm", "get", "b", "--json"])?;
        let mac = v["nics"][0]["mac"].as_str().context("no MAC in the VM")?;
        let seen = value_after(&serial, "PARVIS-NET-MAC=");
        ensure!(
            seen.as_deref() == Some(mac),
            "guest sees {seen:?}, agent gave {mac}"
        );
        ensure!(
            value_after(&serial, "PARVIS-NET-DRIVER=").as_deref() == Some("hv_netvsc"),
            "{}",
            tail(&serial, 20)
        );
        anyhow::Ok(())
    }
    .await;
    record(checks, "two_vms_on_a_private_switch_reach_each_other", r);

    let r = async {
        pinged(&mut c, &vm_c, "10.78.0.1", 1).await?;
        let (rc, out) = live.exec("ping -c 3 -W 2 10.78.0.2", Duration::from_secs(60))?;
        ensure!(rc == 0, "the host cannot reach the VM: {out}");
        // A private switch gives the host no address.
        let (_, addrs) = live.exec(&format!("ip addr show {lab_br}"), Duration::from_secs(30))?;
        ensure!(!addrs.contains("inet "), "{lab_br} has an address: {addrs}");
        anyhow::Ok(())
    }
    .await;
    record(checks, "internal_switch_joins_host_and_vm", r);

    let (ok, out, err) = cli.run(&["switch", "delete", "lab"])?;
    record(
        checks,
        "a_switch_in_use_is_not_deleted",
        (|| {
            ensure!(!ok, "deleted: {out}");
            ensure!(
                err.contains("used by 2 VM(s)") && err.contains("remove their adapters first"),
                "{err}"
            );
            Ok(())
        })(),
    );

    // The agent goes away; meanwhile c stops and the internal switch's bridge is deleted.
    // A new agent brings the bridge back, and c, started again, is on the network.
    let r = async {
        cli.ok(&["vm", "stop", "c"])?;
        let (rc, out) = live.exec(
            &format!(
                "kill $(cat agent.pid); sleep 1; ip link set {host_br} down && brctl delbr {host_br} \
                 && ! test -e /sys/class/net/{host_br}"
            ),
            Duration::from_secs(60),
        )?;
        ensure!(rc == 0, "{out}");
        let (rc, out) = live.exec("sh start-agent.sh", Duration::from_secs(60))?;
        ensure!(rc == 0, "{out}");
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let list = loop {
            if let Ok(l) = cli.json(&["switch", "list", "--json"]) {
                break l;
            }
            ensure!(std::time::Instant::now() < deadline, "the agent did not come back");
            std::thread::sleep(Duration::from_millis(500));
        };
        let hn = list
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == "hostnet"))
            .with_context(|| format!("hostnet is gone: {list}"))?;
        ensure!(hn["up"] == true, "{hn}");
        let mut c = client::connect(target).await?;
        cli.ok(&["vm", "start", "c"])?;
        pinged(&mut c, &vm_c, "10.78.0.1", 2).await?;
        let (rc, out) = live.exec("ping -c 2 -W 2 10.78.0.2", Duration::from_secs(60))?;
        ensure!(rc == 0, "{out}");
        // a and b ran on through the restart and still reach each other (b pinged a at
        // boot; the test host joins their private switch for a moment to ask again).
        let (rc, out) = live.exec(
            &format!(
                "ip addr add 10.79.0.1/24 dev {lab_br} && ping -c 2 -W 2 10.79.0.2 && \
                 ping -c 2 -W 2 10.79.0.3; r=$?; ip addr del 10.79.0.1/24 dev {lab_br}; exit $r"
            ),
            Duration::from_secs(60),
        )?;
        ensure!(rc == 0, "a and b after the restart: {out}");
        anyhow::Ok(())
    }
    .await;
    record(checks, "switches_come_back_after_an_agent_restart", r);

    // The agent reports each running guest's heartbeat, and "shut down" goes through the
    // guest's shutdown service.
    let r = async {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let v = cli.json(&["vm", "list", "--json"])?;
            let all_ok = v.as_array().is_some_and(|a| {
                a.iter().all(|x| {
                    x["guest"]["heartbeat"] == "OK" && x["guest"]["shutdown_service"] == true
                })
            });
            if all_ok {
                break;
            }
            ensure!(std::time::Instant::now() < deadline, "heartbeats: {v}");
            std::thread::sleep(Duration::from_secs(1));
        }
        cli.ok(&["vm", "shutdown", "a"])?;
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let v = cli.json(&["vm", "get", "a", "--json"])?;
            if v["state"] == "off" {
                ensure!(v["state_reason"] == "guest powered off", "{v}");
                break;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "a did not shut down: {v}"
            );
            std::thread::sleep(Duration::from_secs(1));
        }
        // The guest heard the request from its shutdown service, not the ACPI button.
        let (rc, out) = live.exec(
            &format!(
                "grep -h 'shutdown requested through the shutdown service' \
                 \"$(cat state.path)/vms/{a}/worker.log\" && \
                 grep -c PARVIS-SHUTDOWN-REQUEST \"$(cat state.path)/vms/{a}/serial.log\""
            ),
            Duration::from_secs(30),
        )?;
        ensure!(rc == 0, "not through the shutdown service: {out}");
        anyhow::Ok(())
    }
    .await;
    record(
        checks,
        "heartbeat_is_reported_and_shutdown_uses_the_service",
        r,
    );

    let r = (|| {
        for n in ["a", "b", "c"] {
            let _ = cli.run(&["vm", "stop", n])?;
            cli.ok(&["vm", "delete", n])?;
        }
        cli.ok(&["switch", "delete", "lab"])?;
        cli.ok(&["switch", "delete", "hostnet"])?;
        let (_, out) = live.exec("ls /sys/class/net", Duration::from_secs(30))?;
        ensure!(
            !out.split_whitespace().any(|i| i == lab_br || i == host_br),
            "bridges left: {out}"
        );
        ensure!(!out.contains("pv"), "TAPs or bridges left: {out}");
        anyhow::Ok(())
    })();
    record(checks, "deleting_switches_removes_their_bridges", r);
    Ok(())
}

#[test]
fn switches_are_listed_with_their_bridges_up() {
    results().assert("switches_are_listed_with_their_bridges_up");
}

#[test]
fn two_vms_on_a_private_switch_reach_each_other() {
    results().assert("two_vms_on_a_private_switch_reach_each_other");
}

#[test]
fn internal_switch_joins_host_and_vm() {
    results().assert("internal_switch_joins_host_and_vm");
}

#[test]
fn a_switch_in_use_is_not_deleted() {
    results().assert("a_switch_in_use_is_not_deleted");
}

#[test]
fn switches_come_back_after_an_agent_restart() {
    results().assert("switches_come_back_after_an_agent_restart");
}

#[test]
fn heartbeat_is_reported_and_shutdown_uses_the_service() {
    results().assert("heartbeat_is_reported_and_shutdown_uses_the_service");
}

#[test]
fn deleting_switches_removes_their_bridges() {
    results().assert("deleting_switches_removes_their_bridges");
}
