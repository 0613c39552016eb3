"""Kill a real parvis-agent while it turns acknowledged uploads into disks, as a foreign
client (Python grpcio, stubs from the .proto files, TLS) sees it.

usage: upload_faults.py AGENT_BINARY STATE_DIR ROUNDS SEED [bad-requests]

Each round starts the agent, uploads a fresh image and has every byte and the checksum
acknowledged, then the agent dies: at one of its named fault points (PARVIS_FAULT_POINT, the
steps of verifying and installing an upload), or by kill -9 at a random moment. It is
restarted (some rounds kill it again at a random moment early in the restart, while it
finishes the job) until it stays up. Then every upload made so far must be DONE with its
disk id, each disk must exist exactly once and hold exactly the uploaded bytes, and no upload
data may be left behind. Prints the counts on the last line.

With "bad-requests", bad_requests.check() runs against the first agent too.
"""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import grpc

from parvis.v1 import disk_pb2, disk_pb2_grpc

POINTS = [
    "upload-verified",
    "upload-commit-intent",
    "upload-commit-dir",
    "upload-commit-moved",
    "upload-commit-registered",
    "upload-commit-done",
]


class Agent:
    def __init__(self, binary, state, fault=None, first=False):
        env = dict(os.environ)
        env.pop("PARVIS_FAULT_POINT", None)
        if fault:
            env["PARVIS_FAULT_POINT"] = fault
        self.log = open(os.path.join(state, "..", "agent.log"), "ab")
        self.proc = subprocess.Popen(
            [binary, "--state-dir", state, "--listen", "127.0.0.1:0", "--tls", "--log", "info"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.log, env=env)
        self.addr = None
        self.token = None
        self.lines = []
        got = threading.Event()

        def read():
            for raw in self.proc.stdout:
                line = raw.decode(errors="replace").strip()
                self.lines.append(line)
                if " listening on " in line:
                    self.addr = line.split(" listening on ")[1].split()[0]
                if line.startswith("token: "):
                    self.token = line[len("token: "):].strip()
                # The token is printed at the first start only, after the fingerprint.
                if self.token or (line.startswith("TLS certificate") and not first):
                    got.set()
            got.set()

        threading.Thread(target=read, daemon=True).start()
        if not got.wait(60) or self.addr is None:
            raise SystemExit(f"the agent did not start: {self.lines}")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.log.close()

    def died(self, timeout):
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        self.log.close()
        return True


def connect(state, addr, token):
    with open(os.path.join(state, "secrets", "tls-cert.pem"), "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    channel = grpc.secure_channel(addr, creds, options=[("grpc.ssl_target_name_override", "parvis-agent")])
    return channel, [("authorization", "Bearer " + token)]


def upload(disks, auth, name, data, late):
    """Send every byte and the checksum. Returns the upload id and whether the agent
    acknowledged both; it may die (at its fault point) before its answer is out."""
    digest = hashlib.sha256(data).hexdigest()
    kw = dict(metadata=auth, timeout=60)
    up = disks.BeginUpload(disk_pb2.BeginUploadRequest(name=name, size=len(data), sha256="" if late else digest), **kw)
    cut = random.randrange(1, len(data))
    chunks = [disk_pb2.UploadChunk(upload_id=up.upload_id, data=data[:cut]), disk_pb2.UploadChunk(data=data[cut:])]
    try:
        sent = disks.UploadDisk(iter(chunks), **kw)
        assert sent.verified_offset == len(data), sent
        if late:
            assert sent.state == disk_pb2.UPLOAD_STATE_AWAITING_CHECKSUM, sent
            st = disks.FinishUpload(disk_pb2.FinishUploadRequest(upload_id=up.upload_id, sha256=digest), **kw)
            assert st.state in (disk_pb2.UPLOAD_STATE_VERIFYING, disk_pb2.UPLOAD_STATE_DONE), st
        else:
            assert sent.state in (disk_pb2.UPLOAD_STATE_VERIFYING, disk_pb2.UPLOAD_STATE_DONE), sent
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAVAILABLE, e
        return up.upload_id, False
    return up.upload_id, True


def resume(disks, auth, upload_id, data):
    """What a client does with an upload it was not told is complete (as the CLI does after
    an agent restart): send what the agent lacks, declare the checksum."""
    kw = dict(metadata=auth, timeout=60)
    st = disks.GetUpload(disk_pb2.UploadRef(upload_id=upload_id), **kw)
    if st.state == disk_pb2.UPLOAD_STATE_RECEIVING:
        off = st.verified_offset
        st = disks.UploadDisk(iter([disk_pb2.UploadChunk(upload_id=upload_id, offset=off, data=data[off:])]), **kw)
    if st.state == disk_pb2.UPLOAD_STATE_AWAITING_CHECKSUM:
        disks.FinishUpload(disk_pb2.FinishUploadRequest(
            upload_id=upload_id, sha256=hashlib.sha256(data).hexdigest()), **kw)


def wait_done(disks, auth, upload_id):
    deadline = time.time() + 120
    while True:
        st = disks.GetUpload(disk_pb2.UploadRef(upload_id=upload_id), metadata=auth, timeout=30)
        if st.state != disk_pb2.UPLOAD_STATE_VERIFYING:
            return st
        assert time.time() < deadline, st
        time.sleep(0.02)


def file_sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                return h.hexdigest()
            h.update(b)


def main():
    binary, state, rounds, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    bad = len(sys.argv) > 5 and sys.argv[5] == "bad-requests"
    random.seed(seed)
    os.makedirs(state, exist_ok=True)
    agent = Agent(binary, state, first=True)
    token = agent.token
    assert token, f"no token printed: {agent.lines}"
    if bad:
        import bad_requests
        channel, auth = connect(state, agent.addr, token)
        bad_requests.check(channel, auth)
        channel.close()
    agent.kill()

    made = {}  # upload id -> (name, sha256, size, disk id once known)
    counts = dict(rounds=0, acknowledged=0, unacknowledged=0, fault_point_kills=0,
                  random_kills=0, restart_kills=0, restarts=0, uploads_checked=0,
                  disks_checked=0, losses=0)
    for r in range(rounds):
        fault = POINTS[r % len(POINTS)] if r < rounds * 3 // 4 else None
        agent = Agent(binary, state, fault)
        channel, auth = connect(state, agent.addr, token)
        disks = disk_pb2_grpc.DiskServiceStub(channel)
        size = random.randrange(1, 2048) * 4096
        data = random.randbytes(size)
        name = f"fault-{r}"
        uid, acked = upload(disks, auth, name, data, late=(r % 2 == 1))
        counts["acknowledged" if acked else "unacknowledged"] += 1
        made[uid] = [name, hashlib.sha256(data).hexdigest(), size, None]
        if fault:
            assert agent.died(60), f"round {r}: fault point {fault} was never reached"
            assert agent.proc.returncode == -signal.SIGKILL, (fault, agent.proc.returncode)
            counts["fault_point_kills"] += 1
        else:
            time.sleep(random.uniform(0, 0.3))
            agent.kill()
            counts["random_kills"] += 1
        channel.close()

        # Restart; some rounds kill the agent again while it finishes the job.
        while True:
            agent = Agent(binary, state)
            counts["restarts"] += 1
            if random.random() < 0.3:
                time.sleep(random.uniform(0, 0.1))
                agent.kill()
                counts["restart_kills"] += 1
                continue
            break
        channel, auth = connect(state, agent.addr, token)
        disks = disk_pb2_grpc.DiskServiceStub(channel)
        if not acked:
            resume(disks, auth, uid, data)
        for uid, rec in made.items():
            st = wait_done(disks, auth, uid)
            if st.state != disk_pb2.UPLOAD_STATE_DONE or not st.disk_id:
                counts["losses"] += 1
                raise SystemExit(f"round {r}: upload {uid} ({rec[0]}) ended {st}")
            if rec[3] is None:
                rec[3] = st.disk_id
            assert st.disk_id == rec[3], f"round {r}: upload {uid} now names disk {st.disk_id}, was {rec[3]}"
            counts["uploads_checked"] += 1
        listed = disks.ListDisks(disk_pb2.ListDisksRequest(), metadata=auth, timeout=30).disks
        by_name = {}
        for d in listed:
            by_name.setdefault(d.name, []).append(d)
        for uid, (name, sha, size, disk_id) in made.items():
            got = by_name.get(name, [])
            if len(got) != 1 or got[0].id != disk_id:
                counts["losses"] += 1
                raise SystemExit(f"round {r}: {name} is {len(got)} disks: {got}")
            assert got[0].virtual_size == size, got[0]
            image = os.path.join(state, "disks", disk_id, "image.raw")
            assert file_sha(image) == sha, f"round {r}: {name}'s disk holds other bytes"
            counts["disks_checked"] += 1
        assert len(listed) == len(made), f"round {r}: {len(listed)} disks for {len(made)} uploads"
        # Nothing but the records of ended uploads stays in uploads/.
        for u in os.listdir(os.path.join(state, "uploads")):
            files = sorted(os.listdir(os.path.join(state, "uploads", u)))
            assert files == ["upload.json"], f"round {r}: uploads/{u} holds {files}"
            with open(os.path.join(state, "uploads", u, "upload.json")) as f:
                assert json.load(f)["ended"]["state"] == "done", u
        channel.close()
        agent.kill()
        counts["rounds"] += 1
    print("FAULTS " + " ".join(f"{k}={v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
