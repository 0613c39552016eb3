//! Connecting to an agent.
//!
//! An agent address is `HOST:PORT`. Loopback agents may speak plain HTTP/2; every other
//! agent speaks TLS with a self-signed certificate that the client pins by its SHA-256
//! fingerprint (trust on first use, as SSH does: [`fetch_fingerprint`] shows it, the user
//! confirms, and the fingerprint is saved with the host). Every call carries the bearer
//! token ([`Auth`]).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_stream::Stream;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};
use tower::Service;

use crate::upload_wire::{UPLOAD_DISK_PATH, encode_chunk, one_message};
use crate::v1::{UploadChunk, UploadStatus};

use crate::v1::console_service_client::ConsoleServiceClient;
use crate::v1::disk_service_client::DiskServiceClient;
use crate::v1::host_service_client::HostServiceClient;
use crate::v1::switch_service_client::SwitchServiceClient;
use crate::v1::vm_service_client::VmServiceClient;

/// Why a connection could not be made.
#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("'{0}' is not HOST:PORT")]
    BadAddress(String),
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("cannot reach {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the token is not valid header text")]
    BadToken,
    #[error("TLS setup failed: {0}")]
    Tls(String),
}

/// How to reach one agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `HOST:PORT`.
    pub addr: String,
    /// `None`: plain HTTP/2 (loopback agents only). `Some(fp)`: TLS, and the server's
    /// certificate must have this SHA-256 fingerprint.
    pub fingerprint: Option<String>,
    /// The bearer token.
    pub token: String,
}

/// The service clients on one connection, each sending the token.
#[derive(Debug, Clone)]
pub struct Clients {
    pub host: HostServiceClient<InterceptedService<Channel, Auth>>,
    pub vm: VmServiceClient<InterceptedService<Channel, Auth>>,
    pub console: ConsoleServiceClient<InterceptedService<Channel, Auth>>,
    pub disk: DiskServiceClient<InterceptedService<Channel, Auth>>,
    pub switch: SwitchServiceClient<InterceptedService<Channel, Auth>>,
    /// The connection itself, for [`Clients::upload_disk`].
    raw: InterceptedService<Channel, Auth>,
}

impl Clients {
    /// `DiskService.UploadDisk` with the data sent as it is, not copied into a message
    /// buffer first ([`crate::upload_wire`]); otherwise the same call as
    /// `self.disk.upload_disk`.
    pub async fn upload_disk<S>(&self, chunks: S) -> Result<UploadStatus, tonic::Status>
    where
        S: Stream<Item = UploadChunk> + Unpin + Send + 'static,
    {
        let mut req = http::Request::new(tonic::body::Body::new(ChunkBody {
            chunks,
            pending: None,
        }));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = http::Uri::from_static(UPLOAD_DISK_PATH);
        let h = req.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        h.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        let mut svc = self.raw.clone();
        std::future::poll_fn(|cx| svc.poll_ready(cx))
            .await
            .map_err(|e| tonic::Status::from_error(e.into()))?;
        let res = svc
            .call(req)
            .await
            .map_err(|e| tonic::Status::from_error(e.into()))?;
        unary_response(res).await
    }
}

/// An UploadDisk request body: each chunk as its header, then its data.
struct ChunkBody<S> {
    chunks: S,
    pending: Option<Bytes>,
}

impl<S: Stream<Item = UploadChunk> + Unpin> http_body::Body for ChunkBody<S> {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(d) = this.pending.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::data(d))));
        }
        Poll::Ready(ready!(Pin::new(&mut this.chunks).poll_next(cx)).map(|c| {
            let [head, data] = encode_chunk(&c.upload_id, c.offset, c.data);
            if !data.is_empty() {
                this.pending = Some(data);
            }
            Ok(http_body::Frame::data(head))
        }))
    }
}

