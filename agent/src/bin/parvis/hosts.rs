//! `parvis host add|list|remove|info`, over the saved-hosts file the console shares
//! (`proto::hosts`: `$PARVIS_CONFIG`, else `hosts.json` in the user's config folder, e.g.
//! `~/.config/parvis/hosts.json`).

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use proto::client::{fetch_fingerprint, same_fingerprint};
use proto::hosts::{self, HostsFile, SavedHost};
use proto::v1::{GetHostInfoRequest, HostInfo};
use serde_json::json;

use crate::disk::human;
use crate::remote::{self, Rpc, print_json, print_table};

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Add (or replace) an agent: check its certificate, verify the token, save it.
    Add {
        /// A short name for the host (used with --host).
        name: String,
        /// The agent's address, HOST:PORT.
        addr: String,
        /// The agent's token (printed by parvis-agent at its first start).
        #[arg(long, conflicts_with = "token_file")]
        token: Option<String>,
        /// Read the token from this file.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// The agent's TLS certificate SHA-256 fingerprint (printed by the agent, or
        /// `parvis-agent fingerprint`). Without it the certificate is shown for you to trust.
        #[arg(long, conflicts_with = "plain")]
        fingerprint: Option<String>,
        /// Plain HTTP/2, no TLS (only for agents on a loopback address).
        #[arg(long)]
        plain: bool,
        /// Trust the certificate without asking (when there is no terminal).
        #[arg(long, short)]
        yes: bool,
    },
    /// List the configured hosts (the first is the default).
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Forget a host.
    Remove {
        /// The host's name.
        name: String,
    },
    /// Show a host's facts: CPUs, memory, KVM, boot images, VMs.
    Info {
        /// The host's name (default: --host, $PARVIS_ADDR, $PARVIS_HOST or the default).
        name: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// The saved-hosts file (shared with the console).
pub fn load() -> Result<HostsFile> {
    let path = hosts::default_path()?;
    Ok(HostsFile::load(&path)?)
}

fn save(f: &HostsFile) -> Result<()> {
    let path = hosts::default_path()?;
    Ok(f.save(&path)?)
}

pub async fn run(cmd: HostCommand, host: Option<&str>) -> Result<i32> {
    match cmd {
        HostCommand::Add {
            name,
            addr,
            token,
            token_file,
            fingerprint,
            plain,
            yes,
        } => add(name, addr, token, token_file, fingerprint, plain, yes).await,
        HostCommand::List { json } => {
            let cfg = load()?;
            if json {
                let v: Vec<_> = cfg
                    .hosts
                    .iter()
                    .enumerate()
                    .map(|(i, h)| {
                        json!({
                            "name": h.name,
                            "addr": h.addr,
                            "tls": h.fingerprint.is_some(),
                            "fingerprint": h.fingerprint,
                            "default": i == 0,
                        })
                    })
                    .collect();
                return print_json(&json!(v)).map(|()| 0);
            }
            if cfg.hosts.is_empty() {
                eprintln!("No hosts configured; add one with `parvis host add NAME ADDR`.");
                return Ok(0);
            }
            let mut rows = vec![vec![
                String::new(),
                "NAME".into(),
                "ADDRESS".into(),
                "SECURITY".into(),
            ]];
            for (i, h) in cfg.hosts.iter().enumerate() {
                rows.push(vec![
                    if i == 0 { "*".into() } else { String::new() },
                    h.name.clone(),
                    h.addr.clone(),
                    match &h.fingerprint {
                        Some(fp) => format!("TLS {}", short_fp(fp)),
                        None => "plain".into(),
                    },
                ]);
            }
            print_table(&rows);
            Ok(0)
        }
        HostCommand::Remove { name } => {
            let mut cfg = load()?;
            let before = cfg.hosts.len();
            cfg.hosts.retain(|h| h.name != name);
            if cfg.hosts.len() == before {
                bail!("no host named '{name}'");
            }
            save(&cfg)?;
            eprintln!("Removed host '{name}'.");
            Ok(0)
        }
        HostCommand::Info { name, json } => {
            let mut c = remote::connect(name.as_deref().or(host)).await?;
            let info = c
                .host
                .get_host_info(GetHostInfoRequest {})
                .await
                .rpc("reading the host's information")?;
            if json {
                print_json(&host_json(&info))?;
            } else {
                print_info(&info);
            }
            Ok(0)
        }
    }
}

fn short_fp(fp: &str) -> String {
    let hex: String = fp.chars().filter(char::is_ascii_hexdigit).collect();
    format!("{}…", &hex[..hex.len().min(16)].to_ascii_uppercase())
}

async fn add(
    name: String,
    addr: String,
    token: Option<String>,
    token_file: Option<PathBuf>,
    fingerprint: Option<String>,
    plain: bool,
    yes: bool,
) -> Result<i32> {
    let name = name.trim().to_string();
    if name.is_empty() || name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        bail!("a host name must be non-empty, without spaces");
    }
    let addr = addr.trim().to_string();
    let token = match (token, token_file) {
        (Some(t), _) => t,
        (None, Some(f)) => std::fs::read_to_string(&f)
            .with_context(|| format!("cannot read the token from {}", f.display()))?,
        (None, None) => match std::env::var("PARVIS_TOKEN") {
            Ok(t) if !t.trim().is_empty() => t,
            _ => prompt_token()?,
        },
    };
    let token = token.trim().to_string();
    if token.is_empty() {
        bail!("the token is empty");
    }
    let fingerprint = if plain {
        None
    } else if let Some(fp) = fingerprint {
        if !same_fingerprint(&fp, &fp) {
            bail!("'{fp}' is not a SHA-256 fingerprint (64 hex digits, colons optional)");
        }
        Some(canonical_fp(&fp))
    } else {
        let seen = fetch_fingerprint(&addr).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot read the TLS certificate of {addr}: {} (if the agent listens in plain \
                 HTTP/2 on loopback, use --plain)",
                remote::chain(&e)
            )
        })?;
        eprintln!("The agent at {addr} presents a TLS certificate with SHA-256 fingerprint");
        eprintln!("  {seen}");
        eprintln!(
            "Compare it with the fingerprint parvis-agent printed (or `parvis-agent fingerprint` \
             on that host)."
        );
        if !yes {
            if !std::io::stdin().is_terminal() {
                bail!(
                    "refusing to trust the certificate without a terminal to ask on; pass \
                     --fingerprint {seen} (after checking it) or --yes"
                );
            }
            eprint!("Trust this certificate? [y/N] ");
            let _ = std::io::stderr().flush();
            let mut answer = String::new();
            std::io::stdin().lock().read_line(&mut answer)?;
            if !matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
                bail!("not trusted; the host was not added");
            }
        }
        Some(seen)
    };
    let entry = SavedHost {
        name: name.clone(),
        addr: addr.clone(),
        token,
        fingerprint,
    };
    let mut c = remote::connect_to(&name, &entry.target()).await?;
    let info = c
        .host
        .get_host_info(GetHostInfoRequest {})
        .await
        .rpc("checking the agent")?;
    let mut cfg = load()?;
    let replaced = if let Some(h) = cfg.hosts.iter_mut().find(|h| h.name == name) {
        *h = entry.clone();
        true
    } else {
        cfg.hosts.push(entry.clone());
        false
    };
    save(&cfg)?;
    println!(
        "{} host '{name}' at {addr} ({}).",
        if replaced { "Updated" } else { "Added" },
        match &entry.fingerprint {
            Some(fp) => format!("TLS, certificate {}", short_fp(fp)),
            None => "plain HTTP/2".into(),
        }
    );
    println!(
        "  {}: {} {}, {} CPUs, {} memory, KVM {}, {} VMs ({} running)",
        info.hostname,
        info.os,
        info.agent_version,
        info.logical_cpus,
        human(info.memory_bytes),
        kvm_word(&info),
        info.vm_count,
        info.running_vm_count
    );
    if cfg.hosts.first().is_some_and(|h| h.name == name) {
        println!("  This is the default host.");
    }
    Ok(0)
}

