"""Seed inputs for the fuzz targets: valid exchanges, so the fuzzer starts deep inside
the protocols (an authenticated stream of requests, a full NBD session)."""

from __future__ import annotations

import struct

from fuzz.targets import _auth
from replication import nbd_messages as nbd
from replication.messages import Op, Role, Status
from replication.payloads import Hello, WriteBatch
from replication.protocol import Connection


def _authenticated_stream() -> tuple[bytes, bytes]:
    """(what an honest client sends, what the server answers), each prefixed with a
    chunk-size byte (see targets._chunks)."""
    client, server = Connection(Role.CLIENT, auth=_auth("node-a")), Connection(
        Role.SERVER, auth=_auth("node-b"))
    sent = [b"".join(client.encode_request(Op.HELLO, 1))]
    server.receive_data(sent[0])
    answer = [b"".join(server.encode_response(Op.HELLO, 1, Status.OK))]
    client.receive_data(answer[0])
    sent.append(b"".join(client.encode_auth(2)))
    server.receive_data(sent[1])
    answer.append(b"".join(server.encode_response(Op.AUTH, 2, Status.OK)))
    client.receive_data(answer[1])
    batch = WriteBatch.build([(0, b"a" * 4096), (8192, b"b" * 512)])
    sent += [b"".join(client.encode_request(Op.FENCE, 3, "vol-1", 1)),
             b"".join(client.encode_request(Op.WRITE, 4, "vol-1", 1, 4096, 4096, 0,
                                            b"x" * 4096)),
             b"".join(client.encode_write_batch(5, "vol-1", 1, batch)),
             b"".join(client.encode_request(Op.READ, 6, "vol-1", 1, 0, 4096)),
             b"".join(client.encode_request(Op.FLUSH, 7, "vol-1", 1))]
    return b"\x3c" + b"".join(sent), b"\x3c" + b"".join(answer)


def _nbd_session() -> bytes:
    """A client's side of a fixed-newstyle handshake (GO with a block-size request), then
    one of each request and a disconnect."""
    name = b"vol"
    go = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, nbd.INFO_BLOCK_SIZE)
    out = struct.pack(">I", nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES)
    out += struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_LIST, 0)
    out += struct.pack(">QII", nbd.IHAVEOPT, nbd.OPT_GO, len(go)) + go
    req = struct.Struct(">IHHQQI")
    out += req.pack(nbd.REQUEST_MAGIC, 0, nbd.CMD_WRITE, 1, 0, 4096) + b"w" * 4096
    out += req.pack(nbd.REQUEST_MAGIC, nbd.CMD_FLAG_FUA, nbd.CMD_WRITE, 2, 8192, 512) + b"v" * 512
    out += req.pack(nbd.REQUEST_MAGIC, 0, nbd.CMD_READ, 3, 4096, 4096)
    out += req.pack(nbd.REQUEST_MAGIC, 0, nbd.CMD_FLUSH, 4, 0, 0)
    out += req.pack(nbd.REQUEST_MAGIC, 0, nbd.CMD_TRIM, 5, 0, 4096)
    out += req.pack(nbd.REQUEST_MAGIC, nbd.CMD_FLAG_NO_HOLE, nbd.CMD_WRITE_ZEROES, 6, 0, 4096)
    out += req.pack(nbd.REQUEST_MAGIC, 0, nbd.CMD_DISC, 7, 0, 0)
    return b"\x3c" + out


def seeds() -> dict[str, list[bytes]]:
    client_stream, server_answer = _authenticated_stream()
    return {
        "replication_server": [client_stream, b"\x05" + b"".join(
            Connection(Role.CLIENT).encode_request(Op.HELLO, 1, payload=Hello("evil").encode()))],
        "replication_client": [server_answer],
        "handshake": [b"", b"\x00\x00\x00\x00\x00\x00", b"\x10\x01\x00\x00\x00\x00"],
        "nbd_server": [_nbd_session()],
    }
