"""The authenticated handshake (issue 11 #1, #2, #5), two codecs against each other in memory."""

from __future__ import annotations

import gc
import os
import weakref
from pathlib import Path

import pytest

from replication.messages import Op, ProtocolErrorEvent, Request, Response, Role, Status
from replication.payloads import Hello
from replication.peer_auth import PeerAuth, SecretError, generate_secret, load_secret
from replication.protocol import Connection, State
from tests.unit.test_protocol import raw_frame

SECRET = b"s" * 32
OTHER = b"o" * 32


def pair(client_secret: bytes = SECRET, server_secret: bytes = SECRET
         ) -> tuple[Connection, Connection]:
    client = Connection(Role.CLIENT, auth=PeerAuth(client_secret, "node-a"))
    server = Connection(Role.SERVER, auth=PeerAuth(server_secret, "node-b"))
    return client, server


def hello(client: Connection, server: Connection) -> list[object]:
    """Client HELLO -> server; the server's reply -> client: the client's events."""
    wire = b"".join(client.encode_request(Op.HELLO, 1, payload=b""))
    (request,) = server.receive_data(wire)
    assert isinstance(request, Request) and request.op is Op.HELLO
    reply = b"".join(server.encode_response(Op.HELLO, 1, Status.OK, payload=b""))
    return list(client.receive_data(reply))


def handshake(client: Connection, server: Connection) -> list[object]:
    """The whole handshake; the client's events from the AUTH reply."""
    events = hello(client, server)
    assert [type(e) for e in events] == [Response], events
    (auth,) = server.receive_data(b"".join(client.encode_auth(2)))
    assert isinstance(auth, Request) and auth.op is Op.AUTH
    return list(client.receive_data(b"".join(server.encode_response(Op.AUTH, 2))))


def test_mutual_handshake_binds_both_node_ids() -> None:
    client, server = pair()
    handshake(client, server)
    assert client.state is State.READY and server.state is State.READY
    assert server.peer_node == "node-a" and client.peer_node == "node-b"
    wire = client.send(Request(Op.READ, 3, "vol-1", 1, 0, 4096))
    assert [e.op for e in server.receive_data(wire)] == [Op.READ]  # type: ignore[union-attr]


def test_server_without_the_secret_is_refused_by_the_client() -> None:
    client, server = pair(server_secret=OTHER)
    events = hello(client, server)
    assert isinstance(events[0], ProtocolErrorEvent)
    assert "failed to authenticate" in events[0].reason
    assert client.state is State.CLOSED


def test_client_without_the_secret_gets_nothing() -> None:
    """Issue 11 #1/#2: HELLO as `evil` used to be accepted, and READ/WRITE then worked. An
    attacker that follows the wire format but lacks the secret cannot make a proof."""
    server = Connection(Role.SERVER, auth=PeerAuth(SECRET, "node-b"))
    server.receive_data(raw_frame(Op.HELLO, vid=b"", epoch=0,
                                  payload=Hello("evil", os.urandom(32)).encode()))
    server.encode_response(Op.HELLO, 1, Status.OK, payload=b"")
    events = server.receive_data(raw_frame(Op.AUTH, rid=2, vid=b"", epoch=0,
                                           payload=os.urandom(32)))
    assert isinstance(events[0], ProtocolErrorEvent)
    assert events[0].reply  # an AUTH_FAILED reply, then the connection is closed
    assert server.state is State.CLOSED and server.peer_node is None
    assert server.receive_data(raw_frame(Op.READ, rid=3, length=4096)) == []


def test_anonymous_hello_is_refused() -> None:
    server = Connection(Role.SERVER, auth=PeerAuth(SECRET, "node-b"))
    events = server.receive_data(raw_frame(Op.HELLO, vid=b"", epoch=0,
                                           payload=Hello("evil").encode()))
    assert isinstance(events[0], ProtocolErrorEvent)
    assert "authentication required" in events[0].reason
    assert server.state is State.CLOSED


