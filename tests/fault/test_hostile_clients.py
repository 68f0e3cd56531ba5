"""A stranger on the node network (issue 11): every probe that worked on 7f5cc85, run
from the host namespace against a real 3-node cluster with only the documented wire format.

1. anonymous HELLO + READ of a tenant's data     -> a closed connection, nothing read
2. anonymous WRITE at the fenced epoch            -> same; a peer with a wrong secret too
3. FENCE at 2^64-1 (or any epoch etcd never issued) -> refused; the owner keeps writing
4. the agent API (ListReplicas, DeleteReplica)   -> UNAUTHENTICATED without the controller's
   signature; a signed DeleteReplica of a replica the record needs -> FAILED_PRECONDITION
5. 200 connections announcing 32 MiB payloads      -> the node's RSS barely moves
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
import zlib
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from csi_driver._gen import agent_pb2, agent_pb2_grpc
from csi_driver.agent_auth import METADATA_KEY, AgentSigner, load_signer
from devtools.devcluster import NodeSpec
from devtools.devcluster.cluster import agent_key_paths
from replication.errors import ReplicaUnavailableError
from replication.frames import MAGIC
from replication.messages import PROTOCOL_VERSION, Event, Op, Request, Response, Role, Status
from replication.payloads import Hello
from replication.peer_auth import PeerAuth
from replication.protocol import Connection
from replication.replica_client import ReplicaClient
from replication.replica_connection import expect_ok
from tests.credentials import cluster_auth
from tests.direct_io import direct_read, direct_write
from tests.fault.conftest import Fault

pytestmark = pytest.mark.integration
MIB = 1 << 20


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _anonymous_exchange(node: NodeSpec, volume_id: str) -> tuple[list[Event], bytes]:
    """HELLO with no proof, then READ: what comes back, and whatever bytes follow."""
    client = Connection(Role.CLIENT)
    with socket.create_connection(_host_port(node.replica_address), timeout=5) as sock:
        sock.sendall(client.send(Request(Op.HELLO, 1, payload=Hello("evil").encode())))
        events = list(client.receive_data(sock.recv(65536)))
        try:  # a READ as if the HELLO had worked: the server has closed the connection
            sock.sendall(_read_frame(volume_id))
            rest = sock.recv(65536)
        except OSError:
            rest = b""
    return events, rest


def test_anonymous_peers_read_and_write_nothing(fault: Fault) -> None:
    vid, placed = fault.create(replicas=3)
    owner, other = placed[0], fault.spec.node(placed[1])
    device = fault.stage_publish(owner, vid)
    secret_data = os.urandom(MIB)
    direct_write(device, 0, secret_data)
    events, rest = _anonymous_exchange(other, vid)
    assert len(events) == 1 and isinstance(events[0], Response), events
    assert events[0].status is Status.AUTH_FAILED and rest == b""

    async def probes() -> None:
        host, port = _host_port(other.replica_address)
        # A wrong secret: the server cannot prove itself to us either, so we never send a
        # proof of our own (nothing to replay elsewhere).
        with pytest.raises(ReplicaUnavailableError, match="failed to authenticate"):
            await ReplicaClient.connect(host, port, PeerAuth(os.urandom(32), placed[2]))
        # The cluster secret but no replica of the volume: no data operation.
        stranger = await ReplicaClient.connect(host, port, cluster_auth(fault.dir, "node-x"))
        try:
            stat = expect_ok(await stranger.stat(vid, 0))  # an observer may look
            epoch = stat.epoch
            refused = await stranger.write(vid, epoch, 0, b"\0" * 4096)
            assert refused.status is Status.AUTH_FAILED, refused
            assert b"neither a replica nor the owner" in bytes(refused.payload)
        finally:
            stranger.close()

    asyncio.run(probes())
    # A HELLO reply (with the server's proof), AUTH_FAILED for a guessed proof, then EOF.
    assert _guessed_proof(other) == [(Op.HELLO, Status.OK), (Op.AUTH, Status.AUTH_FAILED)]
    assert direct_read(device, 0, MIB) == secret_data, "a stranger's write reached the volume"
    assert fault.verify(vid).identical


def test_a_fence_etcd_never_issued_is_refused(fault: Fault) -> None:
    """Probe 3: FENCE at 2^64-1 used to make the owner self-fence and the volume
    unstageable forever. Now the codec refuses any epoch beyond what etcd could issue, and
    a replica raises its fence only to the volume's current epoch in etcd."""
    vid, placed = fault.create(replicas=3)
    owner = placed[0]
    device = fault.stage_publish(owner, vid)
    epoch = fault.record(vid).epoch
    replica = fault.spec.node(placed[1])
    host, port = _host_port(replica.replica_address)

    async def probes() -> None:
        peer = await ReplicaClient.connect(host, port, cluster_auth(fault.dir, placed[2]))
        try:
            for bogus in (epoch + 1, epoch + 1000, (1 << 48) - 1):
                refused = await peer.fence(vid, bogus)
                assert refused.status is Status.AUTH_FAILED, (bogus, refused)
                assert b"only an epoch etcd issued" in bytes(refused.payload)
            with pytest.raises(Exception):  # noqa: B017 - a protocol error closes the link
                await peer.fence(vid, (1 << 64) - 1)
        finally:
            peer.close()

    asyncio.run(probes())
    assert fault.record(vid).epoch == epoch
    direct_write(device, 8192, b"k" * 4096)  # the owner was not fenced out by any of that
    assert fault.verify(vid).identical


