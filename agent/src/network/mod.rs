//! Virtual switches (Linux bridges) and the TAP each VM network adapter plugs into them.
//!
//! A switch is stored as `switches/NAME.json`. Private and internal switches own their
//! bridge: the agent creates it (and the internal switch's host address) and recreates
//! them when it starts and they are gone; an external switch adopts an existing bridge and
//! never deletes it. At a VM's start the agent opens one TAP per adapter, puts it on its
//! switch's bridge and hands the descriptor to the worker, which needs no CAP_NET_ADMIN;
//! the TAP vanishes with the worker, so nothing is left behind when a VM ends.
//!
//! Bridges and addresses go through rtnetlink (the kernel's own interface, no `ip`
//! binary needed); the TAP through /dev/net/tun.

mod netlink;
mod tap;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Mutex;

use proto::v1::{Switch, SwitchKind};
use serde::{Deserialize, Serialize};

use crate::error::{AgentError, AgentResult};
use crate::store::{self, Layout};

/// A switch as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SwitchConfig {
    pub name: String,
    pub kind: Kind,
    pub bridge: String,
    /// Internal switches: "a.b.c.d/prefix".
    #[serde(default)]
    pub host_address: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Private,
    Internal,
    External,
}

impl Kind {
    fn to_proto(self) -> SwitchKind {
        match self {
            Kind::Private => SwitchKind::Private,
            Kind::Internal => SwitchKind::Internal,
            Kind::External => SwitchKind::External,
        }
    }
}

/// A valid switch name: 1 to 32 of [A-Za-z0-9_-].
pub fn valid_name(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A Linux interface name the agent may use or adopt.
fn valid_ifname(s: &str) -> bool {
    (1..=15).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// "10.77.0.1/24" → address and prefix; a host address (not the network or broadcast).
pub fn parse_host_address(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (a, p) = s
        .split_once('/')
        .ok_or_else(|| format!("'{s}' is not ADDRESS/PREFIX, e.g. 10.77.0.1/24"))?;
    let addr: Ipv4Addr = a
        .parse()
        .map_err(|_| format!("'{a}' is not an IPv4 address"))?;
    let prefix: u8 = p
        .parse()
        .ok()
        .filter(|p| (8..=30).contains(p))
        .ok_or_else(|| format!("prefix '{p}' must be 8 to 30"))?;
    let host_bits = u32::MAX >> prefix;
    let host = u32::from(addr) & host_bits;
    if host == 0 || host == host_bits {
        return Err(format!("{s} is the network's own or broadcast address"));
    }
    if addr.is_loopback() || addr.is_multicast() || addr.is_unspecified() {
        return Err(format!("{addr} cannot be a switch address"));
    }
    Ok((addr, prefix))
}

/// A MAC address for an adapter: Parvis's locally administered prefix and random bytes.
pub fn new_mac() -> String {
    let mut r = [0u8; 3];
    let _ = getrandom::fill(&mut r);
    format!("02:50:76:{:02x}:{:02x}:{:02x}", r[0], r[1], r[2])
}

/// A unicast MAC address in canonical form, or why not.
pub fn normalize_mac(s: &str) -> Result<String, String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    let bytes: Option<Vec<u8>> = (parts.len() == 6)
        .then(|| {
            parts
                .iter()
                .map(|p| {
                    (p.len() == 2)
                        .then(|| u8::from_str_radix(p, 16).ok())
                        .flatten()
                })
                .collect()
        })
        .flatten();
    let b = bytes.ok_or_else(|| format!("'{s}' is not a MAC address"))?;
    if b[0] & 1 != 0 {
        return Err(format!("{s} is a multicast address"));
    }
    if b.iter().all(|x| *x == 0) {
        return Err("00:00:00:00:00:00 is not an adapter's address".into());
    }
    Ok(b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":"))
}