def test_a_recorded_auth_does_not_replay() -> None:
    client, server = pair()
    hello(client, server)
    recorded = b"".join(client.encode_auth(2))
    attacker_view = Connection(Role.SERVER, auth=PeerAuth(SECRET, "node-b"))
    # A fresh connection: the attacker replays the same HELLO, then the recorded AUTH.
    replay_hello = raw_frame(Op.HELLO, vid=b"", epoch=0,
                             payload=Hello("node-a", client._handshake.nonces[0]).encode())
    attacker_view.receive_data(replay_hello)
    attacker_view.encode_response(Op.HELLO, 1, Status.OK, payload=b"")  # a new server nonce
    events = attacker_view.receive_data(recorded)
    assert isinstance(events[0], ProtocolErrorEvent)
    assert attacker_view.state is State.CLOSED


def test_data_before_auth_is_a_protocol_error() -> None:
    client, server = pair()
    hello(client, server)
    assert server.state is State.AUTHENTICATING
    events = server.receive_data(raw_frame(Op.READ, rid=5, length=4096))
    assert isinstance(events[0], ProtocolErrorEvent)
    assert "not allowed in state authenticating" in events[0].reason


def test_a_stranger_costs_a_few_kib() -> None:
    """Issue 11 #5: a 50-byte header announcing 32 MiB made the server allocate 32 MiB."""
    server = Connection(Role.SERVER, auth=PeerAuth(SECRET, "node-b"))
    assert len(server.get_buffer()) <= 4096
    header = raw_frame(Op.HELLO, vid=b"", epoch=0, payload=b"x" * 600)[:50]
    view = server.get_buffer()
    view[:len(header)] = header
    events = server.buffer_updated(len(header))
    assert isinstance(events[0], ProtocolErrorEvent)
    assert "before the handshake" in events[0].reason


def test_a_closed_connection_frees_its_buffers_without_the_gc() -> None:
    """Issue 11 #5: a bound method stored on the connection made it a cycle; 50 closed
    connections held 1.7 GiB until the cyclic collector ran."""
    gc.disable()
    try:
        conn = Connection(Role.SERVER)
        conn.get_buffer(1 << 20)
        ref = weakref.ref(conn)
        conn.close()
        del conn
        assert ref() is None
    finally:
        gc.enable()


def test_secret_file_rules(tmp_path: Path) -> None:
    good = tmp_path / "secret"
    good.write_bytes(os.urandom(16).hex().encode() * 2)
    good.chmod(0o600)
    assert [len(k) for k in load_secret(good)] == [64]
    good.chmod(0o644)
    with pytest.raises(SecretError, match="group or others"):
        load_secret(good)
    short = tmp_path / "short"
    short.write_bytes(b"tiny")
    short.chmod(0o600)
    with pytest.raises(SecretError, match="at least 32"):
        load_secret(short)
    with pytest.raises(SecretError):
        load_secret(tmp_path / "missing")


def test_rotation_old_and_new_secrets_understand_each_other() -> None:
    """Rotation without downtime, in its three steps (docs/security.md): the new secret
    added second, then moved first, then the old one dropped; nodes one step apart accept
    each other both ways. A node still holding only the old one is refused at the end."""
    old, new = b"o" * 32, b"n" * 32
    steps = [[old], [old, new], [new, old], [new]]
    pairs = [(a, b) for i in range(3) for a, b in [(steps[i], steps[i + 1]),
                                                     (steps[i + 1], steps[i])]]
    for a, b in pairs:
        client = Connection(Role.CLIENT, auth=PeerAuth(a, "node-a"))
        server = Connection(Role.SERVER, auth=PeerAuth(b, "node-b"))
        handshake(client, server)
        assert client.state is State.READY and server.state is State.READY
    client = Connection(Role.CLIENT, auth=PeerAuth([old], "node-a"))
    server = Connection(Role.SERVER, auth=PeerAuth([new], "node-b"))
    events = hello(client, server)
    assert isinstance(events[0], ProtocolErrorEvent)


def test_secret_file_holds_one_secret_per_line(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"\n".join([generate_secret(), generate_secret(), b""]))
    path.chmod(0o600)
    first, second = load_secret(path)
    assert first != second and len(first) == 96
    path.write_bytes(b"\n\n")
    with pytest.raises(SecretError, match="empty"):
        load_secret(path)
