"""Fuzz targets: tandem's sans-IO protocol code fed arbitrary bytes (issue 11).

Each target takes one input and must either consume it or report a protocol error as an
event; anything else raised is a bug. They run under atheris (``fuzz/run.py``, coverage-
guided, corpus in ``fuzz/corpus/<target>/``) and, without atheris, over the kept corpus in
``make test`` (``tests/unit/test_fuzz_corpus.py``).

- ``replication_server``: a replica server's codec with peer authentication, fed a peer's
  byte stream (split where the input's first byte says): strangers, half handshakes, frames.
- ``replication_client``: a client codec that sent HELLO, fed a server's answer.
- ``handshake``: two honest codecs; the input picks where a man in the middle flips or cuts
  bytes of the exchange: nothing may authenticate that was tampered with.
- ``nbd_server``: the NBD server protocol (handshake and transmission), fed a client's bytes.
"""

from __future__ import annotations

from collections.abc import Callable

from replication import nbd_codec, nbd_messages
from replication.messages import Op, ProtocolErrorEvent, Request, Response, Role, Status
from replication.peer_auth import PeerAuth
from replication.protocol import Connection, State

SECRET = b"f" * 32


def _auth(node: str) -> PeerAuth:
    counter = iter(range(1 << 30))
    # Deterministic nonces: a replayed input behaves the same every time.
    return PeerAuth(SECRET, node, random=lambda n: next(counter).to_bytes(n, "big"))


def _chunks(data: bytes) -> list[bytes]:
    """The input split into receive calls: the first byte picks the chunk size."""
    if not data:
        return []
    step = data[0] % 61 + 1
    body = data[1:]
    return [body[i:i + step] for i in range(0, len(body), step)]


def replication_server(data: bytes) -> None:
    conn = Connection(Role.SERVER, auth=_auth("node-b"), max_payload=1 << 20)
    for chunk in _chunks(data):
        for ev in conn.receive_data(chunk):
            if isinstance(ev, ProtocolErrorEvent):
                assert conn.state is State.CLOSED
                return
            assert isinstance(ev, Request), ev
            if ev.op is not Op.HELLO and ev.op is not Op.AUTH:
                # Only an authenticated peer's requests get this far.
                assert conn.state is State.READY and conn.peer_node is not None
            ok = ev.op is Op.HELLO or ev.op is Op.AUTH
            conn.encode_response(ev.op, ev.request_id, Status.OK if ok else Status.EIO)
    assert len(conn._reader.partial) <= (1 << 20) + 4096


def replication_client(data: bytes) -> None:
    conn = Connection(Role.CLIENT, auth=_auth("node-a"))
    conn.encode_request(Op.HELLO, 1)
    for chunk in _chunks(data):
        for ev in conn.receive_data(chunk):
            if isinstance(ev, ProtocolErrorEvent):
                return
            assert isinstance(ev, Response), ev
            # A server answer without the secret's proof never makes the client ready.
            assert conn.state is not State.READY


def handshake(data: bytes) -> None:
    client, server = Connection(Role.CLIENT, auth=_auth("node-a")), Connection(
        Role.SERVER, auth=_auth("node-b"))
    tamper = list(data[:8])
    wire = [b"".join(client.encode_request(Op.HELLO, 1))]

    def mitm(frame: bytes) -> bytes:
        if not tamper:
            return frame
        where, what = tamper.pop(0), tamper.pop(0) if tamper else 1
        if what == 0 or not frame:
            return frame
        out = bytearray(frame)
        out[where % len(out)] ^= what
        return bytes(out)

    events = server.receive_data(mitm(wire[0]))
    if not events or isinstance(events[0], ProtocolErrorEvent):
        return
    reply = b"".join(server.encode_response(Op.HELLO, 1, Status.OK))
    back = client.receive_data(mitm(reply))
    if (not back or isinstance(back[0], ProtocolErrorEvent)
            or client.state is not State.AUTHENTICATING):
        return
    auth = server.receive_data(mitm(b"".join(client.encode_auth(2))))
    if not auth or isinstance(auth[0], ProtocolErrorEvent):
        return
    assert server.state is State.AUTHENTICATING
    server.encode_response(Op.AUTH, 2, Status.OK)
    # The server accepted (READY), so whatever was flipped on the way was harmless (the
    # CRCs cover the frames, the HMACs the transcript): each end knows the real other.
    assert server.peer_node == "node-a"
    assert client.peer_hello is not None and client.peer_hello.node_id == "node-b"


def nbd_server(data: bytes) -> None:
    conn = nbd_codec.NbdServerConnection(64 << 20, "vol", multi_conn=True)
    conn.data_to_send()
    for chunk in _chunks(data):
        for ev in conn.receive_data(chunk):
            if isinstance(ev, nbd_messages.ProtocolError):
                return
            if isinstance(ev, nbd_messages.ReadRequest):
                conn.reply(ev.handle, 0, b"\0" * ev.length)
            elif isinstance(ev, (nbd_messages.WriteRequest, nbd_messages.FlushRequest,
                                 nbd_messages.TrimRequest, nbd_messages.WriteZeroesRequest)):
                conn.reply(ev.handle)
            elif isinstance(ev, nbd_messages.Disconnect):
                return
        conn.data_to_send()


TARGETS: dict[str, Callable[[bytes], None]] = {
    "replication_server": replication_server,
    "replication_client": replication_client,
    "handshake": handshake,
    "nbd_server": nbd_server,
}
