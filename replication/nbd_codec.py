"""Sans-IO NBD server protocol for one export: bytes in, events out, bytes back.

Owns the fixed-newstyle handshake's framing (client flags, option headers; what each option
is answered is ``nbd_negotiation``), the parsing of transmission-phase requests, their
validation against the export (flags, bounds, alignment, payload limits) with the error
replies the spec asks for, the encoding of simple replies, and the receive buffers. The
numbers and events are ``nbd_messages``. Structured replies and extended headers are never
negotiated.

Must not: touch sockets, files, asyncio or clocks; perform the requested I/O
(the caller does, then calls `reply`); raise on anything the peer sends (that is
a `ProtocolError` event, after which the connection is dead and must be closed).
"""

from __future__ import annotations

import enum
import struct
from typing import Final

from replication.nbd_messages import (
    CMD_CACHE,
    CMD_DISC,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLUSH,
    CMD_READ,
    CMD_TRIM,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    GREETING,
    IHAVEOPT,
    MAX_NAME_LEN,
    MAX_OPTION_LEN,
    MAX_PAYLOAD,
    MIN_BLOCK,
    NBD_EINVAL,
    NBD_ENOSPC,
    NBDMAGIC,
    OPTION_HEADER,
    REQUEST,
    REQUEST_MAGIC,
    SIMPLE_REPLY,
    SIMPLE_REPLY_MAGIC,
    TF_CAN_MULTI_CONN,
    TF_HAS_FLAGS,
    TF_SEND_FLUSH,
    TF_SEND_FUA,
    TF_SEND_TRIM,
    TF_SEND_WRITE_ZEROES,
    Disconnect,
    Event,
    FlushRequest,
    HandshakeComplete,
    Payload,
    ProtocolError,
    ReadRequest,
    TrimRequest,
    WriteRequest,
    WriteZeroesRequest,
)
from replication.nbd_negotiation import Export, Outcome, answer_option

SCRATCH_SIZE = 256 * 1024  # what one buffered read may bring (as uvloop's own buffer)
DIRECT_MIN = 64 * 1024  # write payloads this big are received into their own buffer

_REQ_LEN: Final = REQUEST.size
_SERVER_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
_BASE_TFLAGS = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES

# Command -> (flags it may carry, error for a range past the end of the export).
# CACHE is not advertised but some clients send it regardless.
_COMMAND_RULES: Final = {
    CMD_READ: (CMD_FLAG_FUA, NBD_EINVAL),
    CMD_FLUSH: (CMD_FLAG_FUA, NBD_EINVAL),
    CMD_TRIM: (CMD_FLAG_FUA, NBD_EINVAL),
    CMD_CACHE: (CMD_FLAG_FUA, NBD_EINVAL),
    CMD_WRITE_ZEROES: (CMD_FLAG_FUA | CMD_FLAG_NO_HOLE, NBD_ENOSPC),
}


class State(enum.Enum):
    CLIENT_FLAGS = "client_flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


