//! The few rtnetlink operations switches need: bridges, their state and address, putting
//! a TAP on a bridge, deleting a link. One short-lived connection per call: switches
//! change rarely.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result};
use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec};

fn connect() -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().context("cannot open a netlink socket")?;
    tokio::spawn(conn);
    Ok(handle)
}

async fn find(handle: &Handle, name: &str) -> Result<Option<LinkMessage>> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(l) => Ok(l),
        // No such device.
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
        Err(e) => Err(e).context(format!("cannot look up {name}")),
    }
}

fn is_bridge_msg(l: &LinkMessage) -> bool {
    l.attributes.iter().any(|a| match a {
        LinkAttribute::LinkInfo(infos) => infos
            .iter()
            .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Bridge))),
        _ => false,
    })
}

/// Whether interface `name` exists.
pub async fn exists(name: &str) -> Result<bool> {
    Ok(find(&connect()?, name).await?.is_some())
}

/// Whether `name` is a bridge.
pub async fn is_bridge(name: &str) -> Result<bool> {
    Ok(find(&connect()?, name)
        .await?
        .is_some_and(|l| is_bridge_msg(&l)))
}

/// Whether `name` exists and is administratively up.
pub async fn is_up(name: &str) -> Result<bool> {
    Ok(find(&connect()?, name)
        .await?
        .is_some_and(|l| l.header.flags.contains(LinkFlags::Up)))
}

/// Make bridge `name` exist and be up.
pub async fn ensure_bridge(name: &str) -> Result<()> {
    let h = connect()?;
    let link = match find(&h, name).await? {
        Some(l) => {
            anyhow::ensure!(is_bridge_msg(&l), "{name} exists and is not a bridge");
            l
        }
        None => {
            h.link()
                .add(LinkBridge::new(name).build())
                .execute()
                .await
                .with_context(|| format!("cannot create bridge {name}"))?;
            find(&h, name)
                .await?
                .with_context(|| format!("bridge {name} vanished"))?
        }
    };
    if !link.header.flags.contains(LinkFlags::Up) {
        h.link()
            .change(LinkUnspec::new_with_index(link.header.index).up().build())
            .execute()
            .await
            .with_context(|| format!("cannot bring {name} up"))?;
    }
    Ok(())
}

/// Give `name` the address `addr/prefix` unless it has it.
pub async fn ensure_address(name: &str, addr: Ipv4Addr, prefix: u8) -> Result<()> {
    let h = connect()?;
    let link = find(&h, name)
        .await?
        .with_context(|| format!("{name} does not exist"))?;
    let mut have = h
        .address()
        .get()
        .set_link_index_filter(link.header.index)
        .execute();
    while let Some(a) = have.try_next().await? {
        let same = a.header.prefix_len == prefix
            && a.attributes
                .iter()
                .any(|x| matches!(x, AddressAttribute::Address(IpAddr::V4(v)) if *v == addr));
        if same {
            return Ok(());
        }
    }
    h.address()
        .add(link.header.index, IpAddr::V4(addr), prefix)
        .execute()
        .await
        .with_context(|| format!("cannot give {name} the address {addr}/{prefix}"))
}

/// Put `port` (a TAP) on `bridge` and bring it up.
pub async fn enslave(port: &str, bridge: &str) -> Result<()> {
    let h = connect()?;
    let br = find(&h, bridge)
        .await?
        .with_context(|| format!("bridge {bridge} does not exist"))?;
    let p = find(&h, port)
        .await?
        .with_context(|| format!("{port} does not exist"))?;
    h.link()
        .change(
            LinkUnspec::new_with_index(p.header.index)
                .controller(br.header.index)
                .up()
                .build(),
        )
        .execute()
        .await
        .with_context(|| format!("cannot put {port} on {bridge}"))
}

/// Delete interface `name` if it exists.
pub async fn delete(name: &str) -> Result<()> {
    let h = connect()?;
    if let Some(l) = find(&h, name).await? {
        h.link()
            .del(l.header.index)
            .execute()
            .await
            .with_context(|| format!("cannot delete {name}"))?;
    }
    Ok(())
}
