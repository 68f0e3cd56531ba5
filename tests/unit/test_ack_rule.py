"""The acknowledgement rule (I1, I1a) from tables: replication/ack_rule.py."""

from __future__ import annotations

import pytest

from replication.ack_rule import FailurePlan, plan_failure, write_refusal


@pytest.mark.parametrize(("isr", "min_in_sync", "refused"), [
    (["a", "b", "c"], 1, False),
    (["a"], 1, False),
    ([], 1, True),  # never acknowledge into nothing
    ([], 0, True),  # a nonsense minimum does not open that door
    (["a"], 2, True),
    (["a", "b"], 2, False),
])
def test_write_refusal(isr: list[str], min_in_sync: int, refused: bool) -> None:
    assert (write_refusal(isr, min_in_sync) is not None) is refused


KEEP = "every in-sync replica"


@pytest.mark.parametrize(("isr", "failed", "dropping", "remove", "fence"), [
    (["a", "b", "c"], {"c"}, (), ("c",), False),
    (["a", "b", "c"], {"b", "c"}, (), ("b", "c"), False),
    (["a", "b", "c"], {"a", "b", "c"}, (), (), True),  # disk full everywhere: keep them all
    (["a"], {"a"}, (), (), True),  # a 1-replica volume keeps its only copy
    (["a", "b", "c"], {"b", "c"}, {"a"}, (), True),  # a's removal in flight: none would stay
    (["a", "b"], {"r"}, (), (), False),  # a rebuilding member failed: not in the ISR
    (["a", "b"], set(), (), (), False),
])
def test_plan_failure(isr: list[str], failed: set[str], dropping: set[str] | tuple[()],
                      remove: tuple[str, ...], fence: bool) -> None:
    plan = plan_failure(isr, failed, dropping)
    assert plan.remove == remove
    assert (plan.fence is not None) is fence
    if fence:
        assert plan.fence is not None and plan.fence.startswith(KEEP)


def test_plan_is_a_value() -> None:
    assert plan_failure(["a"], {"b"}) == FailurePlan((), None)
