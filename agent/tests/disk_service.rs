//! The disk library: resumable uploads, verification, conversion, resizing, deletion.
//!
//! These drive `DiskLibrary` directly (the gRPC handlers are thin); uploads over real gRPC
//! are in `cli_remote.rs` and the e2e tests, their throughput in the `bench` binary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent::disks::DiskLibrary;
use agent::error::AgentError;
use agent::events::EventBus;
use agent::store::Layout;
use agent::tasks::Tasks;
use prost::bytes::Bytes;
use proto::v1::{
    ConvertDiskRequest, CreateDiskRequest, DiskFormat, DiskVariant, ResizeDiskRequest, Task,
    TaskState, UploadChunk, UploadState, UploadStatus, event,
};
use sha2::{Digest, Sha256};
use tonic::Status;

const MIB: usize = 1 << 20;

struct Env {
    _dir: tempfile::TempDir,
    layout: Layout,
    events: Arc<EventBus>,
    tasks: Arc<Tasks>,
    lib: DiskLibrary,
}

impl Env {
    fn new() -> Env {
        Env::new_in(&std::env::temp_dir())
    }

    fn new_in(parent: &Path) -> Env {
        let dir = tempfile::tempdir_in(parent).unwrap();
        let layout = Layout::new(dir.path().join("state"));
        layout.create().unwrap();
        let events = Arc::new(EventBus::default());
        let tasks = Arc::new(Tasks::new(events.clone()));
        let lib = DiskLibrary::open(&layout, events.clone(), tasks.clone()).unwrap();
        Env {
            _dir: dir,
            layout,
            events,
            tasks,
            lib,
        }
    }

    /// Drop the library (as a crash would, without finishing anything) and open it again.
    fn reopen(&mut self) {
        self.tasks = Arc::new(Tasks::new(self.events.clone()));
        self.lib =
            DiskLibrary::open(&self.layout, self.events.clone(), self.tasks.clone()).unwrap();
    }

    fn scratch(&self, name: &str) -> PathBuf {
        self.layout.root.parent().unwrap().join(name)
    }

    async fn wait_upload(&self, id: &str) -> UploadStatus {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = self.lib.get_upload(id).unwrap();
            if s.state != UploadState::Verifying as i32 && s.state != UploadState::Receiving as i32
            {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "upload {id} never finished: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn wait_task(&self, id: &str) -> Task {
        let mut rx = self.tasks.watch(id).unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let t = rx.borrow_and_update().clone();
            if t.state != TaskState::Running as i32 {
                return t;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                tokio::time::timeout(left, rx.changed()).await.is_ok(),
                "task {id} never ended: {t:?}"
            );
        }
    }

    /// Upload `data` in one go and wait for the result.
    async fn upload_all(&self, name: &str, data: &[u8], sha: &str) -> UploadStatus {
        let s = self
            .lib
            .begin_upload(name, data.len() as u64, sha)
            .await
            .unwrap();
        let r = self
            .lib
            .upload_stream(stream_of(&s.upload_id, 0, data, MIB, false))
            .await
            .unwrap();
        assert_eq!(r.verified_offset, data.len() as u64);
        self.wait_upload(&s.upload_id).await
    }