/// 32 upper-case hex pairs joined by colons.
fn canonical_fp(fp: &str) -> String {
    let hex: Vec<char> = fp
        .chars()
        .filter(char::is_ascii_hexdigit)
        .map(|c| c.to_ascii_uppercase())
        .collect();
    hex.chunks(2)
        .map(|p| p.iter().collect::<String>())
        .collect::<Vec<_>>()
        .join(":")
}

/// Ask for the token on the terminal without echoing it.
fn prompt_token() -> Result<String> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!("give the agent's token with --token, --token-file or PARVIS_TOKEN");
    }
    eprint!("Token: ");
    let _ = std::io::stderr().flush();
    let saved = rustix::termios::tcgetattr(&stdin).ok();
    if let Some(t) = &saved {
        let mut quiet = t.clone();
        quiet.local_modes.remove(rustix::termios::LocalModes::ECHO);
        let _ = rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &quiet);
    }
    let mut line = String::new();
    let read = stdin.lock().read_line(&mut line);
    if let Some(t) = &saved {
        let _ = rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, t);
    }
    eprintln!();
    read?;
    Ok(line)
}

fn kvm_word(info: &HostInfo) -> String {
    match &info.kvm {
        Some(k) if k.usable => "usable".into(),
        Some(k) if !k.reason.is_empty() => format!("not usable ({})", k.reason),
        _ => "not usable".into(),
    }
}

