//! `parvis vm console` (the serial console on this terminal) and `parvis vm screenshot`.

use std::io::{IsTerminal, Read, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use proto::client::Clients;
use proto::v1::{FrameUpdate, FramebufferRequest, PixelFormat, SerialInput, TileEncoding};
use tokio_stream::wrappers::ReceiverStream;

use crate::remote::{CtrlC, Rpc, status_error};

/// Ctrl-]: detaches, as in telnet.
const DETACH: u8 = 0x1d;

/// The terminal in raw mode until dropped.
struct RawMode {
    saved: rustix::termios::Termios,
}

impl RawMode {
    fn enter() -> Result<Self> {
        let stdin = std::io::stdin();
        let saved = rustix::termios::tcgetattr(&stdin).context("cannot read the terminal mode")?;
        let mut raw = saved.clone();
        raw.make_raw();
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &raw)
            .context("cannot put the terminal in raw mode")?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = rustix::termios::tcsetattr(
            std::io::stdin(),
            rustix::termios::OptionalActions::Now,
            &self.saved,
        );
    }
}

/// Attach stdin/stdout to the VM's serial console until Ctrl-] (on a terminal), Ctrl-C
/// (otherwise), or the console closes. Scrollback comes first.
pub async fn serial(c: &mut Clients, id: &str, label: &str) -> Result<i32> {
    let (tx, rx) = tokio::sync::mpsc::channel::<SerialInput>(64);
    tx.send(SerialInput {
        vm_id: id.to_string(),
        data: Bytes::new(),
    })
    .await
    .ok();
    let mut out = c
        .console
        .serial_console(ReceiverStream::new(rx))
        .await
        .rpc(&format!("attaching to the serial console of VM '{label}'"))?;
    let tty = std::io::stdin().is_terminal();
    let mut ctrl = CtrlC::claim();
    let raw = if tty { Some(RawMode::enter()?) } else { None };
    if tty {
        eprint!("Connected to the serial console of VM '{label}'. Press Ctrl-] to detach.\r\n");
    } else {
        eprintln!("Connected to the serial console of VM '{label}'. Ctrl-C detaches.");
    }

    // Keyboard → guest, on a thread (stdin reads block).
    let (detach_tx, mut detach_rx) = tokio::sync::mpsc::channel::<()>(1);
    std::thread::Builder::new()
        .name("console-input".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 4096];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut data = &buf[..n];
                let mut detach = false;
                if tty && let Some(p) = data.iter().position(|&b| b == DETACH) {
                    data = &data[..p];
                    detach = true;
                }
                if !data.is_empty()
                    && tx
                        .blocking_send(SerialInput {
                            vm_id: String::new(),
                            data: Bytes::copy_from_slice(data),
                        })
                        .is_err()
                {
                    return;
                }
                if detach {
                    let _ = detach_tx.blocking_send(());
                    return;
                }
            }
        })
        .context("cannot start the console input thread")?;

    // Guest → screen.
    let mut stdout = std::io::stdout();
    let ended: Result<&str> = loop {
        tokio::select! {
            m = out.message() => match m {
                Ok(Some(m)) => {
                    stdout.write_all(&m.data)?;
                    stdout.flush()?;
                }
                Ok(None) => break Ok("the console closed (the VM stopped?)"),
                Err(s) => break Err(status_error("serial console", &s)),
            },
            Some(()) = detach_rx.recv() => break Ok("detached"),
            () = ctrl.pressed() => break Ok("detached"),
        }
    };
    drop(raw);
    let msg = ended?;
    eprintln!("\n[parvis: {msg}]");
    Ok(0)
}

/// Save the first full frame of the VM's screen as a PNG.
pub async fn screenshot(c: &mut Clients, id: &str, file: &Path, timeout: u64) -> Result<i32> {
    let grab = async {
        let mut s = c
            .console
            .stream_framebuffer(FramebufferRequest {
                vm_id: id.to_string(),
                encoding: TileEncoding::Lz4 as i32,
            })
            .await
            .rpc("opening the VM's screen")?;
        loop {
            let u = s
                .message()
                .await
                .map_err(|st| status_error("reading the VM's screen", &st))?
                .context("the screen stream ended before a full frame arrived (the VM stopped?)")?;
            if u.active && u.full && u.width > 0 && u.height > 0 {
                return Ok::<_, anyhow::Error>(u);
            }
        }
    };
    let frame = tokio::time::timeout(Duration::from_secs(timeout), grab)
        .await
        .map_err(|_| {
            anyhow!("no screen image within {timeout} s (has the VM's display come up yet?)")
        })??;
    let (w, h) = (frame.width, frame.height);
    let file = file.to_path_buf();
    let saved = file.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let rgb = decode_frame(&frame)?;
        let img = image::RgbImage::from_raw(w, h, rgb).context("frame size mismatch")?;
        img.save_with_format(&file, image::ImageFormat::Png)
            .with_context(|| format!("cannot write {}", file.display()))
    })
    .await??;
    eprintln!("Saved the {w}x{h} screen to {}.", saved.display());
    Ok(0)
}

/// A full frame's tiles as packed RGB.
pub fn decode_frame(u: &FrameUpdate) -> Result<Vec<u8>> {
    if u.format != PixelFormat::Bgrx8888 as i32 && u.format != PixelFormat::Unspecified as i32 {
        bail!("unsupported pixel format {}", u.format);
    }
    let (w, h) = (u.width as usize, u.height as usize);
    let mut rgb = vec![0u8; w * h * 3];
    for t in &u.tiles {
        let (tx, ty, tw, th) = proto::tiles::place(t, u.width, u.height)?;
        let px = proto::tiles::decode(t)?;
        for row in 0..th {
            let src = &px[row * tw * 4..(row + 1) * tw * 4];
            let dst_off = ((ty + row) * w + tx) * 3;
            let dst = &mut rgb[dst_off..dst_off + tw * 3];
            for (d, s) in dst.chunks_exact_mut(3).zip(src.chunks_exact(4)) {
                d[0] = s[2];
                d[1] = s[1];
                d[2] = s[0];
            }
        }
    }
    Ok(rgb)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_decode_into_rgb() {
        // A 4x2 screen: a 2x2 raw tile on the left, an LZ4 tile on the right.
        let left: Vec<u8> = [[1u8, 2, 3, 0]; 4].concat();
        let right_raw: Vec<u8> = [[10u8, 20, 30, 0]; 4].concat();
        let mut lz = (right_raw.len() as u32).to_le_bytes().to_vec();
        lz.extend(lz4_flex::block::compress(&right_raw));
        let tile = |x, data: Vec<u8>, enc: TileEncoding| proto::v1::Tile {
            x,
            y: 0,
            width: 2,
            height: 2,
            encoding: enc as i32,
            data: Bytes::from(data),
        };
        let u = FrameUpdate {
            width: 4,
            height: 2,
            format: PixelFormat::Bgrx8888 as i32,
            full: true,
            active: true,
            tiles: vec![
                tile(0, left, TileEncoding::Raw),
                tile(2, lz, TileEncoding::Lz4),
            ],
            ..Default::default()
        };
        let rgb = decode_frame(&u).unwrap();
        assert_eq!(&rgb[0..3], &[3, 2, 1]);
        assert_eq!(&rgb[6..9], &[30, 20, 10]);
        assert_eq!(&rgb[12 + 9..12 + 12], &[30, 20, 10]);
        let mut bad = u.clone();
        bad.tiles[1].x = 3;
        assert!(decode_frame(&bad).is_err());
    }
}
