"""A foreign client of the Parvis API: Python grpcio with stubs generated from the .proto
files alone (tests/tests/agent.rs generates them and runs this).

usage: client.py HOST:PORT TOKEN CERT.pem
"""

import sys

import grpc

from parvis.v1 import host_pb2, host_pb2_grpc, vm_pb2, vm_pb2_grpc


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
    try:
        vms.GetVm(vm_pb2.VmRef(vm_id=vm.id), metadata=auth, timeout=30)
        raise SystemExit("a deleted VM is still there")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND, e
    print("PYTHON-CLIENT-OK")


if __name__ == "__main__":
    main()
