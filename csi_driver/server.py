"""Process wiring: build the controller or node process and run it until signalled.

The only module that knows which servicer listens where. Servers are grpc.aio on the uvloop
event loop; a unix socket left behind by a dead process is replaced on bind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from csi_driver._gen import agent_pb2_grpc, csi_pb2_grpc
from csi_driver.agent_auth import (
    AgentAuthInterceptor,
    AgentVerifier,
    load_public_keys,
    load_signer,
)
from csi_driver.config import ControllerConfig, NodeConfig
from csi_driver.controller.kube_api import connect
from csi_driver.controller.node_down import Policy
from csi_driver.controller.node_down_loop import NodeDownResponder
from csi_driver.controller.reconciler import Reconciler
from csi_driver.controller.service import ControllerServicer
from csi_driver.controller.volumes import VolumeService
from csi_driver.identity import IdentityServicer
from csi_driver.locks import VolumeLocks
from csi_driver.node.agent import AgentClients, AgentServicer
from csi_driver.node.attach import choose_attacher
from csi_driver.node.health import HealthServer
from csi_driver.node.membership import Membership
from csi_driver.node.ownership import Ownership
from csi_driver.node.replica_access import StoreReplicaAccess
from csi_driver.node.service import NodeServicer
from csi_driver.node.staging import StagingService
from csi_driver.node.targets import TargetProcesses, local_writers_dir
from csi_driver.replica_decisions import may_delete
from csi_driver.state import errors as store_errors
from csi_driver.state.etcd import EtcdStore
from csi_driver.state.store import Store
from replication.local_writers import LocalWriters
from replication.peer_auth import PeerAuth, load_secret
from replication.peer_tls import load_peer_tls, reload_forever
from replication.pool.base import Pool, open_pool
from replication.replica_server import ReplicaServer

log = logging.getLogger(__name__)

RECONCILE_INTERVAL_S = 5.0
SWEEP_INTERVAL_S = 30.0
# etcd's lessor revokes expired leases in rounds (every 500 ms in 3.4): wait that much past
# the TTL so a stage just after an owner died succeeds on the first call.
CLAIM_WAIT_EXTRA_S = 1.0


def _unix_address(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return f"unix://{path}"


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def run_controller(config: ControllerConfig) -> None:
    # First, so a missing package or Kubernetes config stops us before we serve (exit 2).
    kube = (connect(config.kubeconfig, config.kube_api_server)
            if config.node_down_mode != "off" else None)
    store = EtcdStore(list(config.etcd.endpoints), prefix=config.etcd.prefix)
    agents = AgentClients(config.agent_timeout_s, load_signer(config.agent_key_file))
    locks = VolumeLocks()
    volumes = VolumeService(store, agents, locks)
    server = grpc.aio.server()
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityServicer(True, lambda: True), server)
    csi_pb2_grpc.add_ControllerServicer_to_server(
        # reject_unsupported() fills in the RPCs tandem does not implement.
        ControllerServicer(volumes, config.default_replicas),  # type: ignore[abstract]
        server,
    )
    server.add_insecure_port(_unix_address(config.csi_socket))
    await server.start()
    os.chmod(config.csi_socket, 0o600)
    log.info("controller serving csi=%s", config.csi_socket)
    reconciler = asyncio.create_task(_reconcile_forever(Reconciler(
        store, agents, locks, volumes, config.creating_grace_s, config.replace_after_s,
        time.time, time.monotonic,
    )))
    responder = None
    if kube is not None:
        policy = Policy(config.node_down_mode, config.node_down_grace_s,
                        config.node_down_max_fraction)
        responder = asyncio.create_task(NodeDownResponder(store, kube, policy).run_forever())
    try:
        await _wait_for_signal()
    finally:
        reconciler.cancel()
        if responder is not None:
            responder.cancel()
        await server.stop(grace=2)
        await agents.close()
        await store.close()


async def _reconcile_forever(reconciler: Reconciler) -> None:
    while True:
        await asyncio.sleep(RECONCILE_INTERVAL_S)
        try:
            await reconciler.run_once()
        except (store_errors.StoreError, OSError) as exc:
            log.warning("reconcile failed: %s", exc)


async def sweep_orphans(
    store: Store, pool: Pool, node_id: str, forget: Callable[[str], None] = lambda _: None
) -> int:
    """Delete local replicas that no volume record needs: the volume was deleted, or the
    replica was replaced while this node was away and another in-sync replica is alive
    (``replica_decisions.may_delete``). Records name their replicas before the replicas are
    created, so a replica being created is never swept."""
    removed = 0
    live = {v.value.node_id for v in await store.list_nodes()}
    for info in await asyncio.to_thread(pool.list):
        found = await store.get_volume(info.volume_id)  # a store error deletes nothing
        if may_delete(found.value if found else None, node_id, live):
            forget(info.volume_id)
            await asyncio.to_thread(pool.delete, info.volume_id)
            log.info("volume=%s node=%s orphan replica removed", info.volume_id, node_id)
            removed += 1
    return removed


async def _sweep_forever(
    store: Store, pool: Pool, node_id: str, forget: Callable[[str], None]
) -> None:
    while True:
        await asyncio.sleep(SWEEP_INTERVAL_S)
        try:
            await sweep_orphans(store, pool, node_id, forget)
        except (store_errors.StoreError, OSError) as exc:
            log.warning("node=%s orphan sweep failed: %s", node_id, exc)


def _open_pool(config: NodeConfig) -> Pool:
    if config.pool_kind == "file":
        assert config.pool_dir is not None
        return open_pool("file", directory=config.pool_dir, capacity_bytes=config.pool_size)
    return open_pool("lvm", vg=config.lvm_vg, thin_pool=config.lvm_thin_pool)


def _replica_path(pool: Pool, volume_id: str) -> str | None:
    try:
        info = pool.get(volume_id)
    except (ValueError, OSError):
        return None
    return str(info.path) if info is not None else None


async def run_node(config: NodeConfig) -> None:
    pool = _open_pool(config)
    store = EtcdStore(list(config.etcd.endpoints), prefix=config.etcd.prefix)
    targets = TargetProcesses(config, lambda vid: _replica_path(pool, vid))
    targets.adopt()
    await targets.prepare()
    ownership = Ownership(store, config.node_id, config.lease_ttl_s,
                          config.lease_ttl_s + CLAIM_WAIT_EXTRA_S)
    staging = StagingService(
        config.node_id, ownership, targets, choose_attacher(), config.state_dir
    )
    membership = Membership(config, store, pool, staging.staged_count)
    await membership.register()
    auth = PeerAuth(load_secret(config.cluster_secret_file), config.node_id)
    tls = (load_peer_tls(config.tls_cert_file, config.tls_key_file, config.tls_trust_file)
           if config.tls_cert_file and config.tls_key_file else None)
    replicas = ReplicaServer(pool, config.state_dir / "replicas", auth,
                             access=StoreReplicaAccess(store), tls=tls.server if tls else None,
                             local_writers=LocalWriters(local_writers_dir(config.state_dir)))
    await sweep_orphans(store, pool, config.node_id)
    await replicas.start(*config.replica_listen)

    verifier = AgentVerifier(load_public_keys(config.agent_public_key_file),
                             config.agent_address)
    agent_server = grpc.aio.server(interceptors=[AgentAuthInterceptor(verifier)])
    agent_pb2_grpc.add_AgentServicer_to_server(
        AgentServicer(config.node_id, pool, membership.capacity_changed, replicas.forget,
                      store),
        agent_server,
    )
    agent_server.add_insecure_port(config.agent_address)
    await agent_server.start()

    csi_server = grpc.aio.server()
    csi_pb2_grpc.add_IdentityServicer_to_server(IdentityServicer(False, lambda: True), csi_server)
    csi_pb2_grpc.add_NodeServicer_to_server(
        NodeServicer(config.node_id, config.max_volumes, staging), csi_server
    )
    csi_server.add_insecure_port(_unix_address(config.csi_socket))
    await csi_server.start()
    os.chmod(config.csi_socket, 0o600)
    log.info("node=%s serving csi=%s agent=%s", config.node_id, config.csi_socket,
             config.agent_address)
    health = HealthServer(membership.readiness)
    if config.health_listen is not None:
        await health.start(*config.health_listen)
    renewer = asyncio.create_task(membership.run())
    reloader = asyncio.create_task(
        reload_forever(tls, log, f"node={config.node_id}") if tls else asyncio.sleep(0))
    sweeper = asyncio.create_task(_sweep_forever(store, pool, config.node_id, replicas.forget))
    try:
        await _wait_for_signal()
    finally:
        renewer.cancel()
        sweeper.cancel()
        reloader.cancel()
        # Staged volumes' targets are left running (outside Kubernetes; in a pod they die with
        # PID 1): a new node process finds their direct-writer registrations when fencing.
        await targets.close_standby()
        await csi_server.stop(grace=2)
        await agent_server.stop(grace=2)
        await replicas.close()
        await health.close()
        await membership.leave()
        await store.close()
