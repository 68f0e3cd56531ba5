"""The option haggling of the NBD fixed-newstyle handshake: what the server answers to each
option, and which option ends the handshake.

Options GO, INFO, EXPORT_NAME, LIST and ABORT are served for the one export; STARTTLS is
refused by policy and everything else as unsupported (STRUCTURED_REPLY included: only
simple replies are ever sent). Pure: ``nbd_codec`` frames the options, passes each one
here, sends the replies and applies the outcome. Must not: keep state between options, do
I/O, or import csi_driver, grpc or etcd.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from replication.nbd_messages import (
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    INFO_NAME,
    MAX_PAYLOAD,
    OPT_ABORT,
    OPT_EXPORT_NAME,
    OPT_GO,
    OPT_INFO,
    OPT_LIST,
    OPT_REPLY_MAGIC,
    OPT_STARTTLS,
    OPTION_REPLY,
    PREFERRED_BLOCK,
    REP_ACK,
    REP_ERR_INVALID,
    REP_ERR_POLICY,
    REP_ERR_UNKNOWN,
    REP_ERR_UNSUP,
    REP_INFO,
    REP_SERVER,
    Disconnect,
    HandshakeComplete,
    Payload,
    ProtocolError,
)

# How an option ends the handshake: enter transmission, the client left, or hang up.
Outcome = HandshakeComplete | Disconnect | ProtocolError


@dataclass(frozen=True, slots=True)
class Export:
    """What the handshake tells a client about the export."""

    name: bytes
    size: int
    transmission_flags: int
    min_block: int


def answer_option(
    export: Export, option: int, payload: bytes, no_zeroes: bool, out: list[Payload]
) -> Outcome | None:
    """Append the replies to ``option`` to ``out``; the outcome if the option ends the
    handshake, None if more options may follow. ``no_zeroes``: the client's flag."""
    if option in (OPT_GO, OPT_INFO):
        return _info_or_go(export, option, payload, out)
    if option == OPT_EXPORT_NAME:
        return _export_name(export, payload, no_zeroes, out)
    if option == OPT_LIST and payload:
        _reply(out, option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data")
    elif option == OPT_LIST:
        _reply(out, option, REP_SERVER, struct.pack(">I", len(export.name)) + export.name)
        _reply(out, option, REP_ACK)
    elif option == OPT_ABORT:
        _reply(out, option, REP_ACK)
        return Disconnect("client sent NBD_OPT_ABORT")
    elif option == OPT_STARTTLS:
        _reply(out, option, REP_ERR_POLICY, b"TLS is not configured")
    else:  # includes STRUCTURED_REPLY: we only ever send simple replies
        _reply(out, option, REP_ERR_UNSUP, b"option not supported")
    return None


def _reply(out: list[Payload], option: int, rep: int, data: bytes = b"") -> None:
    out.append(OPTION_REPLY.pack(OPT_REPLY_MAGIC, option, rep, len(data)) + data)


def _export_name(export: Export, payload: bytes, no_zeroes: bool,
                 out: list[Payload]) -> Outcome:
    if payload and payload != export.name:  # this option has no error reply: hang up
        return ProtocolError(f"unknown export {payload[:64]!r}")
    zeroes = b"" if no_zeroes else bytes(124)
    out.append(struct.pack(">QH", export.size, export.transmission_flags) + zeroes)
    return HandshakeComplete(export.name.decode(errors="replace"), False)


def _info_or_go(export: Export, option: int, payload: bytes,
                out: list[Payload]) -> Outcome | None:
    parsed = _parse_info_request(payload)
    if parsed is None:
        _reply(out, option, REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO data")
        return None
    name, infos = parsed
    if name and name != export.name:
        _reply(out, option, REP_ERR_UNKNOWN, b"no such export")
        return None
    info = struct.pack(">HQH", INFO_EXPORT, export.size, export.transmission_flags)
    block = struct.pack(">HIII", INFO_BLOCK_SIZE, export.min_block, PREFERRED_BLOCK, MAX_PAYLOAD)
    _reply(out, option, REP_INFO, info)
    _reply(out, option, REP_INFO, block)
    if INFO_NAME in infos:
        _reply(out, option, REP_INFO, struct.pack(">H", INFO_NAME) + export.name)
    _reply(out, option, REP_ACK)
    if option == OPT_GO:
        return HandshakeComplete(export.name.decode(errors="replace"), INFO_BLOCK_SIZE in infos)
    return None


def _parse_info_request(payload: bytes) -> tuple[bytes, tuple[int, ...]] | None:
    """Split NBD_OPT_INFO/GO data into (export name, info types); None if malformed."""
    if len(payload) < 6:
        return None
    (name_len,) = struct.unpack_from(">I", payload)
    if name_len > len(payload) - 6:
        return None
    (count,) = struct.unpack_from(">H", payload, 4 + name_len)
    if 6 + name_len + 2 * count != len(payload):
        return None
    return payload[4 : 4 + name_len], struct.unpack_from(f">{count}H", payload, 6 + name_len)
