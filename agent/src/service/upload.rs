//! `DiskService.UploadDisk` served without tonic's codec: the request body's frames go
//! through [`proto::upload_wire::UploadDecoder`], so the data reaches the disk library as
//! slices of the buffers it arrived in (tonic would copy every message into a fresh
//! buffer first). Every other DiskService method goes to the generated server. The token
//! check wraps this service like any other.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body as _, Frame};
use prost::Message;
use proto::upload_wire::{UPLOAD_DISK_PATH, UploadDecoder, WireError, encode_message};
use proto::v1::UploadChunk;
use proto::v1::disk_service_server::{DiskServiceServer, SERVICE_NAME};
use tokio_stream::Stream;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;
use tower::Service;

use super::disk::DiskSvc;
use crate::Agent;
use crate::error::AgentError;

type BoxFuture<T> = Pin<Box<dyn Future<Output = Result<T, Infallible>> + Send>>;

/// The disk service: UploadDisk here, the rest in `inner`.
#[derive(Debug, Clone)]
pub struct DiskRoutes {
    inner: DiskServiceServer<DiskSvc>,
    agent: Arc<Agent>,
}

impl DiskRoutes {
    pub fn new(inner: DiskServiceServer<DiskSvc>, agent: Arc<Agent>) -> Self {
        DiskRoutes { inner, agent }
    }
}

impl NamedService for DiskRoutes {
    const NAME: &'static str = SERVICE_NAME;
}

impl Service<http::Request<Body>> for DiskRoutes {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        if req.uri().path() != UPLOAD_DISK_PATH {
            return self.inner.call(req);
        }
        let agent = self.agent.clone();
        Box::pin(async move {
            let chunks = BodyChunks::new(req.into_body(), proto::MAX_MESSAGE_BYTES);
            Ok(match agent.disks.upload_stream(chunks).await {
                Ok(status) => grpc_response(&status),
                Err(e) => Status::from(e).into_http(),
            })
        })
    }
}

/// The request body as a stream of [`UploadChunk`]s (see [`UploadDecoder`]).
struct BodyChunks {
    body: Body,
    decoder: UploadDecoder,
    ready: VecDeque<UploadChunk>,
    /// Why the stream broke, said after the chunks that came before it.
    failed: Option<AgentError>,
    ended: bool,
}

/// What a request body that cannot be decoded is answered: the same stream sent again would
/// fail the same way, so nothing here is UNAVAILABLE.
fn wire_error(e: WireError) -> AgentError {
    match e {
        WireError::Compressed(_) => {
            AgentError::Unimplemented(format!("{e}: send UploadDisk messages uncompressed"))
        }
        WireError::TooLarge { .. } => AgentError::ResourceExhausted(e.to_string()),
        WireError::Malformed(_) | WireError::Truncated => {
            AgentError::invalid("UploadChunk", e.to_string())
        }
    }
}

impl BodyChunks {
    fn new(body: Body, limit: usize) -> Self {
        BodyChunks {
            body,
            decoder: UploadDecoder::new(limit),
            ready: VecDeque::new(),
            failed: None,
            ended: false,
        }
    }
}

impl Stream for BodyChunks {
    type Item = Result<UploadChunk, AgentError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(c) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(c)));
            }
            if let Some(e) = this.failed.take() {
                return Poll::Ready(Some(Err(e)));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
            let failed = match frame {
                None => {
                    this.ended = true;
                    this.decoder.finish().err().map(wire_error)
                }
                // The connection or the client's stream broke: sending again may work.
                Some(Err(status)) => Some(AgentError::Unavailable(format!(
                    "the upload stream broke: {}",
                    status.message()
                ))),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this
                        .decoder
                        .push(data, &mut this.ready)
                        .err()
                        .map(wire_error),
                    // Trailers of a request carry nothing for us.
                    Err(_) => None,
                },
            };
            if failed.is_some() {
                this.ended = true;
                this.failed = failed;
            }
        }
    }
}

/// A successful unary gRPC response carrying `msg`.
fn grpc_response(msg: &impl Message) -> http::Response<Body> {
    let mut trailers = http::HeaderMap::new();
    trailers.insert(Status::GRPC_STATUS, http::HeaderValue::from_static("0"));
    let mut res = http::Response::new(Body::new(OneMessage {
        data: Some(encode_message(msg)),
        trailers: Some(trailers),
    }));
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    res
}

/// A response body: one data frame, then the trailers.
struct OneMessage {
    data: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl http_body::Body for OneMessage {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(d) = this.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}