class NbdServerConnection:
    """One server-side NBD connection for a single export, from greeting to close.

    The greeting is queued at construction; drain `data_to_send()` after creating
    the connection and after every `receive_data` / `buffer_updated`. Write payloads
    in events are memoryviews into the `bytes` handed to `receive_data`, so no
    payload is copied unless it straddles two chunks; through `get_buffer` /
    `buffer_updated` a big payload is received into a buffer of its own instead.
    Either way a payload stays valid for as long as the caller keeps it.
    """

    def __init__(self, export_size: int, export_name: str = "", *, multi_conn: bool = False):
        name = export_name.encode()
        if export_size < 0 or export_size >= 1 << 63:
            raise ValueError(f"export size out of range: {export_size}")
        if len(name) > MAX_NAME_LEN:
            raise ValueError("export name longer than 4096 bytes")
        self._size = export_size
        # A minimum block the size is not a multiple of would hide the export's tail.
        self.min_block: Final = 1 if export_size % MIN_BLOCK else MIN_BLOCK
        self.transmission_flags: Final = _BASE_TFLAGS | (TF_CAN_MULTI_CONN if multi_conn else 0)
        self._export = Export(name, export_size, self.transmission_flags, self.min_block)
        self._state = State.CLIENT_FLAGS
        self._no_zeroes = False
        self._align_mask = 0
        self._buf = b""  # handshake bytes not yet parsed
        self._parts: list[Payload] = []  # pieces of a frame split across chunks
        self._have = 0
        # get_buffer / buffer_updated: small reads land in _scratch; a big write's payload
        # is received straight into a buffer of its own (_direct, _direct_filled).
        self._scratch = bytearray(SCRATCH_SIZE)
        self._direct: bytearray | None = None
        self._direct_filled = 0
        self._direct_header: tuple[int, int, int, int] = (0, 0, 0, 0)  # flags handle off len
        self._out: list[Payload] = [GREETING.pack(NBDMAGIC, IHAVEOPT, _SERVER_FLAGS)]

    @property
    def state(self) -> State:
        return self._state

    def data_to_send(self) -> list[Payload]:
        """Bytes the protocol itself produced (handshake, rejected requests); drains."""
        out, self._out = self._out, []
        return out

    def reply(self, handle: int, error: int = 0, data: Payload | None = None) -> list[Payload]:
        """A simple reply as buffers for `writelines`; `data` is not copied.

        `error` is an NBD error code; with an error the payload is dropped, as the
        spec requires.
        """
        header = SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)
        return [header] if error or data is None else [header, data]

    def receive_data(self, data: bytes) -> list[Event]:
        """Parse everything complete in `data` (plus earlier leftovers) into events."""
        events: list[Event] = []
        state = self._state  # a local: the handshake changes self._state below
        if state is State.TRANSMISSION:
            self._receive_requests(data, events)
        elif state is not State.CLOSED:
            self._buf += data
            self._receive_handshake(events)
            if self._state is State.TRANSMISSION and self._buf:
                rest, self._buf = self._buf, b""
                self._receive_requests(rest, events)
        return events

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next received bytes go (``asyncio.BufferedProtocol.get_buffer``), then
        call ``buffer_updated``. A write payload of DIRECT_MIN bytes or more that is still
        arriving is received into a buffer of its own, which becomes the event's data: one
        copy (the kernel's) instead of three. Do not mix with ``receive_data``."""
        if self._direct is not None:
            return memoryview(self._direct)[self._direct_filled :]
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> list[Event]:
        """``nbytes`` were written into the last ``get_buffer``: the events they complete."""
        direct = self._direct
        if direct is None:
            received = self.receive_data(bytes(memoryview(self._scratch)[:nbytes]))
            if self._have >= _REQ_LEN and self._state is State.TRANSMISSION:
                self._maybe_go_direct()
            return received
        self._direct_filled += nbytes
        if self._direct_filled < len(direct) or self._state is not State.TRANSMISSION:
            return []
        self._direct = None
        flags, handle, offset, length = self._direct_header
        events: list[Event] = []
        err = self._check(flags, CMD_FLAG_FUA, offset, length, NBD_ENOSPC)
        if err:
            self._out.append(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, err, handle))
        else:
            data = memoryview(direct).toreadonly()
            events.append(WriteRequest(handle, offset, data, bool(flags & CMD_FLAG_FUA)))
        return events

    def _maybe_go_direct(self) -> None:
        """If the partial frame is a big write, move what arrived of it into its own
        buffer; the rest is then received there."""
        pending = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        magic, flags, cmd, handle, offset, length = REQUEST.unpack_from(pending)
        # _parse has checked the magic and the payload limit of any header it kept.
        if magic != REQUEST_MAGIC or cmd != CMD_WRITE or length < DIRECT_MIN:
            return
        buf = bytearray(length)
        got = len(pending) - _REQ_LEN
        buf[:got] = memoryview(pending)[_REQ_LEN:]
        self._parts, self._have = [], 0
        self._direct, self._direct_filled = buf, got
        self._direct_header = (flags, handle, offset, length)

    def _receive_handshake(self, events: list[Event]) -> None:
        if self._state is State.CLIENT_FLAGS and len(self._buf) >= 4:
            (flags,) = struct.unpack_from(">I", self._buf)
            if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
                self._fail(events, f"unknown client flags 0x{flags:x}")
                return
            self._no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
            self._buf = self._buf[4:]
            self._state = State.OPTIONS
        while self._state is State.OPTIONS and len(self._buf) >= OPTION_HEADER.size:
            buf = self._buf
            magic, option, length = OPTION_HEADER.unpack_from(buf)
            if magic != IHAVEOPT or length > MAX_OPTION_LEN:
                self._fail(events, f"bad option header: magic 0x{magic:x}, length {length}")
                return
            end = OPTION_HEADER.size + length
            if len(buf) < end:
                return
            self._buf = buf[end:]
            outcome = answer_option(
                self._export, option, buf[OPTION_HEADER.size : end], self._no_zeroes, self._out)
            if outcome is not None:
                self._end_handshake(outcome, events)

    def _end_handshake(self, outcome: Outcome, events: list[Event]) -> None:
        if isinstance(outcome, HandshakeComplete):
            # Only a client that asked for block sizes promised to honour them; the
            # others get the default constraints (any alignment).
            self._align_mask = self.min_block - 1 if outcome.block_size_negotiated else 0
            self._state = State.TRANSMISSION
            events.append(outcome)
        elif isinstance(outcome, Disconnect):
            self._state = State.CLOSED
            events.append(outcome)
        else:
            self._fail(events, outcome.reason)

    def _fail(self, events: list[Event], reason: str) -> None:
        self._state = State.CLOSED
        self._buf, self._parts, self._have = b"", [], 0
        self._direct = None
        events.append(ProtocolError(reason))

    def _receive_requests(self, data: bytes, events: list[Event]) -> None:
        pos = 0
        if self._have:
            pos = self._complete_straddler(data, events)
            if pos < 0:
                return
        pos = self._parse(data, pos, events)
        if pos < len(data) and self._state is State.TRANSMISSION:
            # A view, not a copy: `data` is immutable and the frame is joined once.
            self._parts = [memoryview(data)[pos:]]
            self._have = len(data) - pos

    def _complete_straddler(self, data: bytes, events: list[Event]) -> int:
        """Finish the frame split across chunks, joining its pieces exactly once.

        Returns how much of `data` it used, or -1 if the frame is still incomplete.
        """
        used = 0
        if self._have < _REQ_LEN:
            used = min(_REQ_LEN - self._have, len(data))
            head = b"".join(self._parts) + data[:used]
            self._parts, self._have = [head], len(head)
            if len(head) < _REQ_LEN:
                return -1
        magic, _flags, cmd, _handle, _offset, length = REQUEST.unpack_from(self._parts[0])
        is_write = magic == REQUEST_MAGIC and cmd == CMD_WRITE and length <= MAX_PAYLOAD
        total = _REQ_LEN + length if is_write else _REQ_LEN
        piece = memoryview(data)[used : used + total - self._have]
        used += len(piece)
        self._parts.append(piece)
        self._have += len(piece)
        if self._have < total:
            return -1
        frame = b"".join(self._parts)
        self._parts, self._have = [], 0
        self._parse(frame, 0, events)
        return used if self._state is State.TRANSMISSION else len(data)

    def _parse(self, buf: bytes, pos: int, events: list[Event]) -> int:
        """Parse whole frames from `buf[pos:]`; returns where the first partial one starts."""
        end = len(buf)
        unpack = REQUEST.unpack_from
        view: memoryview | None = None
        while end - pos >= _REQ_LEN:
            magic, flags, cmd, handle, offset, length = unpack(buf, pos)
            if magic != REQUEST_MAGIC:
                self._fail(events, f"bad request magic 0x{magic:08x}")
                return end
            if cmd != CMD_WRITE:
                pos += _REQ_LEN
                self._command(cmd, flags, handle, offset, length, events)
                if self._state is not State.TRANSMISSION:
                    return end
                continue
            if length > MAX_PAYLOAD:
                # Its payload would have to be read and thrown away: treat as abuse.
                self._fail(events, f"write payload {length} exceeds {MAX_PAYLOAD}")
                return end
            stop = pos + _REQ_LEN + length
            if stop > end:
                break
            if view is None:
                view = memoryview(buf)
            data = view[pos + _REQ_LEN : stop]
            pos = stop
            err = self._check(flags, CMD_FLAG_FUA, offset, length, NBD_ENOSPC)
            if err:
                self._out.append(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, err, handle))
            else:
                events.append(WriteRequest(handle, offset, data, bool(flags & CMD_FLAG_FUA)))
        return pos

    def _check(self, flags: int, allowed: int, offset: int, length: int, range_err: int) -> int:
        if flags & ~allowed:
            return NBD_EINVAL
        if offset + length > self._size:
            return range_err
        if (offset | length) & self._align_mask:
            return NBD_EINVAL
        return 0

    def _command(
        self, cmd: int, flags: int, handle: int, offset: int, length: int, events: list[Event]
    ) -> None:
        if cmd == CMD_DISC:
            self._state = State.CLOSED
            events.append(Disconnect("client sent NBD_CMD_DISC"))
            return
        rule = _COMMAND_RULES.get(cmd)
        if rule is None:
            err = NBD_EINVAL
        elif cmd == CMD_FLUSH:  # offset and length are reserved: not checked
            err = NBD_EINVAL if flags & ~rule[0] else 0
        else:
            err = self._check(flags, rule[0], offset, length, rule[1])
            if cmd == CMD_READ and length > MAX_PAYLOAD:
                err = err or NBD_EINVAL
        if err or cmd == CMD_CACHE:  # CACHE is only a hint: succeed without acting
            self._out.append(SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, err, handle))
            return
        fua = bool(flags & CMD_FLAG_FUA)
        if cmd == CMD_READ:
            events.append(ReadRequest(handle, offset, length, flags))
        elif cmd == CMD_WRITE_ZEROES:
            no_hole = bool(flags & CMD_FLAG_NO_HOLE)
            events.append(WriteZeroesRequest(handle, offset, length, no_hole, fua))
        elif cmd == CMD_TRIM:
            events.append(TrimRequest(handle, offset, length, fua))
        else:
            events.append(FlushRequest(handle))
