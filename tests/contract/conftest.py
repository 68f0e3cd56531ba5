"""Fixtures for store contract tests: one spec, every Store implementation, no mocks.

``open_store`` is parametrized over the backends (``[etcd]``, ``[memory]``): a test that
uses it states a guarantee of the Store contract and runs against real etcd processes on
loopback and against MemoryStore. Tests of etcd specifics (its wire, restarts, endpoint
failover, key prefixes, LeaseKeeper) use ``open_etcd_store``. One etcd serves the whole
session (tests isolate themselves by key prefix), started only if a test needs it; tests
that kill etcd get a private one. Teardown always stops and reaps the process, even when
the test or the start itself failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc.aio
import pytest

from csi_driver._gen import etcd_pb2, etcd_pb2_grpc
from csi_driver.state.etcd import EtcdStore
from csi_driver.state.etcd_server import ETCD_BINARY, EtcdServer
from csi_driver.state.memory import MemoryStore
from csi_driver.state.store import Store

T = TypeVar("T")

# Generous: a contract test that needs longer than this is hung, not slow.
TEST_DEADLINE_S = 60.0

BACKENDS = ("etcd", "memory")

StoreOpener = Callable[..., contextlib.AbstractAsyncContextManager[EtcdStore]]
AnyStoreOpener = Callable[..., contextlib.AbstractAsyncContextManager[Store]]


def _require_etcd() -> None:
    if not Path(ETCD_BINARY).is_file():
        # `make test` installs it: a missing etcd is a broken install, not a machine limit.
        pytest.fail(f"{ETCD_BINARY} is not installed (apt-get install etcd-server)")


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    _require_etcd()
    server = EtcdServer(tmp_path_factory.mktemp("etcd-shared") / "data")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def private_etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    """A fresh etcd owned by one test (which may stop or kill it)."""
    _require_etcd()
    server = EtcdServer(tmp_path / "etcd-private")
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def prefix() -> str:
    return f"/test-{uuid.uuid4().hex[:12]}/"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def open_store(backend: str, request: pytest.FixtureRequest) -> AnyStoreOpener:
    """``async with open_store() as store`` -> a Store of this test's backend, closed on exit.

    A MemoryStore runs on the real monotonic clock, as etcd does, so the same timing
    assertions hold for both; each ``open_store()`` is a fresh, empty store.
    """
    if backend == "etcd":
        # Looked up only here, so a memory-only selection (-k memory) starts no etcd.
        opener: AnyStoreOpener = request.getfixturevalue("open_etcd_store")
        return opener

    @contextlib.asynccontextmanager
    async def memory_opener() -> AsyncIterator[Store]:
        store = MemoryStore(time.monotonic)
        try:
            yield store
        finally:
            await store.close()

    return memory_opener


@pytest.fixture
def open_faulty_store(
    backend: str, request: pytest.FixtureRequest
) -> Callable[[], contextlib.AbstractAsyncContextManager[tuple[Store, Callable[[], None]]]]:
    """``async with open_faulty_store() as (store, outage)``: ``outage()`` cuts the store
    off: a private etcd is stopped, a MemoryStore is made unavailable."""

    server: EtcdServer | None = (
        request.getfixturevalue("private_etcd") if backend == "etcd" else None)

    @contextlib.asynccontextmanager
    async def opener() -> AsyncIterator[tuple[Store, Callable[[], None]]]:
        store: Store
        outage: Callable[[], None]
        if server is not None:
            store = EtcdStore([server.endpoint], f"/test-{uuid.uuid4().hex[:12]}/", 1.0)
            outage = server.stop
        else:
            memory = MemoryStore(time.monotonic)
            store, outage = memory, memory.set_unavailable
        try:
            yield store, outage
        finally:
            await store.close()

    return opener


@pytest.fixture
def compact(
    backend: str, request: pytest.FixtureRequest
) -> Callable[[Store, int], Awaitable[None]]:
    """``await compact(store, revision)``: drop the store's history before ``revision``."""

    server: EtcdServer | None = (
        request.getfixturevalue("etcd_server") if backend == "etcd" else None)

    async def compactor(store: Store, revision: int) -> None:
        if isinstance(store, MemoryStore):
            store.compact(revision)
            return
        assert server is not None
        async with grpc.aio.insecure_channel(server.endpoint.removeprefix("http://")) as ch:
            await etcd_pb2_grpc.KVStub(ch).Compact(
                etcd_pb2.CompactionRequest(revision=revision, physical=True))

    return compactor


@pytest.fixture
def open_etcd_store(etcd_server: EtcdServer, prefix: str) -> StoreOpener:
    """``async with open_etcd_store() as store`` -> an EtcdStore closed on exit.

    Defaults to the shared etcd and this test's prefix; pass ``endpoints``,
    ``prefix`` or ``timeout_s`` to override.
    """

    @contextlib.asynccontextmanager
    async def opener(
        endpoints: Sequence[str] | None = None,
        prefix: str = prefix,
        timeout_s: float = 3.0,
    ) -> AsyncIterator[EtcdStore]:
        store = EtcdStore(list(endpoints or [etcd_server.endpoint]), prefix, timeout_s)
        try:
            yield store
        finally:
            await store.close()

    return opener


@pytest.fixture
def run() -> Callable[[Awaitable[T]], T]:
    """Run a test body on a fresh event loop (pytest-asyncio is not a dependency)."""

    def runner(body: Awaitable[Any]) -> Any:
        async def bounded() -> Any:
            return await asyncio.wait_for(body, TEST_DEADLINE_S)

        return asyncio.run(bounded())

    return runner
