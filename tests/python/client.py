"""A foreign client of the Parvis API: Python grpcio with stubs generated from the .proto
files alone (tests/tests/agent.rs generates them and runs this).

usage: client.py HOST:PORT TOKEN CERT.pem
"""

import hashlib
import sys
import time

import grpc

from parvis.v1 import disk_pb2, disk_pb2_grpc, host_pb2, host_pb2_grpc, vm_pb2, vm_pb2_grpc


def main():
    addr, token, cert = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(cert, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    # The agent's self-signed certificate names itself parvis-agent.
    options = [("grpc.ssl_target_name_override", "parvis-agent")]
    channel = grpc.secure_channel(addr, creds, options=options)
    auth = [("authorization", "Bearer " + token)]

    host = host_pb2_grpc.HostServiceStub(channel)
    info = host.GetHostInfo(host_pb2.GetHostInfoRequest(), metadata=auth, timeout=30)
    assert info.api_version == "parvis.v1", info
    assert info.kvm.usable, info.kvm.reason
    print("host", info.hostname, "cpus", info.logical_cpus)

    try:
        host.GetHostInfo(host_pb2.GetHostInfoRequest(), metadata=[("authorization", "Bearer nope")], timeout=30)
        raise SystemExit("a wrong token was accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e

    vms = vm_pb2_grpc.VmServiceStub(channel)
    try:
        vms.CreateVm(vm_pb2.CreateVmRequest(spec=vm_pb2.VmSpec(name="py", cpus=0, memory_bytes=256 << 20)), metadata=auth, timeout=30)
        raise SystemExit("0 CPUs was accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
        assert "spec.cpus" in e.details(), e.details()

    spec = vm_pb2.VmSpec(name="py-made", cpus=1, memory_bytes=128 << 20, boot_image="default")
    vm = vms.CreateVm(vm_pb2.CreateVmRequest(spec=spec), metadata=auth, timeout=30)
    assert vm.state == vm_pb2.VM_STATE_OFF, vm
    listed = vms.ListVms(vm_pb2.ListVmsRequest(), metadata=auth, timeout=30)
    assert any(v.id == vm.id and v.spec.name == "py-made" for v in listed.vms), listed
    vms.DeleteVm(vm_pb2.VmRef(vm_id=vm.id), metadata=auth, timeout=30)
    # An unknown id is NOT_FOUND with a short message, however long the id (the whole set of
    # bad requests runs against a local agent in agent/tests/foreign_client.rs).
    try:
        vms.GetVm(vm_pb2.VmRef(vm_id="y" * (100 << 10)), metadata=auth, timeout=30)
        raise SystemExit("a 100 KiB id was found")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND, e
        assert len(e.details()) < 1024, len(e.details())
    try:
        vms.GetVm(vm_pb2.VmRef(vm_id=vm.id), metadata=auth, timeout=30)
        raise SystemExit("a deleted VM is still there")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND, e

    # An upload as grpcio frames it: the agent decodes UploadDisk streams itself.
    disks = disk_pb2_grpc.DiskServiceStub(channel)
    data = bytes((i * 7) % 251 for i in range(2 << 20))
    up = disks.BeginUpload(disk_pb2.BeginUploadRequest(name="py.img", size=len(data), sha256=hashlib.sha256(data).hexdigest()), metadata=auth, timeout=30)
    pieces = [(0, 333_333), (333_333, 1_500_000), (1_500_000, len(data))]
    chunks = (disk_pb2.UploadChunk(upload_id=up.upload_id if a == 0 else "", data=data[a:b]) for a, b in pieces)
    sent = disks.UploadDisk(chunks, metadata=auth, timeout=60)
    assert sent.verified_offset == len(data), sent
    for _ in range(600):
        st = disks.GetUpload(disk_pb2.UploadRef(upload_id=up.upload_id), metadata=auth, timeout=30)
        if st.state != disk_pb2.UPLOAD_STATE_VERIFYING:
            break
        time.sleep(0.05)
    assert st.state == disk_pb2.UPLOAD_STATE_DONE, st
    disk = disks.GetDisk(disk_pb2.DiskRef(disk_id=st.disk_id), metadata=auth, timeout=30)
    assert disk.virtual_size == len(data), disk
    disks.DeleteDisk(disk_pb2.DiskRef(disk_id=st.disk_id), metadata=auth, timeout=30)

    # The checksum declared after the data, as a client hashing while it sends does.
    late = disks.BeginUpload(disk_pb2.BeginUploadRequest(name="py-late.img", size=len(data)), metadata=auth, timeout=30)
    chunks = (disk_pb2.UploadChunk(upload_id=late.upload_id if a == 0 else "", data=data[a:b]) for a, b in pieces)
    sent = disks.UploadDisk(chunks, metadata=auth, timeout=60)
    assert sent.state == disk_pb2.UPLOAD_STATE_AWAITING_CHECKSUM, sent
    try:
        disks.FinishUpload(disk_pb2.FinishUploadRequest(upload_id=late.upload_id, sha256="00"), metadata=auth, timeout=30)
        raise SystemExit("a malformed checksum was taken")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
    st = disks.FinishUpload(disk_pb2.FinishUploadRequest(upload_id=late.upload_id, sha256=hashlib.sha256(data).hexdigest()), metadata=auth, timeout=30)
    for _ in range(600):
        if st.state != disk_pb2.UPLOAD_STATE_VERIFYING:
            break
        time.sleep(0.05)
        st = disks.GetUpload(disk_pb2.UploadRef(upload_id=late.upload_id), metadata=auth, timeout=30)
    assert st.state == disk_pb2.UPLOAD_STATE_DONE, st
    disks.DeleteDisk(disk_pb2.DiskRef(disk_id=st.disk_id), metadata=auth, timeout=30)
    print("PYTHON-CLIENT-OK")


if __name__ == "__main__":
    main()
