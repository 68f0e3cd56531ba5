"""The failover benchmark's figures: per-trial results folded into a summary (overall and
per mode) and printed. Pure: no clusters, no I/O but print."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from devtools.failover_trial import TrialResult, secs


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _distribution(values: Sequence[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 50), "p90": percentile(values, 90),
            "p99": percentile(values, 99), "max": max(values) if values else None}


def summarize(results: Sequence[TrialResult], lease_ttl_s: float) -> dict[str, Any]:
    acks = [r.kill_to_first_ack_s for r in results if r.kill_to_first_ack_s is not None]
    stages = [r.kill_to_stage_s for r in results if r.kill_to_stage_s is not None]
    modes = sorted({r.mode for r in results})
    return {
        "trials": len(results),
        "mode": modes[0] if len(modes) == 1 else "mix",
        "lease_ttl_s": lease_ttl_s,
        "succeeded": sum(1 for r in results if r.ok),
        "kill_to_first_ack_s": _distribution(acks),
        "kill_to_stage_s": _distribution(stages),
        "acked_writes_lost": sum(r.lost_acks or 0 for r in results),
        "violations": sum(len(r.violations) for r in results),
        "unrecoverable": sum(1 for r in results if r.unrecoverable),
        "failed_trials": [r.trial for r in results if not r.ok],
        "by_mode": {m: _mode_summary([r for r in results if r.mode == m]) for m in modes},
    }


def _mode_summary(results: Sequence[TrialResult]) -> dict[str, Any]:
    heals = [h for r in results
             if (h := r.heal_s if r.heal_s is not None else r.kill_to_first_ack_s) is not None]
    return {"trials": len(results), "clean": sum(1 for r in results if r.ok),
            "acked_writes_lost": sum(r.lost_acks or 0 for r in results),
            "violations": sum(len(r.violations) for r in results),
            "unrecoverable": sum(1 for r in results if r.unrecoverable),
            "heal_s": _distribution(heals)}


def print_summary(summary: dict[str, Any]) -> None:
    print(f"\n{summary['trials']} trials ({summary['mode']}, lease TTL "
          f"{summary['lease_ttl_s']:g} s), {summary['succeeded']} clean")
    for key, what in (("kill_to_first_ack_s", "first acknowledged write"),
                      ("kill_to_stage_s", "NodeStageVolume done")):
        t = summary[key]
        if t["p50"] is not None:  # only kill trials have these
            print(f"kill -> {what}: p50 {secs(t['p50'])} p90 {secs(t['p90'])} "
                  f"p99 {secs(t['p99'])} max {secs(t['max'])}")
    print(f"acknowledged writes lost: {summary['acked_writes_lost']}   "
          f"violations: {summary['violations']}   unrecoverable: {summary['unrecoverable']}")
    for mode, m in summary["by_mode"].items():
        h = m["heal_s"]
        print(f"  {mode:12} {m['trials']:5d} trials {m['clean']:5d} clean  lost "
              f"{m['acked_writes_lost']}  violations {m['violations']}  unrecoverable "
              f"{m['unrecoverable']}  heal p50 {secs(h['p50'])} p90 {secs(h['p90'])} "
              f"max {secs(h['max'])}")