    /// Uploads that left more than the record of how they ended: a directory in `uploads/`
    /// with data in it, or whose `upload.json` does not say it ended.
    fn uploads_left(&self) -> Vec<String> {
        let mut left = Vec::new();
        for id in self.entries(&self.layout.uploads()) {
            let dir = self.layout.uploads().join(&id);
            let files = self.entries(&dir);
            let ended = std::fs::read(dir.join("upload.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .is_some_and(|m| m["ended"]["state"].is_string());
            if files != ["upload.json"] || !ended {
                left.push(format!("{id}: {files:?}, ended: {ended}"));
            }
        }
        left
    }

    fn entries(&self, dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

/// The messages of one stream: `data` (which starts at `offset`) in `chunk`-byte pieces,
/// optionally ending in a transport error.
fn stream_of(
    id: &str,
    offset: u64,
    data: &[u8],
    chunk: usize,
    broken: bool,
) -> impl tokio_stream::Stream<Item = Result<UploadChunk, Status>> + Unpin + Send + 'static {
    let mut msgs: Vec<Result<UploadChunk, Status>> = data
        .chunks(chunk)
        .enumerate()
        .map(|(i, c)| {
            Ok(UploadChunk {
                upload_id: if i == 0 {
                    id.to_string()
                } else {
                    String::new()
                },
                offset: if i == 0 { offset } else { 0 },
                data: Bytes::copy_from_slice(c),
            })
        })
        .collect();
    if msgs.is_empty() {
        msgs.push(Ok(UploadChunk {
            upload_id: id.to_string(),
            offset,
            data: Bytes::new(),
        }));
    }
    if broken {
        msgs.push(Err(Status::unavailable("connection reset")));
    }
    tokio_stream::iter(msgs)
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Deterministic, incompressible-looking bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

fn run(cmd: &mut Command) {
    let o = cmd.output().expect("command runs (qemu-img is needed)");
    assert!(
        o.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[tokio::test]
async fn upload_resumes_after_an_interrupted_stream() {
    let env = Env::new();
    // A raw image with a hole in the middle (zeros are stored sparse).
    let mut data = pattern(12 * MIB, 1);
    data[4 * MIB..8 * MIB].fill(0);
    let s = env
        .lib
        .begin_upload("web.img", data.len() as u64, &sha(&data).to_uppercase())
        .await
        .unwrap();
    assert_eq!(s.state, UploadState::Receiving as i32);
    assert_eq!(s.verified_offset, 0);
    let id = s.upload_id.clone();

    // The connection breaks after 5 MiB: what arrived is kept.
    let e = env
        .lib
        .upload_stream(stream_of(&id, 0, &data[..5 * MIB], MIB, true))
        .await
        .unwrap_err();
    assert!(matches!(e, AgentError::Unavailable(_)), "{e}");
    let s = env.lib.get_upload(&id).unwrap();
    assert_eq!(s.verified_offset, 5 * MIB as u64);
    assert_eq!(s.state, UploadState::Receiving as i32);

    // A stream that starts anywhere else is told where to go on.
    for wrong in [0, 4 * MIB as u64, 6 * MIB as u64] {
        let e = env
            .lib
            .upload_stream(stream_of(&id, wrong, &data[..MIB], MIB, false))
            .await
            .unwrap_err();
        let st = Status::from(e);
        assert_eq!(st.code(), tonic::Code::FailedPrecondition);
        assert!(
            st.message().contains(&(5 * MIB).to_string()),
            "{}",
            st.message()
        );
    }

    // A stream that simply ends early also keeps its data.
    let r = env
        .lib
        .upload_stream(stream_of(
            &id,
            5 * MIB as u64,
            &data[5 * MIB..9 * MIB],
            3 * MIB,
            false,
        ))
        .await
        .unwrap();
    assert_eq!(r.verified_offset, 9 * MIB as u64);
    assert_eq!(r.state, UploadState::Receiving as i32);

    let r = env
        .lib
        .upload_stream(stream_of(
            &id,
            9 * MIB as u64,
            &data[9 * MIB..],
            1000 * 512,
            false,
        ))
        .await
        .unwrap();
    assert_eq!(r.verified_offset, data.len() as u64);
    let done = env.wait_upload(&id).await;
    assert_eq!(done.state, UploadState::Done as i32, "{done:?}");
    let disk = env.lib.get(&done.disk_id).unwrap();
    assert_eq!(disk.name, "web.img");
    assert_eq!(disk.format, DiskFormat::Raw as i32);
    assert_eq!(disk.virtual_size, data.len() as u64);
    assert!(disk.allocated_bytes < data.len() as u64, "{disk:?}");
    let path = env.lib.path_of(&done.disk_id).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), data);
    assert_eq!(env.uploads_left(), Vec::<String>::new());
    let t = env.tasks.get(&done.task_id).unwrap();
    assert_eq!(t.state, TaskState::Succeeded as i32);
    assert_eq!(t.disk_id, done.disk_id);

    // A finished upload takes no more data.
    let e = env
        .lib
        .upload_stream(stream_of(&id, data.len() as u64, &[0; 512], 512, false))
        .await
        .unwrap_err();
    assert_eq!(Status::from(e).code(), tonic::Code::FailedPrecondition);
}

#[tokio::test]
async fn streams_ending_at_unaligned_offsets_resume_to_the_same_bytes() {
    // Direct writes go in aligned blocks; streams may end anywhere.
    let env = Env::new();
    let mut data = pattern(21 * MIB + 512, 5);
    data[MIB + 100..3 * MIB].fill(0);
    let s = env
        .lib
        .begin_upload("odd.img", data.len() as u64, &sha(&data))
        .await
        .unwrap();
    let id = s.upload_id.clone();
    let stops = [4097, 3 * MIB + 1, 11 * MIB - 3, 19 * MIB + 4095, data.len()];
    let mut at = 0;
    for (i, &stop) in stops.iter().enumerate() {
        let r = env
            .lib
            .upload_stream(stream_of(
                &id,
                at as u64,
                &data[at..stop],
                777_777,
                i % 2 == 0,
            ))
            .await;
        assert_eq!(r.is_err(), i % 2 == 0, "{r:?}");
        assert_eq!(
            env.lib.get_upload(&id).unwrap().verified_offset,
            stop as u64
        );
        at = stop;
    }
    let done = env.wait_upload(&id).await;
    assert_eq!(done.state, UploadState::Done as i32, "{done:?}");
    let path = env.lib.path_of(&done.disk_id).unwrap();
    assert!(std::fs::read(&path).unwrap() == data);
}

#[tokio::test]
async fn checksum_mismatch_fails_and_leaves_nothing() {
    let env = Env::new();
    let data = pattern(2 * MIB, 2);
    let wrong = sha(b"something else");
    let s = env.upload_all("bad", &data, &wrong).await;
    assert_eq!(s.state, UploadState::Failed as i32);
    assert!(s.error.contains("checksum mismatch"), "{}", s.error);
    assert!(s.disk_id.is_empty());
    assert!(env.lib.list().is_empty());
    assert_eq!(env.uploads_left(), Vec::<String>::new());
    assert!(env.entries(&env.layout.disks()).is_empty());
    let t = env.tasks.get(&s.task_id).unwrap();
    assert_eq!(t.state, TaskState::Failed as i32);
    assert!(t.error.contains("checksum mismatch"), "{}", t.error);
}

#[tokio::test]
async fn a_checksum_declared_after_the_data_is_checked_like_one_declared_before() {
    let mut env = Env::new();
    let data = pattern(6 * MIB + 512, 11);
    let s = env
        .lib
        .begin_upload("late.img", data.len() as u64, "")
        .await
        .unwrap();
    let id = s.upload_id.clone();
    let code = |r: Result<UploadStatus, AgentError>| Status::from(r.unwrap_err()).code();

    // Too early: data is missing.
    let e = env.lib.finish_upload(&id, &sha(&data)).await.unwrap_err();
    let st = Status::from(e);
    assert_eq!(st.code(), tonic::Code::FailedPrecondition);
    assert!(st.message().contains("0 of its"), "{}", st.message());

    // Half, a crash (the hash state is rebuilt from the file), the rest.
    let _ = env
        .lib
        .upload_stream(stream_of(&id, 0, &data[..3 * MIB + 512], MIB, true))
        .await;
    env.reopen();
    let r = env
        .lib
        .upload_stream(stream_of(
            &id,
            3 * MIB as u64 + 512,
            &data[3 * MIB + 512..],
            MIB,
            false,
        ))
        .await
        .unwrap();
    assert_eq!(r.verified_offset, data.len() as u64);
    assert_eq!(r.state, UploadState::AwaitingChecksum as i32, "{r:?}");
    // Nothing more goes in, and nothing is verified until the checksum comes, even across a
    // restart.
    let more = env
        .lib
        .upload_stream(stream_of(&id, data.len() as u64, &[1; 512], 512, false))
        .await;
    assert_eq!(code(more), tonic::Code::FailedPrecondition);
    env.reopen();
    let s = env.lib.get_upload(&id).unwrap();
    assert_eq!(s.state, UploadState::AwaitingChecksum as i32, "{s:?}");
    assert!(env.lib.list().is_empty());

    for bad in ["", "abc", &"g".repeat(64)] {
        match env.lib.finish_upload(&id, bad).await.unwrap_err() {
            AgentError::InvalidArgument { field, .. } => assert_eq!(field, "sha256"),
            e => panic!("{bad:?}: {e}"),
        }
    }
    for unknown in ["0123456789abcdef0123456789abcdef", "../../etc"] {
        let e = env
            .lib
            .finish_upload(unknown, &sha(&data))
            .await
            .unwrap_err();
        assert!(matches!(e, AgentError::NotFound { .. }), "{e}");
    }

    let s = env
        .lib
        .finish_upload(&id, &sha(&data).to_uppercase())
        .await
        .unwrap();
    assert!(
        s.state == UploadState::Verifying as i32 || s.state == UploadState::Done as i32,
        "{s:?}"
    );
    let done = env.wait_upload(&id).await;
    assert_eq!(done.state, UploadState::Done as i32, "{done:?}");
    assert_eq!(
        std::fs::read(env.lib.path_of(&done.disk_id).unwrap()).unwrap(),
        data
    );
    assert_eq!(env.uploads_left(), Vec::<String>::new());
    // Saying it again (a lost answer) is harmless; saying something else is not.
    let again = env.lib.finish_upload(&id, &sha(&data)).await.unwrap();
    assert_eq!(again.disk_id, done.disk_id);
    let other = env.lib.finish_upload(&id, &sha(b"other")).await;
    assert_eq!(code(other), tonic::Code::FailedPrecondition);
}

#[tokio::test]
async fn a_wrong_late_checksum_fails_and_a_waiting_upload_can_be_cancelled() {
    let env = Env::new();
    let data = pattern(2 * MIB, 12);
    let s = env.upload_all("bad-late", &data, "").await;
    assert_eq!(s.state, UploadState::AwaitingChecksum as i32, "{s:?}");
    env.lib
        .finish_upload(&s.upload_id, &sha(b"not this"))
        .await
        .unwrap();
    let s = env.wait_upload(&s.upload_id).await;
    assert_eq!(s.state, UploadState::Failed as i32);
    assert!(s.error.contains("checksum mismatch"), "{}", s.error);
    assert!(env.lib.list().is_empty());
    assert_eq!(env.uploads_left(), Vec::<String>::new());

    let s = env.upload_all("waiting", &data, "").await;
    assert_eq!(s.state, UploadState::AwaitingChecksum as i32, "{s:?}");
    let c = env.lib.cancel_upload(&s.upload_id).await.unwrap();
    assert_eq!(c.state, UploadState::Cancelled as i32);
    assert_eq!(env.uploads_left(), Vec::<String>::new());
    let e = env.lib.finish_upload(&s.upload_id, &sha(&data)).await;
    assert_eq!(
        Status::from(e.unwrap_err()).code(),
        tonic::Code::FailedPrecondition
    );
    assert!(env.lib.list().is_empty());
}

#[tokio::test]
async fn begin_upload_checks_its_arguments() {
    let env = Env::new();
    let h = sha(b"x");
    let cases: &[(&str, u64, &str, &str)] = &[
        ("", 512, &h, "name"),
        ("a/b", 512, &h, "name"),
        ("a\0b", 512, &h, "name"),
        (&"n".repeat(201), 512, &h, "name"),
        ("ok", 0, &h, "size"),
        ("ok", 1000, &h, "size"),
        ("ok", (64u64 << 40) + 512, &h, "size"),
        ("ok", 512, "abc", "sha256"),
        ("ok", 512, &"g".repeat(64), "sha256"),
    ];
    for (name, size, sha, field) in cases {
        let e = env.lib.begin_upload(name, *size, sha).await.unwrap_err();
        match e {
            AgentError::InvalidArgument { field: f, .. } => assert_eq!(&f, field, "{name}"),
            e => panic!("{name:?} {size}: {e}"),
        }
    }
    // More than the filesystem holds (but within the 64 TiB limit).
    let e = env
        .lib
        .begin_upload("huge", 60 << 40, &h)
        .await
        .unwrap_err();
    assert_eq!(Status::from(e).code(), tonic::Code::ResourceExhausted);
    assert_eq!(env.uploads_left(), Vec::<String>::new());
    let e = env.lib.get_upload("../../etc").unwrap_err();
    assert!(matches!(e, AgentError::NotFound { .. }));
}

#[tokio::test]
async fn data_past_the_end_and_parallel_streams_are_refused() {
    let env = Env::new();
    let data = pattern(4 * MIB, 3);
    let s = env
        .lib
        .begin_upload("x", data.len() as u64, &sha(&data))
        .await
        .unwrap();
    let id = s.upload_id.clone();

    // One stream stays open...
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<UploadChunk, Status>>(4);
    tx.send(Ok(UploadChunk {
        upload_id: id.clone(),
        offset: 0,
        data: Bytes::copy_from_slice(&data[..MIB]),
    }))
    .await
    .unwrap();
    let lib = Arc::new(env);
    let first = {
        let lib = lib.clone();
        tokio::spawn(async move {
            lib.lib
                .upload_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        })
    };
    // Once it has taken its first chunk (and so holds the upload: the claim follows at once,
    // and this runtime has one thread)...
    let deadline = Instant::now() + Duration::from_secs(30);
    while tx.capacity() < tx.max_capacity() {
        assert!(Instant::now() < deadline, "the first stream never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // ... a second stream is refused.
    let e = lib
        .lib
        .upload_stream(stream_of(&id, 0, &data[..MIB], MIB, false))
        .await
        .unwrap_err();
    let st = Status::from(e);
    assert_eq!(st.code(), tonic::Code::FailedPrecondition);
    assert!(
        st.message().contains("upload already in progress"),
        "{}",
        st.message()
    );

    // Non-contiguous data in the open stream is refused; what came before is kept.
    tx.send(Ok(UploadChunk {
        upload_id: String::new(),
        offset: 3 * MIB as u64,
        data: Bytes::copy_from_slice(&data[MIB..2 * MIB]),
    }))
    .await
    .unwrap();
    drop(tx);
    let e = first.await.unwrap().unwrap_err();
    assert!(matches!(e, AgentError::InvalidArgument { .. }), "{e}");
    assert_eq!(lib.lib.get_upload(&id).unwrap().verified_offset, MIB as u64);

    // Too much data: a chunk reaching past the declared size is refused whole.
    let mut more = data[MIB..].to_vec();
    more.extend_from_slice(&[1; 512]);
    let e = lib
        .lib
        .upload_stream(stream_of(&id, MIB as u64, &more, more.len(), false))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, AgentError::InvalidArgument { field, .. } if field == "data"),
        "{e}"
    );
    let s = lib.lib.get_upload(&id).unwrap();
    assert_eq!(s.state, UploadState::Receiving as i32);
    assert_eq!(s.verified_offset, MIB as u64);

    // Cancel: the data goes.
    let s = lib.lib.cancel_upload(&id).await.unwrap();
    assert_eq!(s.state, UploadState::Cancelled as i32);
    assert_eq!(lib.uploads_left(), Vec::<String>::new());
    let e = lib
        .lib
        .upload_stream(stream_of(&id, s.verified_offset, &data[..512], 512, false))
        .await
        .unwrap_err();
    assert_eq!(Status::from(e).code(), tonic::Code::FailedPrecondition);
}

#[tokio::test]
async fn a_vhdx_from_qemu_img_becomes_a_disk_and_converts_to_raw() {
    let env = Env::new();
    // A raw source with data at a few places, turned into a dynamic VHDX by qemu-img.
    let raw = env.scratch("src.raw");
    let mut content = vec![0u8; 64 * MIB];
    content[..MIB].copy_from_slice(&pattern(MIB, 4));
    content[40 * MIB..43 * MIB].copy_from_slice(&pattern(3 * MIB, 5));
    content[64 * MIB - 4096..].fill(0x5a);
    std::fs::write(&raw, &content).unwrap();
    let vhdx = env.scratch("src.vhdx");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "vhdx"])
        .arg(&raw)
        .arg(&vhdx));
    let bytes = std::fs::read(&vhdx).unwrap();
    assert_eq!(bytes.len() % 512, 0);

    let mut events = env.events.subscribe();
    let s = env.upload_all("web.vhdx", &bytes, &sha(&bytes)).await;
    assert_eq!(s.state, UploadState::Done as i32, "{s:?}");
    let disk = env.lib.get(&s.disk_id).unwrap();
    assert_eq!(disk.format, DiskFormat::Vhdx as i32);
    assert_eq!(disk.variant, DiskVariant::Dynamic as i32);
    assert_eq!(disk.virtual_size, 64 * MIB as u64);
    let inspected = env.lib.inspect(&s.disk_id).await.unwrap();
    assert!(inspected.check_findings.is_empty(), "{inspected:?}");
    // The new disk was announced.
    let mut announced = false;
    while let Ok(ev) = events.try_recv() {
        if let Some(event::Kind::DiskChanged(d)) = ev.kind {
            announced |= d.id == s.disk_id;
        }
    }
    assert!(announced);

    // VHDX → raw, and the content is the same.
    let t = env
        .lib
        .convert(ConvertDiskRequest {
            disk_id: s.disk_id.clone(),
            format: DiskFormat::Raw as i32,
            variant: DiskVariant::Unspecified as i32,
            name: String::new(),
        })
        .unwrap();
    assert_eq!(t.state, TaskState::Running as i32);
    let t = env.wait_task(&t.id).await;
    assert_eq!(t.state, TaskState::Succeeded as i32, "{t:?}");
    let copy = env.lib.get(&t.disk_id).unwrap();
    assert_eq!(copy.name, "web.raw");
    assert_eq!(copy.format, DiskFormat::Raw as i32);
    assert_eq!(copy.virtual_size, 64 * MIB as u64);
    assert_eq!(
        std::fs::read(env.lib.path_of(&t.disk_id).unwrap()).unwrap(),
        content
    );
    assert_eq!(env.lib.list().len(), 2);
}

#[tokio::test]
async fn a_corrupt_image_with_a_valid_checksum_is_refused() {
    let env = Env::new();
    let mut bytes = pattern(4 * MIB, 6);
    bytes[..8].copy_from_slice(b"vhdxfile");
    let s = env.upload_all("evil.vhdx", &bytes, &sha(&bytes)).await;
    assert_eq!(s.state, UploadState::Failed as i32);
    assert!(s.error.starts_with("disk image:"), "{}", s.error);
    assert!(env.lib.list().is_empty());
    assert!(env.entries(&env.layout.disks()).is_empty());
    assert_eq!(env.uploads_left(), Vec::<String>::new());
}

#[tokio::test]
async fn differencing_images_are_refused() {
    use parvis_disk::ImageFormat;
    use parvis_disk::image::{CreateOptions, Variant};
    let env = Env::new();
    for (format, ext) in [(ImageFormat::Vhd, "vhd"), (ImageFormat::Vhdx, "vhdx")] {
        let base = env.scratch(&format!("base.{ext}"));
        let child = env.scratch(&format!("child.{ext}"));
        let opts = |variant| CreateOptions {
            format,
            variant,
            size: 16 << 20,
            block_size: None,
            logical_sector_size: 512,
        };
        drop(parvis_disk::image::create(&base, &opts(Variant::Dynamic)).unwrap());
        drop(
            parvis_disk::image::create(
                &child,
                &opts(Variant::Differencing {
                    parent: base.clone(),
                }),
            )
            .unwrap(),
        );
        let bytes = std::fs::read(&child).unwrap();
        let s = env.upload_all("child", &bytes, &sha(&bytes)).await;
        assert_eq!(s.state, UploadState::Failed as i32, "{ext}");
        assert!(s.error.contains("differencing"), "{ext}: {}", s.error);
        assert!(!s.error.contains("/tmp"), "{ext}: {}", s.error);
        assert!(env.lib.list().is_empty());
    }
}

#[tokio::test]
async fn uploads_survive_a_crash() {
    let mut env = Env::new();
    let data = pattern(10 * MIB, 7);
    let s = env
        .lib
        .begin_upload("crash", data.len() as u64, &sha(&data))
        .await
        .unwrap();
    let id = s.upload_id.clone();
    env.lib
        .upload_stream(stream_of(&id, 0, &data[..6 * MIB], MIB, false))
        .await
        .unwrap();
    // The crash: the last checkpoint that reached the disk was at 2 MiB; the bytes after
    // it (and some garbage) are in the file but were never made durable.
    let dir = env.layout.uploads().join(&id);
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("upload.json")).unwrap()).unwrap();
    assert_eq!(meta["verified_offset"], 6 * MIB as u64);
    meta["verified_offset"] = (2 * MIB as u64).into();
    std::fs::write(dir.join("upload.json"), serde_json::to_vec(&meta).unwrap()).unwrap();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join("data.partial"))
            .unwrap();
        f.write_all(&[0xee; 12345]).unwrap();
    }
    // Debris of interrupted writes elsewhere.
    std::fs::create_dir(env.layout.disks().join("0123456789ab")).unwrap();
    std::fs::write(env.layout.disks().join("0123456789ab/image.raw"), b"half").unwrap();
    std::fs::create_dir(env.layout.uploads().join("ba9876543210")).unwrap();
    std::fs::write(dir.join(".upload.json.tmp-1"), b"{").unwrap();

    env.reopen();
    assert!(env.lib.list().is_empty());
    assert_eq!(env.entries(&env.layout.disks()), Vec::<String>::new());
    assert_eq!(env.entries(&env.layout.uploads()), vec![id.clone()]);
    assert_eq!(env.entries(&dir), vec!["data.partial", "upload.json"]);
    let s = env.lib.get_upload(&id).unwrap();
    assert_eq!(s.verified_offset, 2 * MIB as u64);
    assert_eq!(s.state, UploadState::Receiving as i32);
    assert_eq!(
        std::fs::metadata(dir.join("data.partial")).unwrap().len(),
        2 * MIB as u64
    );
    // Resume: the hash of the first 2 MiB is rebuilt from the file.
    env.lib
        .upload_stream(stream_of(
            &id,
            2 * MIB as u64,
            &data[2 * MIB..],
            2 * MIB,
            false,
        ))
        .await
        .unwrap();
    let s = env.wait_upload(&id).await;
    assert_eq!(s.state, UploadState::Done as i32, "{s:?}");
    assert_eq!(
        std::fs::read(env.lib.path_of(&s.disk_id).unwrap()).unwrap(),
        data
    );

    // The disk is still there after another restart.
    env.reopen();
    assert_eq!(
        env.lib.get(&s.disk_id).unwrap().virtual_size,
        data.len() as u64
    );
}

