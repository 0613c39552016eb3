//! `parvis switch …`: the host's virtual switches.

use anyhow::{Result, bail};
use clap::Subcommand;
use proto::v1::{CreateSwitchRequest, ListSwitchesRequest, Switch, SwitchKind, SwitchRef};
use serde_json::json;

use crate::remote::{self, Rpc, print_json, print_table};

#[derive(Debug, Subcommand)]
pub enum SwitchCommand {
    /// List the switches.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Create a switch: private (VMs only), internal (VMs and this host, which gets
    /// --address on it) or external (an existing bridge of the host that carries a
    /// physical network, named with --bridge; the agent never deletes it).
    Create {
        /// The switch's name.
        name: String,
        /// private, internal or external.
        #[arg(long, value_parser = ["private", "internal", "external"])]
        kind: String,
        /// Internal: the host's address on the switch, e.g. 10.77.0.1/24.
        #[arg(long)]
        address: Option<String>,
        /// External: the existing bridge to adopt.
        #[arg(long)]
        bridge: Option<String>,
    },
    /// Delete a switch no VM uses.
    Delete {
        /// The switch's name.
        name: String,
    },
}

fn kind_word(k: i32) -> &'static str {
    match SwitchKind::try_from(k) {
        Ok(SwitchKind::Private) => "private",
        Ok(SwitchKind::Internal) => "internal",
        Ok(SwitchKind::External) => "external",
        _ => "unknown",
    }
}

fn switch_json(s: &Switch) -> serde_json::Value {
    json!({
        "name": s.name,
        "kind": kind_word(s.kind),
        "bridge": s.bridge,
        "host_address": s.host_address,
        "vm_ids": s.vm_ids,
        "up": s.up,
    })
}

pub async fn run(cmd: SwitchCommand, host: Option<&str>) -> Result<i32> {
    let mut c = remote::connect(host).await?;
    match cmd {
        SwitchCommand::List { json } => {
            let list = c
                .switch
                .list_switches(ListSwitchesRequest {})
                .await
                .rpc("listing the switches")?
                .switches;
            if json {
                return print_json(&json!(list.iter().map(switch_json).collect::<Vec<_>>()))
                    .map(|()| 0);
            }
            if list.is_empty() {
                eprintln!("No switches.");
                return Ok(0);
            }
            let mut rows = vec![vec![
                "NAME".to_string(),
                "KIND".into(),
                "BRIDGE".into(),
                "HOST ADDRESS".into(),
                "VMS".into(),
                "STATE".into(),
            ]];
            for s in &list {
                rows.push(vec![
                    s.name.clone(),
                    kind_word(s.kind).into(),
                    s.bridge.clone(),
                    if s.host_address.is_empty() {
                        "-".into()
                    } else {
                        s.host_address.clone()
                    },
                    s.vm_ids.len().to_string(),
                    if s.up { "up" } else { "down" }.into(),
                ]);
            }
            print_table(&rows);
            Ok(0)
        }
        SwitchCommand::Create {
            name,
            kind,
            address,
            bridge,
        } => {
            let kind = match kind.as_str() {
                "private" => SwitchKind::Private,
                "internal" => SwitchKind::Internal,
                _ => SwitchKind::External,
            };
            if kind == SwitchKind::Internal && address.is_none() {
                bail!("an internal switch needs --address, e.g. --address 10.77.0.1/24");
            }
            if kind == SwitchKind::External && bridge.is_none() {
                bail!("an external switch needs --bridge, the host's bridge to adopt");
            }
            let s = c
                .switch
                .create_switch(CreateSwitchRequest {
                    switch: Some(Switch {
                        name,
                        kind: kind as i32,
                        bridge: bridge.unwrap_or_default(),
                        host_address: address.unwrap_or_default(),
                        ..Default::default()
                    }),
                })
                .await
                .rpc("creating the switch")?;
            println!(
                "Created {} switch '{}' (bridge {}).",
                kind_word(s.kind),
                s.name,
                s.bridge
            );
            Ok(0)
        }
        SwitchCommand::Delete { name } => {
            c.switch
                .delete_switch(SwitchRef { name: name.clone() })
                .await
                .rpc("deleting the switch")?;
            println!("Deleted switch '{name}'.");
            Ok(0)
        }
    }
}
