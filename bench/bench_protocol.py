"""Benchmark of the replication codec on its hot path: 4 KiB WRITE frames.

Owns: nothing the product imports; run ``.venv/bin/python bench/bench_protocol.py``.
Must not: be imported by the driver or the tests.

Frames go through a client and a server ``Connection`` in batches, as a pipelining target
would send them (one ``writelines`` per event-loop tick, several frames per TCP read), and
each stage is timed on its own so a regression shows where it is.
"""

from __future__ import annotations

import argparse
import time

from replication.messages import Flag, Op, Request, Response, Role
from replication.payloads import Hello
from replication.protocol import Connection


def _connected(checksums: bool) -> tuple[Connection, Connection]:
    client = Connection(Role.CLIENT, payload_checksums=checksums)
    server = Connection(Role.SERVER, payload_checksums=checksums)
    server.receive_data(client.send(Request(Op.HELLO, 0, payload=Hello("bench-a").encode())))
    client.receive_data(server.send(Response(Op.HELLO, 0, payload=Hello("bench-b").encode())))
    return client, server


def run(frames: int, batch: int, checksums: bool) -> dict[str, float]:
    """Seconds spent per stage for ``frames`` WRITEs and their replies."""
    client, server = _connected(checksums)
    payload = bytes(range(256)) * 16  # 4 KiB
    spent = dict.fromkeys(("encode", "decode", "reply_encode", "reply_decode"), 0.0)
    rid = 1
    for _ in range(frames // batch):
        t0 = time.perf_counter()
        parts: list[bytes | bytearray | memoryview] = []
        for i in range(batch):
            parts += client.encode_request(
                Op.WRITE, rid + i, "pvc-0123456789", 7, (rid + i) * 4096, 4096, Flag.NONE, payload
            )
        t1 = time.perf_counter()
        wire = b"".join(parts)  # what the kernel hands the peer; not codec time
        t2 = time.perf_counter()
        requests = server.receive_data(wire)
        t3 = time.perf_counter()
        replies: list[bytes | bytearray | memoryview] = []
        for req in requests:
            assert isinstance(req, Request) and req.op is Op.WRITE
            replies += server.encode_response(Op.WRITE, req.request_id, epoch=7)
        t4 = time.perf_counter()
        responses = client.receive_data(b"".join(replies))
        t5 = time.perf_counter()
        assert len(requests) == len(responses) == batch
        spent["encode"] += t1 - t0
        spent["decode"] += t3 - t2
        spent["reply_encode"] += t4 - t3
        spent["reply_decode"] += t5 - t4
        rid += batch
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=64, help="frames per TCP read")
    args = parser.parse_args()
    for checksums in (True, False):
        spent = run(args.frames, args.batch, checksums)
        n = args.frames
        write_path = spent["encode"] + spent["decode"]
        total = sum(spent.values())
        print(f"payload checksums {'on ' if checksums else 'off'}: {n} x 4 KiB WRITE")
        for stage, secs in spent.items():
            print(f"  {stage:13s} {n / secs:>12,.0f} frames/s  {secs / n * 1e6:6.2f} us/frame")
        print(f"  encode+decode {n / write_path:>12,.0f} frames/s  (WRITE requests)")
        print(f"  round trip    {n / total:>12,.0f} writes/s  (request and reply, both ends)")


if __name__ == "__main__":
    main()