#[tokio::test]
async fn a_complete_upload_is_verified_again_after_a_crash() {
    let mut env = Env::new();
    let data = pattern(3 * MIB, 8);
    let s = env
        .lib
        .begin_upload("whole", data.len() as u64, &sha(&data))
        .await
        .unwrap();
    let id = s.upload_id;
    // All data durable, but the agent died before verifying: write the files directly.
    env.lib
        .upload_stream(stream_of(&id, 0, &data[..MIB], MIB, false))
        .await
        .unwrap();
    let dir = env.layout.uploads().join(&id);
    std::fs::write(dir.join("data.partial"), &data).unwrap();
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("upload.json")).unwrap()).unwrap();
    meta["verified_offset"] = (data.len() as u64).into();
    std::fs::write(dir.join("upload.json"), serde_json::to_vec(&meta).unwrap()).unwrap();
    env.reopen();
    let s = env.wait_upload(&id).await;
    assert_eq!(s.state, UploadState::Done as i32, "{s:?}");
    assert_eq!(
        std::fs::read(env.lib.path_of(&s.disk_id).unwrap()).unwrap(),
        data
    );
}

/// How far a crash let a verified upload's move into the library get, counted back from the
/// end: the files of a finished upload are rolled back to each of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum CrashBefore {
    /// disk.json written, the upload not yet recorded done.
    DoneRecord,
    /// The data moved into the disk's directory, no disk.json.
    DiskJson,
    /// The disk's directory made, the data still in the upload.
    Move,
    /// Only the intent recorded: no disk directory yet.
    DiskDir,
}

