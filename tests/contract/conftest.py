"""Fixtures for store contract tests: real etcd processes on loopback, no mocks.

One etcd serves the whole session (tests isolate themselves by key prefix);
tests that kill etcd get a private one. Teardown always stops and reaps the
process, even when the test or the start itself failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from csi_driver.state.etcd import EtcdStore
from csi_driver.state.etcd_server import ETCD_BINARY, EtcdServer

T = TypeVar("T")

# Generous: a contract test that needs longer than this is hung, not slow.
TEST_DEADLINE_S = 60.0

StoreOpener = Callable[..., contextlib.AbstractAsyncContextManager[EtcdStore]]


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


@pytest.fixture
def open_store(etcd_server: EtcdServer, prefix: str) -> StoreOpener:
    """``async with open_store() as store`` -> an EtcdStore closed on exit.

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