/// The host's switches.
#[derive(Debug)]
pub struct Switches {
    dir: PathBuf,
    map: Mutex<BTreeMap<String, SwitchConfig>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Switches {
    /// Read the stored switches and bring each one's bridge back (created, up, its
    /// address) where it is gone. A switch whose bridge cannot be made is kept and
    /// reported down; VMs on it cannot start until it works.
    pub async fn load(layout: &Layout) -> anyhow::Result<Self> {
        let dir = layout.root.join("switches");
        std::fs::create_dir_all(&dir)?;
        let mut map = BTreeMap::new();
        for e in std::fs::read_dir(&dir)?.flatten() {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "json") {
                continue;
            }
            match store::read_json::<SwitchConfig>(&p) {
                Ok(c) if valid_name(&c.name) && valid_ifname(&c.bridge) => {
                    map.insert(c.name.clone(), c);
                }
                Ok(_) => tracing::error!("{}: not a valid switch, left alone", p.display()),
                Err(err) => {
                    tracing::error!("{}: unreadable switch, left alone: {err}", p.display())
                }
            }
        }
        for c in map.values() {
            if let Err(e) = realize(c).await {
                tracing::warn!(switch = %c.name, "switch not available: {e:#}");
            }
        }
        Ok(Switches {
            dir,
            map: Mutex::new(map),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// The stored switch `name`.
    pub fn get(&self, name: &str) -> Option<SwitchConfig> {
        lock(&self.map).get(name).cloned()
    }

    /// Every switch, with the VMs that use it (`users` maps a switch name to VM ids).
    pub async fn list(&self, users: &BTreeMap<String, Vec<String>>) -> Vec<Switch> {
        let all: Vec<SwitchConfig> = lock(&self.map).values().cloned().collect();
        let mut out = Vec::new();
        for c in all {
            let up = netlink::is_up(&c.bridge).await.unwrap_or(false);
            out.push(to_proto(
                &c,
                users.get(&c.name).cloned().unwrap_or_default(),
                up,
            ));
        }
        out
    }

    /// Create a switch from a request.
    pub async fn create(&self, s: &Switch) -> AgentResult<Switch> {
        let bad = |field: &str, r: String| AgentError::invalid(format!("switch.{field}"), r);
        if !valid_name(&s.name) {
            return Err(bad(
                "name",
                "must be 1 to 32 letters, digits, '-' or '_'".into(),
            ));
        }
        let kind = match SwitchKind::try_from(s.kind).unwrap_or(SwitchKind::Unspecified) {
            SwitchKind::Private => Kind::Private,
            SwitchKind::Internal => Kind::Internal,
            SwitchKind::External => Kind::External,
            SwitchKind::Unspecified => {
                return Err(bad("kind", "must be private, internal or external".into()));
            }
        };
        let host_address = match kind {
            Kind::Internal => {
                parse_host_address(&s.host_address).map_err(|r| bad("host_address", r))?;
                s.host_address.clone()
            }
            _ if !s.host_address.is_empty() => {
                return Err(bad(
                    "host_address",
                    "only an internal switch has a host address".into(),
                ));
            }
            _ => String::new(),
        };
        let bridge = match kind {
            Kind::External => {
                if !valid_ifname(&s.bridge) {
                    return Err(bad(
                        "bridge",
                        "an external switch adopts an existing bridge: name it".into(),
                    ));
                }
                if !netlink::is_bridge(&s.bridge).await.unwrap_or(false) {
                    return Err(AgentError::precondition(format!(
                        "'{}' is not a bridge on this host; make one that carries the \
                         physical network first",
                        s.bridge
                    )));
                }
                s.bridge.clone()
            }
            _ if !s.bridge.is_empty() => {
                return Err(bad(
                    "bridge",
                    "the agent names the bridge of a private or internal switch".into(),
                ));
            }
            _ => String::new(),
        };
        let mut c = SwitchConfig {
            name: s.name.clone(),
            kind,
            bridge,
            host_address,
        };
        {
            let map = lock(&self.map);
            if map.contains_key(&c.name) {
                return Err(AgentError::AlreadyExists(format!(
                    "a switch named '{}' exists",
                    c.name
                )));
            }
            if kind == Kind::External && map.values().any(|o| o.bridge == c.bridge) {
                return Err(AgentError::AlreadyExists(format!(
                    "bridge '{}' is already a switch",
                    c.bridge
                )));
            }
            if kind != Kind::External {
                c.bridge = (0..10_000)
                    .map(|n| format!("pvsw{n}"))
                    .find(|b| !map.values().any(|o| &o.bridge == b))
                    .unwrap_or_default();
            }
        }
        if kind != Kind::External && netlink::exists(&c.bridge).await.unwrap_or(false) {
            return Err(AgentError::precondition(format!(
                "an interface named {} exists already on this host",
                c.bridge
            )));
        }
        realize(&c)
            .await
            .map_err(|e| AgentError::internal("creating the switch's bridge", e))?;
        if let Err(e) = store::write_json(&self.path(&c.name), &c) {
            let _ = unrealize(&c).await;
            return Err(AgentError::internal("storing the switch", e));
        }
        lock(&self.map).insert(c.name.clone(), c.clone());
        tracing::info!(switch = %c.name, bridge = %c.bridge, "switch created");
        Ok(to_proto(&c, Vec::new(), true))
    }

    /// Delete switch `name`; `users` are the VMs whose settings use it.
    pub async fn delete(&self, name: &str, users: &[String]) -> AgentResult<()> {
        let c = self
            .get(name)
            .ok_or_else(|| AgentError::not_found("switch", name))?;
        if !users.is_empty() {
            return Err(AgentError::precondition(format!(
                "switch '{name}' is used by {} VM(s) ({}); remove their adapters first",
                users.len(),
                users.join(", ")
            )));
        }
        std::fs::remove_file(self.path(name))
            .map_err(|e| AgentError::internal("removing the switch", e))?;
        lock(&self.map).remove(name);
        if let Err(e) = unrealize(&c).await {
            tracing::warn!(switch = %name, "bridge not removed: {e:#}");
        }
        Ok(())
    }

    /// A TAP for adapter `index` of VM `vm_id`, on switch `switch`'s bridge, up.
    pub async fn plug(&self, switch: &str, vm_id: &str, index: usize) -> AgentResult<OwnedFd> {
        let c = self
            .get(switch)
            .ok_or_else(|| AgentError::precondition(format!("switch '{switch}' does not exist")))?;
        realize(&c).await.map_err(|e| {
            AgentError::precondition(format!("switch '{switch}' is not available: {e:#}"))
        })?;
        let name = tap_name(vm_id, index);
        let fd =
            tap::open(&name).map_err(|e| AgentError::internal(format!("opening TAP {name}"), e))?;
        netlink::enslave(&name, &c.bridge)
            .await
            .map_err(|e| AgentError::internal(format!("putting {name} on {}", c.bridge), e))?;
        Ok(fd)
    }
}

/// TAP names: "pv" + 8 characters of the VM id + adapter number (at most 15 bytes).
fn tap_name(vm_id: &str, index: usize) -> String {
    let short: String = vm_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(8)
        .collect();
    format!("pv{short}n{index}")
}

fn to_proto(c: &SwitchConfig, vm_ids: Vec<String>, up: bool) -> Switch {
    Switch {
        name: c.name.clone(),
        kind: c.kind.to_proto() as i32,
        bridge: c.bridge.clone(),
        host_address: c.host_address.clone(),
        vm_ids,
        up,
    }
}

/// Make the switch's bridge exist and be up, with its host address.
async fn realize(c: &SwitchConfig) -> anyhow::Result<()> {
    if c.kind == Kind::External {
        anyhow::ensure!(
            netlink::is_bridge(&c.bridge).await?,
            "bridge {} is gone from this host",
            c.bridge
        );
        return Ok(());
    }
    netlink::ensure_bridge(&c.bridge).await?;
    if c.kind == Kind::Internal {
        let (a, p) = parse_host_address(&c.host_address).map_err(anyhow::Error::msg)?;
        netlink::ensure_address(&c.bridge, a, p).await?;
    }
    Ok(())
}

async fn unrealize(c: &SwitchConfig) -> anyhow::Result<()> {
    if c.kind == Kind::External {
        return Ok(());
    }
    netlink::delete(&c.bridge).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_addresses_and_macs_are_checked() {
        assert!(valid_name("lab-net_1"));
        assert!(!valid_name(""));
        assert!(!valid_name("a b"));
        assert!(!valid_name(&"x".repeat(33)));
        assert_eq!(
            parse_host_address("10.77.0.1/24"),
            Ok(("10.77.0.1".parse().unwrap(), 24))
        );
        for bad in [
            "10.77.0.1",
            "10.77.0.0/24",
            "10.77.0.255/24",
            "10.77.0.1/31",
            "10.77.0.1/4",
            "127.0.0.1/8",
            "x/24",
        ] {
            assert!(parse_host_address(bad).is_err(), "{bad}");
        }
        assert_eq!(
            normalize_mac("02-50-76-AB-cd-01").unwrap(),
            "02:50:76:ab:cd:01"
        );
        assert!(normalize_mac("01:00:5e:00:00:01").is_err());
        assert!(normalize_mac("00:00:00:00:00:00").is_err());
        assert!(normalize_mac("02:50:76:ab:cd").is_err());
        assert!(normalize_mac("02:50:76:ab:cd:1").is_err());
        let m = new_mac();
        assert_eq!(normalize_mac(&m).unwrap(), m);
        assert!(m.starts_with("02:50:76:"));
    }

    #[test]
    fn tap_names_fit_the_kernel_limit() {
        let n = tap_name("0123456789abcdef0123", 7);
        assert_eq!(n, "pv01234567n7");
        assert!(n.len() <= 15);
        assert!(tap_name("ab", 12).len() <= 15);
    }
}
