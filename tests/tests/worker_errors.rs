//! A worker failing on purpose reaches a client as a typed status: the worker protocol's
//! error code decides the gRPC code, and no host path or OS error text gets through. The
//! worker is the tests' `fake-worker`, told to fail (`PARVIS_FAKE_WORKER_FAIL`), behind a
//! real `parvis-agent` on loopback with TLS.

use proto::client;
use proto::v1::{
    CreateVmRequest, FramebufferRequest, InputEvent, KeyEvent, TileEncoding, VmRef, VmSpec,
    input_event,
};
use tonic::Code;

#[test]
fn a_failing_worker_reaches_the_client_as_a_typed_status_without_host_details() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    parvis_tests::agent_proc::placeholder_boot_image(&state).unwrap();
    let worker = env!("CARGO_BIN_EXE_fake-worker");
    let (mut agent, target) = parvis_tests::agent_proc::spawn_agent_env(
        &state,
        &["--worker", worker],
        Some(&dir.path().join("agent.log")),
        &[("PARVIS_FAKE_WORKER_FAIL", "framebuffer")],
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let result = rt.block_on(async {
        let mut c = client::connect(&target).await.unwrap();
        let vm =
            c.vm.create_vm(CreateVmRequest {
                spec: Some(VmSpec {
                    name: "failing".into(),
                    cpus: 1,
                    memory_bytes: 64 << 20,
                    boot_image: "default".into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner();
        c.vm.start_vm(VmRef {
            vm_id: vm.id.clone(),
        })
        .await
        .unwrap();
        // The worker's framebuffer request fails with an internal error whose words name a
        // host path and an OS error.
        let s = match c
            .console
            .stream_framebuffer(FramebufferRequest {
                vm_id: vm.id.clone(),
                encoding: TileEncoding::Lz4 as i32,
            })
            .await
        {
            Ok(mut stream) => stream.get_mut().message().await.unwrap_err(),
            Err(s) => s,
        };
        assert_eq!(s.code(), Code::Internal, "{s:?}");
        for leak in ["/var/lib", "os error", "Permission denied", "guest-memory"] {
            assert!(!s.message().contains(leak), "{leak} in {:?}", s.message());
        }
        // A worker without input devices: its words are fit to show, its code says why.
        let s = c
            .console
            .send_input(tokio_stream::iter(vec![InputEvent {
                vm_id: vm.id.clone(),
                kind: Some(input_event::Kind::Key(KeyEvent {
                    scancode: 0x1e,
                    pressed: true,
                })),
            }]))
            .await
            .unwrap_err();
        assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
        assert!(s.message().contains("no input device"), "{}", s.message());
        c.vm.stop_vm(VmRef { vm_id: vm.id }).await.map(drop)
    });
    let _ = agent.kill();
    let _ = agent.wait();
    result.unwrap();
}
