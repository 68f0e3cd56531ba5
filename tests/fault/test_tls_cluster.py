"""A dev cluster with replication over TLS (issue 11): the whole path (stage, write,
kill the owner, take over, rebuild, verify) works encrypted, and nothing is lost."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from devtools import devcluster
from devtools.failover_bench import run_trial
from devtools.fault_modes import run_fault_trial
from tests.fault.conftest import LEASE_TTL_S, Fault, harness, running_cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[devcluster.ClusterSpec]:
    with running_cluster(tmp_path_factory, "fault-tls", LEASE_TTL_S, tls=True) as spec:
        yield spec


@pytest.fixture
def fault(tls_cluster: devcluster.ClusterSpec) -> Iterator[Fault]:
    with harness(tls_cluster) as h:
        yield h


def test_failover_and_rebuild_over_tls_lose_nothing(fault: Fault) -> None:
    assert fault.spec.replication_tls
    rng = random.Random()
    kill = run_trial(fault.spec, 1, "sigkill", rng, fault.work / "kill")
    stop = run_fault_trial(fault.spec, 2, "replica-stop", rng, fault.work / "stop")
    for result in (kill, stop):
        assert result.ok, result.line() + " " + "; ".join(result.errors + result.violations)
    vid, (node, _, _) = fault.create()
    fault.stage_publish(node, vid)
    assert fault.verify(vid).identical  # tandem volume verify speaks TLS too