/// The message of a unary gRPC response, or its status.
async fn unary_response<B, M>(res: http::Response<B>) -> Result<M, tonic::Status>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    M: prost::Message + Default,
{
    let (parts, mut body) = res.into_parts();
    // A trailers-only response (an error) has its status in the headers.
    if let Some(s) = tonic::Status::from_header_map(&parts.headers)
        && s.code() != tonic::Code::Ok
    {
        return Err(s);
    }
    if !parts.status.is_success() {
        return Err(tonic::Status::unknown(format!(
            "the agent answered with HTTP status {}",
            parts.status
        )));
    }
    let mut msg = BytesMut::new();
    let mut status = None;
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        let frame = frame.map_err(|e| tonic::Status::from_error(e.into()))?;
        match frame.into_data() {
            Ok(d) => {
                if msg.len() + d.len() > crate::MAX_MESSAGE_BYTES {
                    return Err(tonic::Status::out_of_range("the response is too large"));
                }
                msg.extend_from_slice(&d);
            }
            Err(f) => {
                if let Ok(t) = f.into_trailers() {
                    status = tonic::Status::from_header_map(&t);
                }
            }
        }
    }
    match status {
        Some(s) if s.code() == tonic::Code::Ok => {}
        Some(s) => return Err(s),
        None => {
            return Err(tonic::Status::internal(
                "the response carried no grpc-status",
            ));
        }
    }
    let Some(msg) = one_message(&msg) else {
        return Err(tonic::Status::internal(
            "the response is not one plain gRPC message",
        ));
    };
    M::decode(msg).map_err(|e| tonic::Status::internal(format!("bad response message: {e}")))
}

/// Adds `authorization: Bearer <token>` to every request.
#[derive(Debug, Clone)]
pub struct Auth(MetadataValue<Ascii>);

impl Auth {
    /// An interceptor for `token`.
    pub fn new(token: &str) -> Result<Self, ConnectError> {
        format!("Bearer {token}")
            .parse()
            .map(Auth)
            .map_err(|_| ConnectError::BadToken)
    }
}

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

/// Every message of an error's source chain, without repeats ("transport error: connection
/// refused" rather than only "transport error").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let m = s.to_string();
        if !m.is_empty() && !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        src = s.source();
    }
    out
}

/// Whether an upload stream that failed with `s` is worth another stream: the connection
/// broke, or the agent still holds the previous stream or names the offset to continue at.
/// A stream the agent could not decode (INVALID_ARGUMENT), one with a message over its limit
/// (RESOURCE_EXHAUSTED) or a compressed one (UNIMPLEMENTED) would fail again the same way.
pub fn upload_retryable(s: &tonic::Status) -> bool {
    use tonic::Code;
    match s.code() {
        Code::Unavailable
        | Code::Unknown
        | Code::Aborted
        | Code::Cancelled
        | Code::DeadlineExceeded => true,
        Code::FailedPrecondition => {
            s.message().contains("in progress") || s.message().contains("continues at offset")
        }
        _ => false,
    }
}

/// The canonical form of a fingerprint: 32 upper-case hex pairs joined by colons.
pub fn fingerprint_of(cert_der: &[u8]) -> String {
    let digest = Sha256::digest(cert_der);
    digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Compare fingerprints ignoring case, colons and spaces.
pub fn same_fingerprint(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        s.chars()
            .filter(char::is_ascii_hexdigit)
            .map(|c| c.to_ascii_lowercase())
            .collect::<String>()
    };
    let (a, b) = (norm(a), norm(b));
    a.len() == 64 && a == b
}

/// Open a connection and build the clients.
pub async fn connect(target: &Target) -> Result<Clients, ConnectError> {
    let channel = channel(target).await?;
    clients(channel, &target.token)
}

