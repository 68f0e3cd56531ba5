"""Vocabulary of the NBD protocol as this server speaks it: the spec's numbers, the layouts
of its fixed-size messages, this server's limits, and the events the codec yields.

The numbers are the spec's (reference/nbd-protocol.md). Structured replies and extended
headers are never negotiated, so they have no numbers here. ``nbd_negotiation`` answers
the handshake's options, ``nbd_codec`` parses and validates everything else.
Must not: keep state, do I/O, or import csi_driver, grpc or etcd.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

NBDMAGIC: Final = 0x4E42444D41474943
IHAVEOPT: Final = 0x49484156454F5054
OPT_REPLY_MAGIC: Final = 0x3E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698

# Handshake flags (server) and client flags share bit positions.
FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1 << 0, 1 << 1
FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES = 1 << 0, 1 << 1
# Transmission flags.
TF_HAS_FLAGS, TF_SEND_FLUSH, TF_SEND_FUA = 1 << 0, 1 << 2, 1 << 3
TF_SEND_TRIM, TF_SEND_WRITE_ZEROES, TF_CAN_MULTI_CONN = 1 << 5, 1 << 6, 1 << 8

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
REP_ERR_UNSUP, REP_ERR_POLICY, REP_ERR_INVALID, REP_ERR_UNKNOWN = (2**31 + n for n in (1, 2, 3, 6))
INFO_EXPORT, INFO_NAME, INFO_BLOCK_SIZE = 0, 1, 3  # DESCRIPTION (2) is never sent

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES = range(7)
CMD_FLAG_FUA, CMD_FLAG_NO_HOLE = 1 << 0, 1 << 1

NBD_EPERM, NBD_EIO, NBD_ENOMEM, NBD_EINVAL, NBD_ENOSPC = 1, 5, 12, 22, 28
NBD_EOVERFLOW, NBD_ENOTSUP, NBD_ESHUTDOWN = 75, 95, 108

MIN_BLOCK, PREFERRED_BLOCK, MAX_PAYLOAD = 512, 4096, 32 * 1024 * 1024
# Legitimate options are an export name (<= 4 KiB) plus a few info codes; more
# than this is a peer trying to make us buffer without bound.
MAX_OPTION_LEN, MAX_NAME_LEN = 64 * 1024, 4096

GREETING = struct.Struct(">QQH")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")

Payload = bytes | memoryview


@dataclass(frozen=True, slots=True)
class HandshakeComplete:
    export_name: str
    block_size_negotiated: bool


@dataclass(frozen=True, slots=True)
class ReadRequest:
    handle: int
    offset: int
    length: int
    flags: int


@dataclass(frozen=True, slots=True)
class WriteRequest:
    handle: int
    offset: int
    data: Payload  # a view into the received chunk, never copied
    fua: bool


@dataclass(frozen=True, slots=True)
class FlushRequest:
    handle: int


@dataclass(frozen=True, slots=True)
class TrimRequest:
    handle: int
    offset: int
    length: int
    fua: bool


@dataclass(frozen=True, slots=True)
class WriteZeroesRequest:
    handle: int
    offset: int
    length: int
    no_hole: bool
    fua: bool


@dataclass(frozen=True, slots=True)
class Disconnect:
    reason: str


@dataclass(frozen=True, slots=True)
class ProtocolError:
    reason: str


Request = ReadRequest | WriteRequest | FlushRequest | TrimRequest | WriteZeroesRequest
Event = HandshakeComplete | Request | Disconnect | ProtocolError
