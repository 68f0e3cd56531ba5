"""Replica verification: compare every replica of a volume region by region, online.

Each replica server hashes its copy (CHECKSUM, observer epoch 0, so it never interferes with
the owner); the digests are compared per block. While the volume is being written, blocks
with writes in flight can differ for a moment, so differing blocks are re-checked a few
times before they count as divergent.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field

from csi_driver.state.store import Store
from replication.messages import DIGEST_SIZE, ChecksumAlgo, Status
from replication.peer_auth import PeerAuth
from replication.replica_client import ReplicaClient

CHUNK = 64 << 20
BLOCK = 1 << 20
RECHECKS = 3
ALGO = ChecksumAlgo.BLAKE2B_128


@dataclass
class ReplicaVerdict:
    node_id: str
    reachable: bool
    differing_bytes: int = 0
    detail: str = ""


@dataclass
class VerifyReport:
    volume_id: str
    size_bytes: int
    reference: str | None
    replicas: list[ReplicaVerdict] = field(default_factory=list)

    isr: tuple[str, ...] = ()

    @property
    def identical(self) -> bool:
        """Every reachable in-sync replica matches the reference.

        Replicas outside the ISR are expected to lag until rebuilt; they are reported, but
        only a difference between in-sync replicas is a divergence.
        """
        return all(
            r.differing_bytes == 0 for r in self.replicas if r.reachable and r.node_id in self.isr
        )


async def _digests(client: ReplicaClient, volume_id: str, offset: int, length: int) -> bytes:
    response = await client.checksum(volume_id, 0, offset, length, BLOCK, ALGO)
    if response.status is not Status.OK:
        raise RuntimeError(f"CHECKSUM failed: {response.status.name}")
    return bytes(response.payload)


def _differing_blocks(a: bytes, b: bytes) -> list[int]:
    size = DIGEST_SIZE[ALGO]
    count = len(a) // size
    return [i for i in range(count) if a[i * size:(i + 1) * size] != b[i * size:(i + 1) * size]]


async def _compare_block(
    ref: ReplicaClient, other: ReplicaClient, volume_id: str, offset: int, length: int
) -> bool:
    for _ in range(RECHECKS):
        a, b = await asyncio.gather(
            _digests(ref, volume_id, offset, length), _digests(other, volume_id, offset, length)
        )
        if a == b:
            return True
        await asyncio.sleep(0.05)
    return False


async def verify_volume(store: Store, volume_id: str, auth: PeerAuth,
                        tls: ssl.SSLContext | None = None) -> VerifyReport:
    found = await store.get_volume(volume_id)
    if found is None:
        raise LookupError(f"volume {volume_id} does not exist")
    record = found.value
    nodes = {v.value.node_id: v.value for v in await store.list_nodes()}
    report = VerifyReport(volume_id, record.size_bytes, None, isr=record.isr)
    clients: dict[str, ReplicaClient] = {}
    for replica in record.replica_nodes():
        node = nodes.get(replica)
        if node is None:
            report.replicas.append(ReplicaVerdict(replica, False, detail="node is down"))
            continue
        host, _, port = node.replica_address.rpartition(":")
        try:
            clients[replica] = await ReplicaClient.connect(host, int(port), auth, tls=tls)
        except Exception as exc:  # any connection failure is a verdict, not a crash
            report.replicas.append(ReplicaVerdict(replica, False, detail=str(exc)))
    try:
        await _compare_all(record.size_bytes, volume_id, record.isr, clients, report)
    finally:
        for client in clients.values():
            client.close()
    return report


async def _compare_all(
    size: int, volume_id: str, isr: tuple[str, ...], clients: dict[str, ReplicaClient],
    report: VerifyReport,
) -> None:
    if not clients:
        return
    reference = next((n for n in isr if n in clients), next(iter(clients)))
    report.reference = reference
    verdicts = {n: ReplicaVerdict(n, True) for n in clients}
    for offset in range(0, size, CHUNK):
        length = min(CHUNK, size - offset)
        digests = dict(zip(clients, await asyncio.gather(
            *(_digests(c, volume_id, offset, length) for c in clients.values())
        ), strict=True))
        for node, digest in digests.items():
            if node == reference:
                continue
            for block in _differing_blocks(digests[reference], digest):
                start = offset + block * BLOCK
                n = min(BLOCK, size - start)
                ref, other = clients[reference], clients[node]
                if not await _compare_block(ref, other, volume_id, start, n):
                    verdicts[node].differing_bytes += n
    for verdict in verdicts.values():
        if verdict.node_id == reference:
            verdict.detail = "reference"
        elif not verdict.differing_bytes:
            verdict.detail = "identical"
        else:
            verdict.detail = "DIVERGENT" if verdict.node_id in isr else "out of sync (not in ISR)"
    report.replicas.extend(verdicts.values())