fn edit_json(path: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[tokio::test]
async fn a_verified_upload_becomes_exactly_one_disk_whatever_step_a_crash_stopped() {
    for crash in [
        CrashBefore::DoneRecord,
        CrashBefore::DiskJson,
        CrashBefore::Move,
        CrashBefore::DiskDir,
    ] {
        let mut env = Env::new();
        let data = pattern(3 * MIB, 11);
        let s = env.upload_all("commit", &data, &sha(&data)).await;
        assert_eq!(s.state, UploadState::Done as i32, "{s:?}");
        let (id, disk_id) = (s.upload_id.clone(), s.disk_id.clone());
        let udir = env.layout.uploads().join(&id);
        let ddir = env.layout.disks().join(&disk_id);
        // The record names the disk before anything moves.
        edit_json(&udir.join("upload.json"), |m| {
            assert_eq!(m["disk"]["id"], disk_id.as_str());
            assert_eq!(m["ended"]["disk_id"], disk_id.as_str());
            m.as_object_mut().unwrap().remove("ended");
        });
        if crash >= CrashBefore::DiskJson {
            std::fs::remove_file(ddir.join("disk.json")).unwrap();
        }
        if crash >= CrashBefore::Move {
            std::fs::rename(ddir.join("image.raw"), udir.join("data.partial")).unwrap();
        }
        if crash >= CrashBefore::DiskDir {
            std::fs::remove_dir(&ddir).unwrap();
        }
        for _restart in 0..2 {
            env.reopen();
            let disks = env.lib.list();
            assert_eq!(disks.len(), 1, "{crash:?}: {disks:?}");
            assert_eq!(disks[0].id, disk_id, "{crash:?}");
            assert_eq!(
                std::fs::read(env.lib.path_of(&disk_id).unwrap()).unwrap(),
                data,
                "{crash:?}"
            );
            let s = env.lib.get_upload(&id).unwrap();
            assert_eq!(s.state, UploadState::Done as i32, "{crash:?}: {s:?}");
            assert_eq!(s.disk_id, disk_id, "{crash:?}");
            assert_eq!(env.uploads_left(), Vec::<String>::new(), "{crash:?}");
        }
    }
}

#[tokio::test]
async fn ended_uploads_are_remembered_across_restarts_for_a_week() {
    let mut env = Env::new();
    let data = pattern(MIB, 12);
    let done = env.upload_all("done", &data, &sha(&data)).await;
    assert_eq!(done.state, UploadState::Done as i32, "{done:?}");
    let bad = env.upload_all("bad", &data, &"0".repeat(64)).await;
    assert_eq!(bad.state, UploadState::Failed as i32, "{bad:?}");
    let cancelled = env
        .lib
        .begin_upload("cancelled", data.len() as u64, "")
        .await
        .unwrap();
    env.lib.cancel_upload(&cancelled.upload_id).await.unwrap();
    env.reopen();
    let s = env.lib.get_upload(&done.upload_id).unwrap();
    assert_eq!(
        (s.state, s.disk_id.as_str(), s.name.as_str()),
        (UploadState::Done as i32, done.disk_id.as_str(), "done")
    );
    let s = env.lib.get_upload(&bad.upload_id).unwrap();
    assert_eq!(s.state, UploadState::Failed as i32);
    assert_eq!(s.error, bad.error);
    assert!(s.error.contains("checksum mismatch"), "{}", s.error);
    let s = env.lib.get_upload(&cancelled.upload_id).unwrap();
    assert_eq!(s.state, UploadState::Cancelled as i32);
    // A stream for an ended upload is refused as before the restart.
    let e = env
        .lib
        .upload_stream(stream_of(&done.upload_id, 0, &data, MIB, false))
        .await
        .unwrap_err();
    assert!(matches!(e, AgentError::FailedPrecondition(_)), "{e:?}");
    assert_eq!(env.uploads_left(), Vec::<String>::new());

    // A week later the records go; the disk stays.
    let week = 7 * 24 * 3600 * 1000 + 60_000;
    for id in [&done.upload_id, &bad.upload_id, &cancelled.upload_id] {
        edit_json(&env.layout.uploads().join(id).join("upload.json"), |m| {
            let t = m["ended"]["finished_ms"].as_i64().unwrap();
            m["ended"]["finished_ms"] = (t - week).into();
        });
    }
    env.reopen();
    for id in [&done.upload_id, &bad.upload_id, &cancelled.upload_id] {
        assert!(matches!(
            env.lib.get_upload(id),
            Err(AgentError::NotFound { .. })
        ));
    }
    assert!(env.entries(&env.layout.uploads()).is_empty());
    assert!(env.lib.get(&done.disk_id).is_ok());
}

#[tokio::test]
async fn a_disk_deleted_before_its_upload_was_recorded_done_is_not_brought_back() {
    let mut env = Env::new();
    let data = pattern(MIB, 13);
    let s = env.upload_all("gone", &data, &sha(&data)).await;
    env.lib.delete(&s.disk_id, &[]).await.unwrap();
    edit_json(
        &env.layout.uploads().join(&s.upload_id).join("upload.json"),
        |m| {
            m.as_object_mut().unwrap().remove("ended");
        },
    );
    env.reopen();
    assert!(env.lib.list().is_empty());
    let u = env.lib.get_upload(&s.upload_id).unwrap();
    assert_eq!(u.state, UploadState::Done as i32, "{u:?}");
    assert_eq!(u.disk_id, s.disk_id);
}

#[tokio::test]
async fn checkpoints_advance_during_a_long_stream() {
    let env = Env::new();
    let total = 80 * MIB;
    let data = pattern(total, 9);
    let s = env
        .lib
        .begin_upload("long", total as u64, &sha(&data))
        .await
        .unwrap();
    let id = s.upload_id.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<UploadChunk, Status>>(4);
    let env = Arc::new(env);
    let task = {
        let env = env.clone();
        tokio::spawn(async move {
            env.lib
                .upload_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        })
    };
    for (i, c) in data[..72 * MIB].chunks(4 * MIB).enumerate() {
        tx.send(Ok(UploadChunk {
            upload_id: if i == 0 { id.clone() } else { String::new() },
            offset: 0,
            data: Bytes::copy_from_slice(c),
        }))
        .await
        .unwrap();
    }
    // The checkpoint at 64 MiB becomes visible (and durable) while the stream is open.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = env.lib.get_upload(&id).unwrap().verified_offset;
        if v >= 64 * MIB as u64 {
            assert!(v <= 72 * MIB as u64);
            break;
        }
        assert!(Instant::now() < deadline, "no checkpoint: {v}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(env.layout.uploads().join(&id).join("upload.json")).unwrap(),
    )
    .unwrap();
    assert!(meta["verified_offset"].as_u64().unwrap() >= 64 * MIB as u64);
    for c in data[72 * MIB..].chunks(4 * MIB) {
        tx.send(Ok(UploadChunk {
            upload_id: String::new(),
            offset: 0,
            data: Bytes::copy_from_slice(c),
        }))
        .await
        .unwrap();
    }
    drop(tx);
    let r = task.await.unwrap().unwrap();
    assert_eq!(r.verified_offset, total as u64);
    let s = env.wait_upload(&id).await;
    assert_eq!(s.state, UploadState::Done as i32, "{s:?}");
}

#[tokio::test]
async fn cancelling_a_convert_leaves_nothing() {
    let env = Env::new();
    let src = env
        .lib
        .create(CreateDiskRequest {
            name: "big".into(),
            format: DiskFormat::Raw as i32,
            variant: DiskVariant::Unspecified as i32,
            size: 1 << 30,
            logical_sector_size: 0,
        })
        .await
        .unwrap();
    // Allocate all of it with non-zero data, so the conversion has to copy every byte.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(env.lib.path_of(&src.id).unwrap())
            .unwrap();
        let block = pattern(8 * MIB, 10);
        for i in 0..128u64 {
            f.write_all_at(&block, i * 8 * MIB as u64).unwrap();
        }
    }
    let t = env
        .lib
        .convert(ConvertDiskRequest {
            disk_id: src.id.clone(),
            format: DiskFormat::Vhdx as i32,
            variant: DiskVariant::Fixed as i32,
            name: "copy".into(),
        })
        .unwrap();
    env.tasks.cancel(&t.id).unwrap();
    let t = env.wait_task(&t.id).await;
    assert_eq!(t.state, TaskState::Cancelled as i32, "{t:?}");
    assert!(t.disk_id.is_empty());
    let list = env.lib.list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].id, src.id);
    assert_eq!(env.entries(&env.layout.disks()), vec![src.id.clone()]);

    // The source is free again: it can be deleted.
    env.lib.delete(&src.id, &[]).await.unwrap();
}