/// The service clients on an existing channel.
pub fn clients(channel: Channel, token: &str) -> Result<Clients, ConnectError> {
    let auth = Auth::new(token)?;
    let max = crate::MAX_MESSAGE_BYTES;
    Ok(Clients {
        host: HostServiceClient::with_interceptor(channel.clone(), auth.clone())
            .max_decoding_message_size(max),
        vm: VmServiceClient::with_interceptor(channel.clone(), auth.clone())
            .max_decoding_message_size(max),
        console: ConsoleServiceClient::with_interceptor(channel.clone(), auth.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        disk: DiskServiceClient::with_interceptor(channel.clone(), auth.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        switch: SwitchServiceClient::with_interceptor(channel.clone(), auth.clone()),
        raw: InterceptedService::new(channel, auth),
    })
}

/// An HTTP/2 channel to the agent: plain, or TLS pinned to the fingerprint.
pub async fn channel(target: &Target) -> Result<Channel, ConnectError> {
    let addr = target.addr.clone();
    let (host, _) = split_addr(&addr)?;
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|_| ConnectError::BadAddress(addr.clone()))?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_timeout(Duration::from_secs(20))
        .initial_stream_window_size(Some(16 << 20))
        .initial_connection_window_size(Some(32 << 20));
    let Some(fp) = &target.fingerprint else {
        return endpoint
            .connect()
            .await
            .map_err(|source| ConnectError::Connect { addr, source });
    };
    let verifier = Arc::new(Pinned::new(Some(fp.clone()))?);
    let config = tls_config(verifier)?;
    let server_name = ServerName::try_from(host.to_string())
        .map_err(|_| ConnectError::BadAddress(addr.clone()))?;
    let connector = tower::service_fn(move |_: Uri| {
        let config = config.clone();
        let server_name = server_name.clone();
        let addr = addr.clone();
        async move {
            let tcp = TcpStream::connect(&addr).await?;
            tcp.set_nodelay(true)?;
            let tls = TlsConnector::from(config).connect(server_name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|source| ConnectError::Connect {
            addr: target.addr.clone(),
            source,
        })
}

/// Connect with TLS without checking the certificate, only to learn its fingerprint (the
/// first step of trust on first use). Nothing is sent after the handshake.
pub async fn fetch_fingerprint(addr: &str) -> Result<String, ConnectError> {
    let (host, _) = split_addr(addr)?;
    let verifier = Arc::new(Pinned::new(None)?);
    let config = tls_config(verifier.clone())?;
    let server_name = ServerName::try_from(host.to_string())
        .map_err(|_| ConnectError::BadAddress(addr.to_string()))?;
    let io = |source| ConnectError::Io {
        addr: addr.to_string(),
        source,
    };
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .map_err(|_| io(std::io::ErrorKind::TimedOut.into()))?
        .map_err(io)?;
    TlsConnector::from(config)
        .connect(server_name, tcp)
        .await
        .map_err(io)?;
    let seen = verifier
        .seen
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    seen.ok_or_else(|| ConnectError::Tls("the server sent no certificate".into()))
}

fn split_addr(addr: &str) -> Result<(&str, u16), ConnectError> {
    let bad = || ConnectError::BadAddress(addr.to_string());
    let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host, port))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_config(verifier: Arc<Pinned>) -> Result<Arc<rustls::ClientConfig>, ConnectError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ConnectError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Accepts exactly the certificate with the pinned fingerprint (or, with no pin, any
/// certificate, recording its fingerprint). Signatures are still verified, so the peer
/// must hold the certificate's private key.
#[derive(Debug)]
struct Pinned {
    pin: Option<String>,
    seen: Mutex<Option<String>>,
    provider: Arc<CryptoProvider>,
}

impl Pinned {
    fn new(pin: Option<String>) -> Result<Self, ConnectError> {
        if let Some(p) = &pin
            && !same_fingerprint(p, p)
        {
            return Err(ConnectError::Tls(format!(
                "'{p}' is not a SHA-256 fingerprint"
            )));
        }
        Ok(Pinned {
            pin,
            seen: Mutex::new(None),
            provider: provider(),
        })
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = fingerprint_of(end_entity);
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = Some(fp.clone());
        match &self.pin {
            Some(pin) if !same_fingerprint(pin, &fp) => Err(rustls::Error::General(format!(
                "the agent's certificate fingerprint {fp} is not the pinned {pin}"
            ))),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_compare_loosely_but_must_be_whole() {
        let fp = fingerprint_of(b"cert");
        assert_eq!(fp.len(), 32 * 3 - 1);
        assert!(same_fingerprint(&fp, &fp.replace(':', "").to_lowercase()));
        assert!(!same_fingerprint(&fp, &fingerprint_of(b"other")));
        assert!(!same_fingerprint("ab", "ab"));
    }

    #[test]
    fn addresses_need_a_port() {
        assert!(split_addr("host").is_err());
        assert!(split_addr("host:x").is_err());
        assert!(split_addr(":1").is_err());
        assert_eq!(split_addr("[::1]:7443").unwrap(), ("::1", 7443));
        assert_eq!(split_addr("10.0.0.1:1").unwrap(), ("10.0.0.1", 1));
    }
}
