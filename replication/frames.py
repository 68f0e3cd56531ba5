"""The frame of the replication wire protocol: its layout, encoding it, and splitting a byte
stream into frames that passed the checks every frame must pass, whatever its op.

Frame (big-endian, 50-byte fixed header, ``HEADER``)::

    off  size  field         meaning
    0    4     magic         b"TDM1"
    4    4     header_crc    CRC-32 (zlib's) of bytes [8, 50 + vid_len): all after itself
    8    1     version       1
    9    1     op            messages.Op
    10   2     flags         FUA 0x1, NO_HOLE 0x2, NO_PAYLOAD_CRC 0x4000, REPLY 0x8000
    12   8     request_id    chosen by the client, echoed by the response
    20   8     epoch         request: owner's epoch; response: replica's fenced epoch
    28   8     offset        byte offset (SETTLE: the settled sequence number)
    36   4     length        byte count of the range
    40   4     payload_len   <= max_payload (default 32 MiB)
    44   4     payload_crc   CRC-32 of the payload; 0 if NO_PAYLOAD_CRC or empty
    48   1     status        messages.Status; 0 on requests
    49   1     vid_len       0..128; 0 on HELLO and on every response
    50   n     volume_id     ASCII [A-Za-z0-9_.-]
    50+n p     payload

Which fields each op uses is ``replication.op_rules``; what the frames of one connection
mean together (handshake, request ids) is ``replication.protocol``. Owns: the header
``Struct``, encoding a frame (checksums, bounds), and ``FrameReader``, the receive buffers
of one connection and the frame checks (magic, header checksum, version, payload bound and
checksum). Must not: interpret ops or statuses, do I/O, or import csi_driver, grpc or etcd.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from replication.checksum import crc32
from replication.messages import (
    HANDSHAKE_MAX_PAYLOAD,
    PROTOCOL_VERSION,
    Buffer,
    Event,
    Flag,
    LocalProtocolError,
    RemoteProtocolError,
)

MAGIC = b"TDM1"
HEADER = struct.Struct("!4sIBBHQQQIIIBB")  # fields tabled above
HEADER_SIZE = HEADER.size
# The same header split at the crc, for encoding: crc32(body) must be known before the prefix.
HEADER_PREFIX = struct.Struct("!4sI")
HEADER_BODY = struct.Struct("!BBHQQQIIIBB")
HEADER_CRC_START = 8  # the header crc covers every header byte after itself

# Called per checked frame with the unpacked HEADER fields, the volume id bytes and the
# payload; returns the frame's event.
FrameHandler = Callable[[tuple[Any, ...], bytes, Buffer], Event]

_NO_CRC = int(Flag.NO_PAYLOAD_CRC)
_unpack_header = HEADER.unpack_from
_pack_body = HEADER_BODY.pack
_pack_prefix = HEADER_PREFIX.pack
_crc32 = crc32
_CRC_FROM = HEADER_CRC_START
_VERSION = PROTOCOL_VERSION
_Remote = RemoteProtocolError
_Local = LocalProtocolError
_HANDSHAKE_MAX = HANDSHAKE_MAX_PAYLOAD

_RBUF_MIN = 256 << 10  # the receive buffer's smallest size, and the most a read may ask for
_RBUF_HANDSHAKE = 4 << 10  # the same before the peer is authenticated
_RBUF_KEEP = 4 << 20  # kept between frames; a bigger one is for one big frame only


def encode_header(op: int, flags: int, rid: int, epoch: int, offset: int, length: int,
                  plen: int, pcrc: int, status: int, vid: bytes) -> bytes:
    """The header of a frame, checksummed; LocalProtocolError if a field does not fit."""
    try:
        fields = (op, flags, rid, epoch, offset, length, plen, pcrc, status, len(vid))
        body = _pack_body(_VERSION, *fields) + vid
    except struct.error as exc:
        raise _Local(f"header field out of range: {exc}") from None
    return _pack_prefix(MAGIC, _crc32(body)) + body


def encode_frame(
    op: int,
    flags: int,
    rid: int,
    epoch: int,
    offset: int,
    length: int,
    status: int,
    vid: bytes,
    payload: Buffer,
    payload_crc: int | None,
    max_payload: int,
    payload_checksums: bool,
) -> list[Buffer]:
    """A frame as [header, payload] (or [header]) for ``transport.writelines``: the payload
    is not copied. ``payload_crc``: its CRC-32 if the caller already knows it."""
    if type(payload) is memoryview and payload.itemsize != 1:
        raise _Local("payload must be a buffer of bytes (memoryview.cast('B'))")
    plen = len(payload)
    if plen > max_payload:
        raise _Local(f"payload of {plen} bytes exceeds the maximum")
    if not plen:
        pcrc = 0
    elif not payload_checksums:
        flags |= _NO_CRC
        pcrc = 0
    else:
        pcrc = _crc32(payload) if payload_crc is None else payload_crc
    header = encode_header(op, flags, rid, epoch, offset, length, plen, pcrc, status, vid)
    return [header, payload] if plen else [header]


class FrameReader:
    """Splits the bytes one connection receives into checked frames, each handed to the
    connection's ``FrameHandler``; a frame that fails a check raises RemoteProtocolError.

    The connection sets ``open`` (False: stop after the frame that closed it) and
    ``authenticated`` (until then a frame's payload is bounded by HANDSHAKE_MAX_PAYLOAD and
    the receive buffer stays a few KiB: a stranger costs nothing but a closed connection)."""

    def __init__(self, max_payload: int) -> None:
        self.max_payload = max_payload
        self.open = True
        self.authenticated = False
        self.partial = bytearray()  # only ever the one frame split across receive calls
        self._need = HEADER_SIZE  # bytes of the pending frame needed before parsing again
        # get_buffer / buffer_updated: received bytes live in [_rpos, _rend) of _rbuf.
        self._rbuf = bytearray(0)
        self._rpos = self._rend = 0

    @property
    def pending(self) -> bool:
        """Part of a frame is buffered."""
        return bool(self.partial) or self._rend > self._rpos

    def clear(self) -> None:
        # Fresh ones: a traceback may still pin the old ones' views; the memory goes now.
        self.partial = bytearray()
        self._rbuf = bytearray(0)
        self._rpos = self._rend = 0

    def receive(self, data: Buffer, on_frame: FrameHandler, events: list[Event]) -> None:
        """The frames ``data`` completes (with what was buffered); payloads of whole frames
        are views into ``data``, and the rest is kept in ``partial``."""
        # Events may point into immutable bytes; a caller may reuse other buffers: copy once.
        view = memoryview(data if type(data) is bytes else bytes(data))
        start = self._complete_partial(view, on_frame, events) if self.partial else 0
        if start >= 0:
            pos = self._parse(view, start, False, on_frame, events)
            if pos < len(view) and self.open:
                self.partial += view[pos:]

    def get_buffer(self) -> memoryview:
        """Where the next received bytes go; reused, so earlier payload views die here."""
        buf = self._rbuf
        pending = self._rend - self._rpos
        # The whole pending frame must fit behind its start: move it to the front, or
        # grow into a new buffer (never resize in place: old views may still be exported).
        # > pending: there is always room to receive; a stranger gets a few KiB at most.
        need = max(self._need, _RBUF_MIN if self.authenticated else _RBUF_HANDSHAKE)
        if self._rpos and (not pending or len(buf) - self._rpos < need):
            buf[:pending] = buf[self._rpos : self._rend]
            self._rpos, self._rend = 0, pending
        if need > len(buf) or (not pending and len(buf) > _RBUF_KEEP):
            new = bytearray(max(need, min(2 * len(buf), _RBUF_KEEP)))
            new[:pending] = buf[self._rpos : self._rend]
            self._rbuf = buf = new
            self._rpos, self._rend = 0, pending
        return memoryview(buf)[self._rend :]

    def buffer_updated(self, nbytes: int, on_frame: FrameHandler, events: list[Event]) -> None:
        """``nbytes`` were written into the last ``get_buffer``: the frames they complete."""
        self._rend += nbytes
        if not self.open:
            self._rpos = self._rend = 0
            return
        view = memoryview(self._rbuf)[: self._rend].toreadonly()
        self._rpos = self._parse(view, self._rpos, False, on_frame, events)
        if self._rpos == self._rend:
            self._rpos = self._rend = 0

    def _complete_partial(
        self, view: memoryview, on_frame: FrameHandler, events: list[Event]
    ) -> int:
        """Feed the buffered partial frame from ``view``; bytes of view used, or -1 if all."""
        buf = self.partial
        used = 0
        while True:
            take = self._need - len(buf)
            if take > len(view) - used:
                buf += view[used:]
                return -1
            buf += view[used : used + take]
            used += take
            with memoryview(buf) as bmv:
                done = self._parse(bmv, 0, True, on_frame, events)
            if done:  # the frame is complete (or the peer's HELLO reject closed us)
                buf.clear()
                return used

    def _parse(self, mv: memoryview, pos: int, copy: bool, on_frame: FrameHandler,
               events: list[Event]) -> int:
        """Append events for complete frames from ``pos``; returns where the rest starts."""
        end = len(mv)
        while self.open:
            if end - pos < HEADER_SIZE:
                self._need = HEADER_SIZE
                return pos
            header = _unpack_header(mv, pos)
            magic, hcrc, ver, _, flags, _, _, _, _, plen, pcrc, _, vlen = header
            if magic != MAGIC:
                raise _Remote("bad magic")
            hend = pos + HEADER_SIZE + vlen
            if hend > end:
                self._need = HEADER_SIZE + vlen
                return pos
            if _crc32(mv[pos + _CRC_FROM : hend]) != hcrc:
                raise _Remote("bad header checksum")
            if ver != _VERSION:
                raise _Remote(f"unsupported protocol version {ver}")
            if plen > self.max_payload:
                raise _Remote(f"payload of {plen} bytes exceeds the maximum")
            if plen > _HANDSHAKE_MAX and not self.authenticated:
                raise _Remote(f"payload of {plen} bytes before the handshake completed")
            fend = hend + plen
            if fend > end:
                self._need = fend - pos
                return pos
            payload: Buffer = b""
            if plen:
                payload = mv[hend:fend]
                if not flags & _NO_CRC and _crc32(payload) != pcrc:
                    raise _Remote("bad payload checksum")
                if copy:
                    payload = payload.tobytes()
            if pcrc and (not plen or flags & _NO_CRC):
                raise _Remote("payload checksum set without a checked payload")
            vid = mv[pos + HEADER_SIZE : hend].tobytes() if vlen else b""
            events.append(on_frame(header, vid, payload))
            pos = fend
        return pos