def _agent(node: NodeSpec) -> tuple[grpc.Channel, agent_pb2_grpc.AgentStub]:
    channel = grpc.insecure_channel(node.agent_address)
    return channel, agent_pb2_grpc.AgentStub(channel)


def test_the_agent_api_answers_only_the_controller(fault: Fault) -> None:
    """Probe 4: ListReplicas and DeleteReplica answered anyone; DeleteReplica deleted the
    replica of a volume in use. Now a call needs the controller's signature, and even a
    signed DeleteReplica refuses a replica the volume record still names."""
    vid, placed = fault.create(replicas=2)
    node = fault.spec.node(placed[1])
    image = Path(node.pool.dir) / f"{vid}.img"
    assert image.exists()
    channel, stub = _agent(node)
    try:
        delete = agent_pb2.DeleteReplicaRequest(volume_id=vid)
        for metadata in ((), ((METADATA_KEY, "A" * 120),)):
            with pytest.raises(grpc.RpcError) as caught:
                stub.ListReplicas(agent_pb2.ListReplicasRequest(), metadata=metadata, timeout=5)
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as caught:
                stub.DeleteReplica(delete, metadata=metadata, timeout=5)
            assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        forged = AgentSigner(Ed25519PrivateKey.generate())  # a key that is not the cluster's
        token = forged.token("DeleteReplica", node.agent_address, delete)
        with pytest.raises(grpc.RpcError) as caught:
            stub.DeleteReplica(delete, metadata=((METADATA_KEY, token),), timeout=5)
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        real = load_signer(agent_key_paths(fault.dir)[0])
        token = real.token("DeleteReplica", node.agent_address, delete)
        with pytest.raises(grpc.RpcError) as caught:
            stub.DeleteReplica(delete, metadata=((METADATA_KEY, token),), timeout=5)
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as caught:  # the same signed call, replayed
            stub.DeleteReplica(delete, metadata=((METADATA_KEY, token),), timeout=5)
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED
        listing = stub.ListReplicas(agent_pb2.ListReplicasRequest(), metadata=(
            (METADATA_KEY, real.token("ListReplicas", node.agent_address,
                                      agent_pb2.ListReplicasRequest())),), timeout=5)
        assert vid in {r.volume_id for r in listing.replicas}
    finally:
        channel.close()
    assert image.exists(), "the agent deleted a replica the volume still needs"


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


_BODY = struct.Struct(">BBHQQQIIIBB")  # the header after magic and crc