#[tokio::test]
async fn create_resize_and_delete() {
    let env = Env::new();
    let mut events = env.events.subscribe();
    let d = env
        .lib
        .create(CreateDiskRequest {
            name: "data".into(),
            format: DiskFormat::Vhdx as i32,
            variant: DiskVariant::Dynamic as i32,
            size: 1 << 30,
            logical_sector_size: 4096,
        })
        .await
        .unwrap();
    assert_eq!(d.logical_sector_size, 4096);
    assert_eq!(d.variant, DiskVariant::Dynamic as i32);
    assert!(matches!(
        events.recv().await.unwrap().kind,
        Some(event::Kind::DiskChanged(x)) if x.id == d.id
    ));
    for bad in [
        CreateDiskRequest {
            name: "x".into(),
            format: DiskFormat::Vhd as i32,
            size: 1 << 20,
            logical_sector_size: 4096,
            ..Default::default()
        },
        CreateDiskRequest {
            name: "x".into(),
            format: DiskFormat::Unspecified as i32,
            size: 1 << 20,
            ..Default::default()
        },
        CreateDiskRequest {
            name: "x".into(),
            format: DiskFormat::Raw as i32,
            variant: DiskVariant::Dynamic as i32,
            size: 1 << 20,
            ..Default::default()
        },
        CreateDiskRequest {
            name: "x".into(),
            format: DiskFormat::Vhd as i32,
            size: 1000,
            ..Default::default()
        },
    ] {
        let e = env.lib.create(bad.clone()).await.unwrap_err();
        assert!(
            matches!(e, AgentError::InvalidArgument { .. }),
            "{bad:?}: {e}"
        );
    }

    // Grow.
    let t = env
        .lib
        .resize(ResizeDiskRequest {
            disk_id: d.id.clone(),
            new_size: 2 << 30,
            allow_shrink: false,
        })
        .unwrap();
    let t = env.wait_task(&t.id).await;
    assert_eq!(t.state, TaskState::Succeeded as i32, "{t:?}");
    assert_eq!(env.lib.get(&d.id).unwrap().virtual_size, 2 << 30);
    // Shrinking needs allow_shrink.
    let e = env
        .lib
        .resize(ResizeDiskRequest {
            disk_id: d.id.clone(),
            new_size: 1 << 30,
            allow_shrink: false,
        })
        .unwrap_err();
    assert!(e.to_string().contains("allow_shrink"), "{e}");

    // A VHD cannot shrink at all.
    let vhd = env
        .lib
        .create(CreateDiskRequest {
            name: "old".into(),
            format: DiskFormat::Vhd as i32,
            variant: DiskVariant::Fixed as i32,
            size: 64 << 20,
            logical_sector_size: 0,
        })
        .await
        .unwrap();
    let e = env
        .lib
        .resize(ResizeDiskRequest {
            disk_id: vhd.id.clone(),
            new_size: 32 << 20,
            allow_shrink: true,
        })
        .unwrap_err();
    assert!(
        e.to_string().contains("shrinking a VHD is not supported"),
        "{e}"
    );
    // A raw disk grows.
    let raw = env
        .lib
        .create(CreateDiskRequest {
            name: "r".into(),
            format: DiskFormat::Raw as i32,
            size: 1 << 20,
            ..Default::default()
        })
        .await
        .unwrap();
    let t = env
        .lib
        .resize(ResizeDiskRequest {
            disk_id: raw.id.clone(),
            new_size: 4 << 20,
            allow_shrink: false,
        })
        .unwrap();
    assert_eq!(
        env.wait_task(&t.id).await.state,
        TaskState::Succeeded as i32
    );
    assert_eq!(env.lib.get(&raw.id).unwrap().virtual_size, 4 << 20);

    // In use: not deleted.
    let e = env
        .lib
        .delete(&d.id, &["aaaaaaaaaaaa".to_string()])
        .await
        .unwrap_err();
    let st = Status::from(e);
    assert_eq!(st.code(), tonic::Code::FailedPrecondition);
    assert_eq!(st.message(), "disk 'data' is used by VM(s) aaaaaaaaaaaa");
    assert!(env.lib.get(&d.id).is_ok());

    while events.try_recv().is_ok() {}
    env.lib.delete(&d.id, &[]).await.unwrap();
    assert!(matches!(
        env.lib.get(&d.id),
        Err(AgentError::NotFound { .. })
    ));
    assert!(!env.layout.disks().join(&d.id).exists());
    let mut deleted = false;
    while let Ok(ev) = events.try_recv() {
        deleted |= matches!(ev.kind, Some(event::Kind::DiskDeleted(ref x)) if *x == d.id);
    }
    assert!(deleted);
    assert!(matches!(
        env.lib.delete(&d.id, &[]).await,
        Err(AgentError::NotFound { .. })
    ));
    assert!(matches!(
        env.lib.get("../etc/passwd"),
        Err(AgentError::NotFound { .. })
    ));
}

