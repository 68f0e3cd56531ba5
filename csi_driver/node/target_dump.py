"""What a volume's target is doing, on demand: ``kill -USR1 <target pid>`` writes its
write-path state and the stack of every asyncio task to its log (the node's
``targets/<volume>.log``). For I/O that hangs: which request waits on what.

Read-only and best effort: it must never change the target's state or raise.
"""

from __future__ import annotations

import asyncio
import io
import logging

from replication.nbd_server import NbdServer
from replication.target import ReplicatedBackend

log = logging.getLogger(__name__)


def dump_state(backend: ReplicatedBackend, server: NbdServer) -> None:
    b = backend
    try:  # private fields on purpose: this is the view from inside
        clients = {n: c.in_flight for n, c in b._clients.items()}
        nbd = [getattr(c, "_inflight_bytes", None) for c in server.connections]
        log.warning(
            "volume=%s epoch=%d state dump: isr=%s fenced=%s gate_open=%s budget_used=%d "
            "callback_writes=%d resyncs=%s dropping=%s replica_requests_in_flight=%s "
            "nbd_in_flight_bytes=%s", b.volume_id, b.epoch, list(b.isr), b.fenced,
            b._open_gate.is_set(), b._budget._used, b._joins, sorted(b._resyncs),
            sorted(b._dropping), clients, nbd)
    except Exception:  # a dump that fails must not take the target down
        log.exception("volume=%s state dump failed", b.volume_id)
    for i, conn in enumerate(server.connections):
        log.warning("volume=%s nbd connection %d: %s", b.volume_id, i, _connection_state(conn))
    for task in asyncio.all_tasks():
        out = io.StringIO()
        try:
            task.print_stack(limit=20, file=out)
        except Exception:  # some frames have no line number (seen on uvloop): say what runs
            out.write(repr(task))
        log.warning("volume=%s task %s:\n%s", b.volume_id, task.get_name(),
                    out.getvalue().rstrip())


def _connection_state(conn: object) -> str:
    """Flow control of one NBD connection: what would stop it from reading requests or
    sending replies (a stall with nothing in flight at the backend shows up here)."""
    fields = {name: getattr(conn, attr, "?") for name, attr in (
        ("read_paused", "_read_paused"), ("write_paused", "_write_paused"),
        ("soon_in_flight", "_soon_in_flight"), ("draining", "_draining"),
        ("hangup", "_hangup"), ("flush_scheduled", "_flush_scheduled"))}
    fields["backlog"] = len(getattr(conn, "_backlog", ()))
    fields["tasks"] = len(getattr(conn, "_tasks", ()))
    fields["pending_reply_parts"] = len(getattr(conn, "_pending", ()))
    transport = getattr(conn, "_transport", None)
    if transport is not None:
        fields["transport_closing"] = transport.is_closing()
        is_reading = getattr(transport, "is_reading", None)
        fields["transport_reading"] = is_reading() if callable(is_reading) else "?"
        fields["transport_write_buffer"] = transport.get_write_buffer_size()
    return " ".join(f"{k}={v}" for k, v in fields.items())
