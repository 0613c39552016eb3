//! The gRPC server: services, token check, TLS, HTTP/2 settings.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use proto::v1::console_service_server::ConsoleServiceServer;
use proto::v1::disk_service_server::DiskServiceServer;
use proto::v1::host_service_server::HostServiceServer;
use proto::v1::switch_service_server::SwitchServiceServer;
use proto::v1::vm_service_server::VmServiceServer;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::Agent;
use crate::security::{TlsIdentity, TokenCheck};
use crate::service::upload::DiskRoutes;
use crate::service::{
    console::ConsoleSvc, disk::DiskSvc, host::HostSvc, switch::SwitchSvc, vm::VmSvc,
};

/// How the server listens.
#[derive(Debug)]
pub struct ServeOptions {
    pub listener: tokio::net::TcpListener,
    /// `None` only for loopback binds.
    pub tls: Option<TlsIdentity>,
    pub token: TokenCheck,
}

/// Whether an address only accepts connections from this host.
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

/// Serve until `shutdown` completes.
pub async fn serve(
    agent: Arc<Agent>,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let local = opts.listener.local_addr()?;
    anyhow::ensure!(
        opts.tls.is_some() || is_loopback(&local),
        "refusing to serve without TLS on {local}, which is not a loopback address"
    );
    let max = proto::MAX_MESSAGE_BYTES;
    let mut builder = Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(32 << 20))
        // Large HTTP/2 frames: uploads and full screens are megabytes per message.
        .max_frame_size(Some(1 << 20))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)));
    if let Some(tls) = &opts.tls {
        builder = builder
            .tls_config(
                ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem)),
            )
            .context("bad TLS identity")?;
    }
    let t = opts.token;
    let router = builder
        .add_service(InterceptedService::new(
            HostServiceServer::new(HostSvc::new(agent.clone())),
            t.clone(),
        ))
        .add_service(InterceptedService::new(
            VmServiceServer::new(VmSvc::new(agent.clone())),
            t.clone(),
        ))
        .add_service(InterceptedService::new(
            SwitchServiceServer::new(SwitchSvc::new(agent.clone())),
            t.clone(),
        ))
        .add_service(InterceptedService::new(
            ConsoleServiceServer::new(ConsoleSvc::new(agent.clone()))
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
            t.clone(),
        ))
        .add_service(InterceptedService::new(
            // UploadDisk bypasses tonic's codec (see `service::upload`).
            DiskRoutes::new(
                DiskServiceServer::new(DiskSvc::new(agent.clone()))
                    .max_decoding_message_size(max)
                    .max_encoding_message_size(max),
                agent,
            ),
            t,
        ));
    // The builder's `tcp_nodelay` covers only listeners it binds itself: without
    // TCP_NODELAY here, the small last message of a burst (the end of a frame) waited for
    // the console's delayed ACK.
    let incoming = tonic::transport::server::TcpIncoming::from(opts.listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(std::time::Duration::from_secs(60)));
    router
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .context("the gRPC server failed")
}
