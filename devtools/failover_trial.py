"""One trial of ``tandem bench failover``, whatever its mode: the record it fills in
(``TrialResult``), the convergence check every trial ends with (``settle``) and the cleanup
helpers. Shared by the kill trials (failover_bench) and the fault trials (fault_modes), so
neither needs the other. Must not: kill, fault or write anything itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from csi_driver.client import CsiClient
from csi_driver.state.etcd import EtcdStore
from devtools import devcluster
from devtools.failover_csi import delete_volume, describe

WRITE_BLOCKS = 4096  # the writers' region (16 MiB): small enough that blocks get overwritten
SETTLE_TIMEOUT_S = 15.0


def secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}s"


@dataclass
class TrialResult:
    trial: int
    mode: str
    owner: str
    survivor: str
    volume_id: str = ""
    kill_after_s: float = 0.0
    kill_to_stage_s: float | None = None
    kill_to_first_ack_s: float | None = None
    stage_attempts: int = 0
    refusals: list[str] = field(default_factory=list)
    acked_before_kill: int = 0
    old_writes_failed: int = 0
    lost_acks: int | None = None
    violations: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # retried refusals outside the takeover
    fault: str = ""  # fault modes: what was done
    heal_s: float | None = None  # fault modes: end of the fault -> healed (fault_modes.py)
    # The volume could not be served, written or read back after the fault (or its heal
    # never came): what must stay 0. Errors of the benchmark's own are only ``errors``.
    unrecoverable: bool = False

    @property
    def ok(self) -> bool:
        return not self.errors and not self.violations and self.lost_acks == 0

    def line(self) -> str:
        if self.fault or self.heal_s is not None:
            text = (f"trial {self.trial:4d} {self.mode:12} {self.fault:32} heal "
                    f"{secs(self.heal_s)} acked {self.acked_before_kill:5d} "
                    f"lost {self.lost_acks} violations {len(self.violations)}")
            return text + ("" if not self.errors else f"  ERROR {self.errors[0]}")
        text = (f"trial {self.trial:3d} {self.mode:9} {self.owner}->{self.survivor} "
                f"kill@{self.kill_after_s:.2f}s stage {secs(self.kill_to_stage_s)} "
                f"first-ack {secs(self.kill_to_first_ack_s)} tries {self.stage_attempts:3d} "
                f"acked {self.acked_before_kill:5d} lost {self.lost_acks} "
                f"violations {len(self.violations)}")
        return text + ("" if not self.errors else f"  ERROR {self.errors[0]}")


def best_effort(result: TrialResult, what: str, func: Callable[..., object],
                *args: object) -> None:
    try:
        func(*args)
    except Exception as exc:  # cleanup must go on; the trial records what failed
        result.errors.append(f"{what}: {describe(exc)}")


def cleanup_volume(result: TrialResult, ctl: CsiClient) -> None:
    if not result.volume_id:
        return
    try:
        result.notes += [f"DeleteVolume retried after {r}"
                         for r in delete_volume(ctl, result.volume_id)]
    except Exception as exc:
        result.errors.append(f"delete: {describe(exc)}")


def volume_isr(spec: devcluster.ClusterSpec, volume_id: str) -> tuple[str, ...]:
    """The volume's in-sync replicas, as the cluster's etcd has them now."""
    async def get() -> tuple[str, ...]:
        store = EtcdStore([spec.etcd_host_endpoint], prefix=spec.etcd_prefix)
        try:
            found = await store.get_volume(volume_id)
            return () if found is None else found.value.isr
        finally:
            await store.close()
    return asyncio.run(get())


def settle(spec: devcluster.ClusterSpec, volume_id: str, served: Callable[[], bytes],
           timeout_s: float = SETTLE_TIMEOUT_S) -> list[str]:
    """Wait until every in-sync replica file holds exactly what the owner serves (I1, I4:
    convergence after a takeover runs in the background). Returns what still differs."""
    deadline = time.monotonic() + timeout_s
    while True:
        isr, image = volume_isr(spec, volume_id), served()
        differ = [n for n in isr if (Path(spec.node(n).pool.dir) / f"{volume_id}.img")
                  .read_bytes()[:len(image)] != image]
        if (isr and not differ) or time.monotonic() > deadline:
            return [f"in-sync replica {n} differs from what the owner serves after "
                    f"{timeout_s:g} s" for n in differ] or ([] if isr else ["empty ISR"])
        time.sleep(0.2)
