"""Suite-wide options: ``--run-slow`` runs the tests marked ``slow`` (skipped by default).

It lives here, not in tests/fault/conftest.py, because pytest reads ``pytest_addoption`` only
from conftest files it loads at startup (the root of the test paths).
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False,
                     help="also run the long tests marked slow")
    parser.addoption("--sim-seeds", type=int, default=1000,
                     help="how many seeds the control-plane simulation runs")
    parser.addoption("--sim-seed", type=int, default=None,
                     help="replay one seed of the control-plane simulation (prints its log)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    # Not the machine: a soak of many failovers would not fit the default suite's time budget.
    skip = pytest.mark.skip(
        reason="long soak, outside the default suite's time budget: pass --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
