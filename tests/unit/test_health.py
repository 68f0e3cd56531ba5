"""Node readiness (issue 12 #4): the rule from a table, the endpoint over a real socket."""

from __future__ import annotations

import asyncio

import pytest

from csi_driver.node.health import HealthServer, readiness


@pytest.mark.parametrize(("now", "renewed", "pool", "why"), [
    (10.0, 9.0, None, None),
    (10.0, None, None, "not registered"),
    (10.0, 7.9, None, "not renewed for 2.1 s"),  # TTL 2 s: etcd unreachable
    (10.0, 9.5, "vgs failed", "pool unusable: vgs failed"),
])
def test_readiness(now: float, renewed: float | None, pool: str | None,
                   why: str | None) -> None:
    reason = readiness(now, renewed, 2.0, pool)
    assert reason == why if why is None else (reason is not None and why in reason)


async def _get(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    writer.write_eof()
    data = await reader.read()
    writer.close()
    return data


def test_readyz_answers_200_or_503_with_the_reason() -> None:
    state: list[str | None] = [None]

    async def body() -> None:
        server = HealthServer(lambda: state[0])
        await server.start("127.0.0.1", 0)
        try:
            ok = await _get(server.port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert ok.startswith(b"HTTP/1.1 200 OK") and ok.endswith(b"ready\n")
            state[0] = "node lease not renewed for 3.0 s"
            bad = await _get(server.port, b"GET /readyz HTTP/1.1\r\n\r\n")
            assert bad.startswith(b"HTTP/1.1 503") and b"not renewed" in bad
            other = await _get(server.port, b"POST /x HTTP/1.1\r\n\r\n")
            assert other.startswith(b"HTTP/1.1 404")
            junk = await _get(server.port, b"\x00" * 10)  # no request at all: closed
            assert junk == b""
        finally:
            await server.close()

    asyncio.run(body())