fn print_info(i: &HostInfo) {
    println!("hostname:         {}", i.hostname);
    println!("os:               {}", i.os);
    println!("agent:            {} ({})", i.agent_version, i.api_version);
    println!("logical CPUs:     {}", i.logical_cpus);
    println!(
        "memory:           {} ({} available)",
        human(i.memory_bytes),
        human(i.memory_available_bytes)
    );
    println!("KVM:              {}", kvm_word(i));
    if let Some(k) = i.kvm.as_ref().filter(|k| k.usable) {
        println!("KVM API version:  {}", k.api_version);
        println!("max vCPUs:        {}", k.max_vcpus);
    }
    println!(
        "VMs:              {} ({} running)",
        i.vm_count, i.running_vm_count
    );
    if i.boot_images.is_empty() {
        println!("boot images:      none");
    } else {
        println!("boot images:");
        for b in &i.boot_images {
            println!(
                "  {:<16}kernel {}{}, cmdline \"{}\"",
                b.name,
                human(b.kernel_size),
                if b.has_initrd { " + initrd" } else { "" },
                b.default_cmdline
            );
        }
    }
}

pub fn host_json(i: &HostInfo) -> serde_json::Value {
    json!({
        "hostname": i.hostname,
        "os": i.os,
        "agent_version": i.agent_version,
        "api_version": i.api_version,
        "logical_cpus": i.logical_cpus,
        "memory_bytes": i.memory_bytes,
        "memory_available_bytes": i.memory_available_bytes,
        "kvm": i.kvm.as_ref().map(|k| json!({
            "usable": k.usable,
            "reason": k.reason,
            "api_version": k.api_version,
            "max_vcpus": k.max_vcpus,
            "capabilities": k.capabilities,
        })),
        "boot_images": i.boot_images.iter().map(|b| json!({
            "name": b.name,
            "kernel_size": b.kernel_size,
            "has_initrd": b.has_initrd,
            "default_cmdline": b.default_cmdline,
        })).collect::<Vec<_>>(),
        "vm_count": i.vm_count,
        "running_vm_count": i.running_vm_count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_stored_canonically() {
        let fp = "ab".repeat(32);
        let c = canonical_fp(&fp);
        assert_eq!(c.len(), 95);
        assert!(c.starts_with("AB:AB:"));
        assert!(same_fingerprint(&c, &fp));
        assert_eq!(short_fp(&c), "ABABABABABABABAB…");
    }

    #[test]
    fn the_hosts_file_is_private_and_replaced_atomically() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/hosts.json");
        let host = |name: &str| SavedHost {
            name: name.into(),
            addr: "10.0.0.1:7443".into(),
            token: "pvs_t".into(),
            fingerprint: None,
        };
        let one = HostsFile {
            hosts: vec![host("one")],
        };
        let two = HostsFile {
            hosts: vec![host("two")],
        };
        one.save(&p).unwrap();
        two.save(&p).unwrap();
        assert_eq!(HostsFile::load(&p).unwrap(), two);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }
}
