//! ConsoleService: screen, input, serial.

use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use proto::v1::console_service_server::ConsoleService;
use proto::v1::{
    FrameUpdate, FramebufferRequest, InputEvent, InputSummary, SerialInput, SerialOutput,
    TileEncoding, input_event,
};
use proto::worker::{Input, Key, Pointer, input, request};
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::Agent;
use crate::error::AgentError;
use crate::service::vm::vm_id;

#[derive(Debug)]
pub struct ConsoleSvc {
    agent: Arc<Agent>,
}

impl ConsoleSvc {
    pub fn new(agent: Arc<Agent>) -> Self {
        ConsoleSvc { agent }
    }
}

type Frames = Pin<Box<dyn Stream<Item = Result<FrameUpdate, Status>> + Send>>;
type Serial = Pin<Box<dyn Stream<Item = Result<SerialOutput, Status>> + Send>>;

/// Largest serial input message (a paste).
const MAX_SERIAL_INPUT: usize = 64 << 10;

#[tonic::async_trait]
impl ConsoleService for ConsoleSvc {
    type StreamFramebufferStream = Frames;

    async fn stream_framebuffer(
        &self,
        req: Request<FramebufferRequest>,
    ) -> Result<Response<Frames>, Status> {
        let r = req.into_inner();
        let id = vm_id(&self.agent, &r.vm_id)?;
        let encoding = TileEncoding::try_from(r.encoding)
            .map_err(|_| AgentError::invalid("encoding", "unknown tile encoding"))?;
        let screen = self.agent.vms.screen(&id).await?;
        let rx = screen.subscribe(encoding);
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn send_input(
        &self,
        req: Request<Streaming<InputEvent>>,
    ) -> Result<Response<InputSummary>, Status> {
        let mut stream = req.into_inner();
        let mut events = 0u64;
        while let Some(ev) = stream.next().await {
            let ev = ev?;
            let id = vm_id(&self.agent, &ev.vm_id)?;
            let kind = match ev.kind {
                Some(input_event::Kind::Key(k)) => {
                    // Set-1 make codes, alone or with an E0 (extended) or E1 (Pause) prefix.
                    if k.scancode > 0xE1FF
                        || (k.scancode > 0xFF && !matches!(k.scancode >> 8, 0xE0 | 0xE1))
                    {
                        return Err(
                            AgentError::invalid("key.scancode", "not a set-1 scan code").into()
                        );
                    }
                    input::Kind::Key(Key {
                        scancode: k.scancode,
                        pressed: k.pressed,
                    })
                }
                Some(input_event::Kind::Pointer(p)) => {
                    if p.x > 32767 || p.y > 32767 {
                        return Err(
                            AgentError::invalid("pointer", "x and y must be 0..=32767").into()
                        );
                    }
                    input::Kind::Pointer(Pointer {
                        x: p.x,
                        y: p.y,
                        buttons: p.buttons & 7,
                        wheel: p.wheel.clamp(-127, 127),
                    })
                }
                None => return Err(AgentError::invalid("kind", "missing").into()),
            };
            let running = self.agent.vms.running(&id)?;
            running.input.send(Input { kind: Some(kind) }).await?;
            events += 1;
        }
        Ok(Response::new(InputSummary { events }))
    }

    type SerialConsoleStream = Serial;

    async fn serial_console(
        &self,
        req: Request<Streaming<SerialInput>>,
    ) -> Result<Response<Serial>, Status> {
        let mut input = req.into_inner();
        let first = input
            .next()
            .await
            .ok_or_else(|| AgentError::invalid("vm_id", "the first message must name the VM"))??;
        let id = vm_id(&self.agent, &first.vm_id)?;
        let running = self.agent.vms.running(&id)?;
        let (back, mut rx) = running.serial.subscribe();
        let (tx, out) = tokio::sync::mpsc::channel::<Result<SerialOutput, Status>>(64);
        // Client → guest.
        let conn = running.conn.clone();
        let mut pending = first.data;
        tokio::spawn(async move {
            loop {
                if !pending.is_empty() {
                    if pending.len() > MAX_SERIAL_INPUT {
                        pending.truncate(MAX_SERIAL_INPUT);
                    }
                    if conn
                        .call(request::Kind::SerialInput(std::mem::take(&mut pending)))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                match input.next().await {
                    Some(Ok(m)) => pending = m.data,
                    _ => break,
                }
            }
        });
        // Guest → client: scrollback, then live.
        tokio::spawn(async move {
            if !back.is_empty()
                && tx
                    .send(Ok(SerialOutput {
                        data: Bytes::from(back),
                        scrollback: true,
                    }))
                    .await
                    .is_err()
            {
                return;
            }
            loop {
                let data = match rx.recv().await {
                    Ok(d) => d,
                    Err(RecvError::Lagged(n)) => {
                        Bytes::from(format!("\r\n[parvis: {n} chunks of output skipped]\r\n"))
                    }
                    Err(RecvError::Closed) => break,
                };
                if tx
                    .send(Ok(SerialOutput {
                        data,
                        scrollback: false,
                    }))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }
}
