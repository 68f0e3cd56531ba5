"""What the data plane asks of the control plane, as a small interface.

The target never talks to etcd itself: ISR changes and the self-fencing clock reach it
through ``Authority``, which ``csi_driver`` implements over etcd compare-and-swap. Keeping it
an interface lets the target be tested with an in-memory authority and run with the real one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from replication.errors import ReplicationError


class FencedError(ReplicationError):
    """Our epoch is no longer the volume's epoch: another owner took over. Stop acking."""


class AuthorityUnavailableError(ReplicationError):
    """The authority (etcd) could not confirm a change in time: do not acknowledge."""


class Authority(Protocol):
    async def remove_from_isr(self, node_ids: frozenset[str], reason: str) -> tuple[str, ...]:
        """Remove ``node_ids`` from the volume's ISR by CAS; return the new ISR.

        Raises FencedError when the record's epoch/owner is no longer ours and
        AuthorityUnavailableError when the change could not be made in time. The target
        acknowledges nothing a removed replica missed until this returned.
        """
        ...

    async def add_to_isr(self, node_id: str) -> tuple[str, ...]:
        """Add a rebuilt replica to the ISR by CAS (same fencing rules); return the new ISR."""
        ...

    async def report_progress(self, node_id: str, progress: ResyncProgress | None) -> None:
        """Publish rebuild progress for operators (best effort; never raises)."""
        ...

    def may_acknowledge(self) -> bool:
        """False once our ownership lease may have expired (self-fencing)."""
        ...

    async def regain(self) -> None:
        """After ``may_acknowledge()`` turned False (etcd unreachable, lease lapsed): take
        our claim again at the *same* epoch in one transaction, if the record still names
        us as owner at that epoch. Returns once ``may_acknowledge()`` is True again.

        Raises FencedError when someone else took over (or the volume is gone) and
        AuthorityUnavailableError when etcd cannot be reached yet (the caller retries).
        """
        ...


@dataclass(frozen=True)
class ResyncProgress:
    """A rebuild (``join``) or convergence of one replica, as operators see it."""

    kind: str  # "rebuild" | "converge"
    done_bytes: int
    total_bytes: int
    rate_bytes_s: float
    volume_bytes: int
