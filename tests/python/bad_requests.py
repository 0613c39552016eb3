"""Bad requests from a foreign client: status codes and message sizes as grpcio sees them.

Used by client.py (against the agent in the test host) and by agent/tests/foreign_client.rs
(against an agent on this machine): check(channel, auth).
"""

import grpc

from parvis.v1 import (
    common_pb2,
    console_pb2,
    console_pb2_grpc,
    disk_pb2,
    disk_pb2_grpc,
    vm_pb2,
    vm_pb2_grpc,
)

# A status message quotes at most a short piece of the request: far below grpcio's 16 KiB
# metadata limit, which a message quoting a whole huge id would exceed (the client would
# then see RESOURCE_EXHAUSTED from its own library instead of the agent's answer).
MAX_DETAILS = 1024


def expect(what, call, codes):
    try:
        got = call()
        if hasattr(got, "__iter__") and not isinstance(got, (bytes, str)):
            for _ in got:
                pass
    except grpc.RpcError as e:
        details = e.details() or ""
        assert e.code() in codes, f"{what}: {e.code()} {details[:200]!r}, wanted one of {codes}"
        assert len(details.encode()) <= MAX_DETAILS, f"{what}: {len(details)}-byte details"
        return e
    raise AssertionError(f"{what}: succeeded, wanted one of {codes}")


def check(channel, auth):
    vms = vm_pb2_grpc.VmServiceStub(channel)
    disks = disk_pb2_grpc.DiskServiceStub(channel)
    console = console_pb2_grpc.ConsoleServiceStub(channel)
    nf = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)
    kw = dict(metadata=auth, timeout=60)

    # 3 MiB ids fit every service's request limit (4 MiB at least); 10 MiB ones the disk and
    # console services' (64 MiB).
    for size in (3 << 20, 10 << 20):
        huge = "x" * size
        if size < (4 << 20):
            expect("GetVm", lambda: vms.GetVm(vm_pb2.VmRef(vm_id=huge), **kw), nf)
            expect("DeleteVm", lambda: vms.DeleteVm(vm_pb2.VmRef(vm_id=huge), **kw), nf)
            expect("StartVm", lambda: vms.StartVm(vm_pb2.VmRef(vm_id=huge), **kw), nf)
            expect("StopVm", lambda: vms.StopVm(vm_pb2.VmRef(vm_id=huge), **kw), nf)
            spec = vm_pb2.VmSpec(name="huge-disk", cpus=1, memory_bytes=128 << 20,
                                 disks=[vm_pb2.DiskAttachment(disk_id=huge)])
            e = expect("CreateVm disk", lambda: vms.CreateVm(vm_pb2.CreateVmRequest(spec=spec), **kw), nf)
            assert "spec.disks[0]" in e.details(), e.details()[:200]
            spec = vm_pb2.VmSpec(name="huge-boot", cpus=1, memory_bytes=128 << 20, boot_image=huge)
            expect("CreateVm boot image", lambda: vms.CreateVm(vm_pb2.CreateVmRequest(spec=spec), **kw), nf)
        expect("GetDisk", lambda: disks.GetDisk(disk_pb2.DiskRef(disk_id=huge), **kw), nf)
        expect("DeleteDisk", lambda: disks.DeleteDisk(disk_pb2.DiskRef(disk_id=huge), **kw), nf)
        expect("GetUpload", lambda: disks.GetUpload(disk_pb2.UploadRef(upload_id=huge), **kw), nf)
        expect("CancelUpload", lambda: disks.CancelUpload(disk_pb2.UploadRef(upload_id=huge), **kw), nf)
        expect("FinishUpload", lambda: disks.FinishUpload(
            disk_pb2.FinishUploadRequest(upload_id=huge, sha256="0" * 64), **kw), nf)
        expect("GetTask", lambda: disks.GetTask(common_pb2.TaskRef(task_id=huge), **kw), nf)
        expect("WatchTask", lambda: disks.WatchTask(common_pb2.TaskRef(task_id=huge), **kw), nf)
        expect("StreamFramebuffer", lambda: console.StreamFramebuffer(
            console_pb2.FramebufferRequest(vm_id=huge), **kw), nf)
        expect("SerialConsole", lambda: console.SerialConsole(
            iter([console_pb2.SerialInput(vm_id=huge)]), **kw), nf)
        expect("SendInput", lambda: console.SendInput(
            iter([console_pb2.InputEvent(vm_id=huge, key=console_pb2.KeyEvent(scancode=0x1e, pressed=True))]),
            **kw), nf)
        expect("UploadDisk", lambda: disks.UploadDisk(
            iter([disk_pb2.UploadChunk(upload_id=huge, data=b"\0" * 512)]), **kw), nf)

    # UploadDisk streams the agent cannot use: the same stream sent again would fail the same
    # way, so none of these may be UNAVAILABLE (which clients retry).
    raw = channel.stream_unary(
        "/parvis.v1.DiskService/UploadDisk",
        request_serializer=lambda b: b,
        response_deserializer=disk_pb2.UploadStatus.FromString,
    )
    # Field 1 (upload_id) with a length running past the end of the message.
    expect("UploadDisk malformed", lambda: raw(iter([b"\x0a\x7f\x61\x62"]), **kw),
           (grpc.StatusCode.INVALID_ARGUMENT,))
    # A field number 0, which protobuf forbids.
    expect("UploadDisk field 0", lambda: raw(iter([b"\x00\x01"]), **kw),
           (grpc.StatusCode.INVALID_ARGUMENT,))
    # One message over the agent's 64 MiB limit.
    big = disk_pb2.UploadChunk(upload_id="0" * 12, data=b"\0" * ((64 << 20) + 4096)).SerializeToString()
    expect("UploadDisk too large", lambda: raw(iter([big]), **kw),
           (grpc.StatusCode.RESOURCE_EXHAUSTED,))
    del big
    # Compressed messages.
    expect("UploadDisk compressed", lambda: disks.UploadDisk(
        iter([disk_pb2.UploadChunk(upload_id="0" * 12, data=b"\0" * 65536)]),
        compression=grpc.Compression.Gzip, **kw), (grpc.StatusCode.UNIMPLEMENTED,))
    print("BAD-REQUESTS-OK")