def _frame(op: Op, rid: int, *, length: int = 0, vid: bytes = b"", payload: bytes = b"",
           plen: int | None = None) -> bytes:
    """A frame as the wire format documents it (replication/frames.py); ``plen`` may
    announce a payload that never comes."""
    pcrc = zlib.crc32(payload) if payload else 0
    body = _BODY.pack(PROTOCOL_VERSION, op, 0, rid, 0, 0, length,
                       len(payload) if plen is None else plen, pcrc, 0, len(vid)) + vid
    return MAGIC + struct.pack(">I", zlib.crc32(body)) + body + payload


def _read_frame(volume_id: str) -> bytes:
    return _frame(Op.READ, 2, length=4096, vid=volume_id.encode())


def _huge_header() -> bytes:
    """A HELLO header announcing a 32 MiB payload (the payload never comes)."""
    return _frame(Op.HELLO, 1, plen=32 * MIB)


def _replies(data: bytes) -> list[tuple[int, int]]:
    """(op, status) of each reply frame in ``data``."""
    out, pos = [], 0
    while pos + 8 + _BODY.size <= len(data):
        fields = _BODY.unpack_from(data, pos + 8)
        out.append((fields[1], fields[9]))
        pos += 8 + _BODY.size + fields[10] + fields[7]
    return out


def _guessed_proof(node: NodeSpec) -> list[tuple[int, int]]:
    """HELLO with a nonce as a real client would, then AUTH with a proof made without the
    secret: the replies, up to the server closing the connection."""
    with socket.create_connection(_host_port(node.replica_address), timeout=5) as sock:
        sock.sendall(_frame(Op.HELLO, 1, payload=Hello("evil", os.urandom(32)).encode()))
        received = sock.recv(65536)
        sock.sendall(_frame(Op.AUTH, 2, payload=os.urandom(32)))
        while chunk := sock.recv(65536):
            received += chunk
        return _replies(received)


def test_strangers_cost_the_node_almost_no_memory(fault: Fault) -> None:
    """Probe 5: 200 connections each announcing a 32 MiB HELLO took a node from 66 MiB to
    6.5 GiB and lapsed its lease. Now a stranger's frame may carry a few hundred bytes,
    unauthenticated connections per source are capped, and they are closed after the
    handshake timeout."""
    node = fault.spec.nodes[0]
    before = _rss(node.pid)
    socks: list[socket.socket] = []
    refused = 0
    try:
        for _ in range(200):
            try:
                s = socket.create_connection(_host_port(node.replica_address), timeout=2)
                s.sendall(_huge_header() + b"\0" * 4096)
                socks.append(s)
            except OSError:
                refused += 1
        time.sleep(1.0)  # let the node read all of it
        grown = _rss(node.pid) - before
    finally:
        for s in socks:
            s.close()
    print(f"node RSS before {before >> 20} MiB, grown by {grown / MIB:.1f} MiB; "
          f"{refused} of 200 connections refused at connect")
    assert grown < 16 * MIB, f"200 hostile connections grew the node by {grown >> 20} MiB"
    # Silent strangers: at most 16 per source stay open, each for the handshake timeout.
    silent: list[socket.socket] = []
    try:
        for _ in range(40):
            silent.append(socket.create_connection(_host_port(node.replica_address), timeout=15))
        time.sleep(0.5)
        cut = 0
        for s in silent:
            s.setblocking(False)
            try:
                cut += s.recv(1) == b""
            except BlockingIOError:
                pass  # still open
            except ConnectionResetError:
                cut += 1
        assert cut >= 40 - 16, f"only {cut} of 40 silent connections were refused"
        start = time.monotonic()
        kept = silent[0]
        kept.setblocking(True)
        assert kept.recv(1) == b""  # closed by the node: no handshake in time
        assert time.monotonic() - start < 12
    finally:
        for s in silent:
            s.close()
    assert "too many unauthenticated connections" in Path(node.log).read_text()
    assert node.id in {n.id for n in fault.spec.nodes}
    fault.wait_all_registered()  # its lease never lapsed
