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
    for task in asyncio.all_tasks():
        out = io.StringIO()
        try:
            task.print_stack(limit=20, file=out)
        except Exception:  # some frames have no line number (seen on uvloop): say what runs
            out.write(repr(task))
        log.warning("volume=%s task %s:\n%s", b.volume_id, task.get_name(),
                    out.getvalue().rstrip())