/// The gRPC handlers over a whole agent: `attached_to`, delete refusal, task RPCs.
#[tokio::test]
async fn the_service_knows_which_vms_use_a_disk() {
    use agent::service::disk::DiskSvc;
    use proto::v1::disk_service_server::DiskService;
    use proto::v1::{DiskAttachment, DiskBus, DiskRef, ListDisksRequest, TaskRef, VmSpec};
    use tokio_stream::StreamExt;
    use tonic::Request;

    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path().join("state"));
    layout.create().unwrap();
    std::fs::create_dir_all(layout.boot().join("linux")).unwrap();
    std::fs::write(layout.boot().join("linux/kernel"), b"not really").unwrap();
    let events = Arc::new(EventBus::default());
    let tasks = Arc::new(Tasks::new(events.clone()));
    let disks = Arc::new(DiskLibrary::open(&layout, events.clone(), tasks.clone()).unwrap());
    let host = agent::host::HostFacts::gather(dir.path().join("no-such-worker"), layout.boot());
    let vms = agent::vms::Vms::load(layout.clone(), events.clone(), disks.clone(), host.clone())
        .await
        .unwrap();
    let agent = Arc::new(agent::Agent {
        layout,
        events,
        tasks,
        disks,
        vms,
        host,
        stats: Arc::default(),
    });
    let svc = DiskSvc::new(agent.clone());

    let d = svc
        .create_disk(Request::new(CreateDiskRequest {
            name: "root".into(),
            format: DiskFormat::Vhdx as i32,
            size: 256 << 20,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let vm = agent
        .vms
        .create(&VmSpec {
            name: "web".into(),
            cpus: 1,
            memory_bytes: 256 << 20,
            disks: vec![DiskAttachment {
                disk_id: d.id.clone(),
                read_only: false,
                bus: DiskBus::Virtio as i32,
                ..Default::default()
            }],
            boot_image: "linux".into(),
            ..Default::default()
        })
        .unwrap();

    let list = svc
        .list_disks(Request::new(ListDisksRequest {}))
        .await
        .unwrap()
        .into_inner()
        .disks;
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].attached_to, vec![vm.id.clone()]);
    let got = svc
        .get_disk(Request::new(DiskRef {
            disk_id: d.id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.attached_to, vec![vm.id.clone()]);
    assert!(got.check_findings.is_empty(), "{got:?}");

    let st = svc
        .delete_disk(Request::new(DiskRef {
            disk_id: d.id.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::FailedPrecondition);
    assert!(st.message().contains(&vm.id), "{}", st.message());

    // A convert, watched to its end through the task RPCs.
    let t = svc
        .convert_disk(Request::new(ConvertDiskRequest {
            disk_id: d.id.clone(),
            format: DiskFormat::Vhd as i32,
            ..Default::default()
        }))
        .await
        .unwrap()
        .into_inner();
    let mut watch = svc
        .watch_task(Request::new(TaskRef {
            task_id: t.id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(u) = watch.next().await {
        last = Some(u.unwrap());
    }
    let last = last.unwrap();
    assert_eq!(last.state, TaskState::Succeeded as i32, "{last:?}");
    let copy = svc
        .get_disk(Request::new(DiskRef {
            disk_id: last.disk_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(copy.name, "root.vhd");
    assert!(copy.attached_to.is_empty());
    let st = svc
        .cancel_task(Request::new(TaskRef { task_id: t.id }))
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::FailedPrecondition);

    // Unused: deleted.
    svc.delete_disk(Request::new(DiskRef {
        disk_id: copy.id.clone(),
    }))
    .await
    .unwrap();
    let st = svc
        .get_disk(Request::new(DiskRef { disk_id: copy.id }))
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::NotFound);
}
