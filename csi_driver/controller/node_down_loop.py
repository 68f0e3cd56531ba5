"""The node-down responder's loop in the controller: read, decide, act, once a second.

Each round reads liveness from etcd and the Nodes (with kubelet Leases) from Kubernetes,
asks the pure decision of the configured mode (``node_down`` for the kubelet-gated modes,
``node_down_fenced`` for the fast ones) which pods it needs, lists only those, reads the
tandem volumes those pods name (record and ownership claim, linearizable), decides, and
applies the actions through ``kube_api``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable

from csi_driver.controller import node_down as nd
from csi_driver.controller import node_down_fenced as fenced
from csi_driver.controller.kube_api import KubeApi
from csi_driver.errors import InvalidArgumentError
from csi_driver.state import errors as store_errors
from csi_driver.state.store import Store
from csi_driver.validation import check_volume_id

log = logging.getLogger(__name__)

INTERVAL_S = 1.0
# Volume records change rarely and only matter for nodes this process never saw live.
REFERENCED_REFRESH_S = 15.0


class NodeDownResponder:
    """Every round: liveness from etcd, nodes from Kubernetes, ``node_down.decide``, apply.

    Errors (etcd, API) are logged and the round is retried next time; nothing here stops
    the controller. One log line per action: ``node=... action=...``.
    """

    def __init__(
        self, store: Store, api: KubeApi, policy: nd.Policy,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._api = api
        self._policy = policy
        self._monotonic = monotonic
        self.memory = nd.Memory()
        self._referenced: frozenset[str] | None = None
        self._referenced_at = 0.0
        self._last_error = ""

    async def run_forever(self, interval_s: float = INTERVAL_S) -> None:
        grace = ("none (acts on lapsed claims)" if self._policy.mode in nd.FENCED_MODES
                 else f"{self._policy.grace_s:.0f}s")
        log.info("node-down responder mode=%s grace=%s max-fraction=%g",
                 self._policy.mode, grace, self._policy.max_fraction)
        while True:
            try:
                await self.run_once()
            except Exception as exc:  # never let the responder take the controller down
                self._error("node-down round failed", exc)
            await asyncio.sleep(interval_s)

    async def run_once(self) -> tuple[nd.Action, ...]:
        view = await self._tandem_view()
        if view is None:
            return ()
        is_fenced = self._policy.mode in nd.FENCED_MODES
        try:
            nodes = await asyncio.to_thread(self._api.nodes, not is_fenced)
        except Exception as exc:
            self._error("node-down: listing nodes failed", exc)
            return ()
        now = self._monotonic()
        needed = (fenced.pods_needed(self._policy, nodes, view, self.memory) if is_fenced
                  else nd.pods_needed(now, self._policy, nodes, view, self.memory))
        pods: dict[str, list[nd.PodFacts]] = {}
        complete = True
        for name in sorted(needed):
            try:
                pods[name] = await asyncio.to_thread(self._api.pod_facts, name)
            except Exception as exc:
                complete = False
                self._error(f"node={name} node-down: listing pods failed", exc)
        if is_fenced:
            handles = {h for facts in pods.values() for f in facts for h in f.tandem_volumes}
            volumes = await self._volume_facts(handles)
            if volumes is None:
                return ()
            view = nd.TandemView(view.live, view.referenced, volumes)
        if complete:
            self._last_error = ""  # the next failure is news again
        decision = (fenced.decide(self._policy, nodes, view, pods, self.memory) if is_fenced
                    else nd.decide(now, self._policy, nodes, view, pods, self.memory))
        self.memory = decision.memory
        uids = {n.name: n.uid for n in nodes}
        skip_events: set[str] = set()  # the action an event reports failed or did nothing
        for action in decision.actions:
            if isinstance(action, nd.Event) and action.node in skip_events:
                continue
            try:
                if not await self._apply(action, uids):
                    skip_events.add(action.node)
            except Exception as exc:
                skip_events.add(action.node)
                log.warning("node=%s action=%s failed: %s", action.node, _name(action), exc)
        return decision.actions

    async def _volume_facts(self, handles: Iterable[str]) -> dict[str, nd.VolumeFacts] | None:
        """Record and claim of each volume (read after the pods, so a claim seen lapsed was
        lapsed after the pod listing); a handle without a record is left out. None when
        etcd cannot be read (then nothing is decided)."""
        facts: dict[str, nd.VolumeFacts] = {}
        try:
            for handle in sorted(handles):
                if not _well_formed(handle):  # a hand-made PV can name anything
                    continue
                record = await self._store.get_volume(handle)
                if record is None:
                    continue
                claim = await self._store.get_owner(handle)
                facts[handle] = nd.VolumeFacts(handle, claim.node_id if claim else None,
                                               frozenset(record.value.isr))
        except store_errors.StoreError as exc:
            self._error("node-down: etcd unreadable, no decision this round", exc)
            return None
        return facts

    async def _apply(self, action: nd.Action, uids: dict[str, str]) -> bool:
        """Carry out one action; False when it turned out to be a no-op."""
        if isinstance(action, nd.ApplyTaint):
            done = await asyncio.to_thread(self._api.apply_taint, action.node)
            log.info("node=%s action=apply-taint taint=%s:%s applied=%s", action.node,
                     nd.TAINT_KEY, nd.TAINT_EFFECT, done)
            return done
        if isinstance(action, nd.RemoveTaint):
            done = await asyncio.to_thread(self._api.remove_taint, action.node)
            log.info("node=%s action=remove-taint taint=%s:%s removed=%s", action.node,
                     nd.TAINT_KEY, nd.TAINT_EFFECT, done)
            return done
        if isinstance(action, nd.DeletePods):
            deleted = [p for p in action.pods
                       if await asyncio.to_thread(self._api.delete_pod, p)]
            log.info("node=%s action=delete-pods grace=0 pods=%s deleted=%d", action.node,
                     ",".join(str(p) for p in action.pods), len(deleted))
            return bool(deleted)
        await asyncio.to_thread(self._api.create_event, action.node, uids.get(action.node, ""),
                                action.reason, action.message, action.type)
        log.info("node=%s action=event type=%s reason=%s", action.node, action.type,
                 action.reason)
        return True

    async def _tandem_view(self) -> nd.TandemView | None:
        """Liveness from etcd; None when etcd cannot be read (then nothing is decided)."""
        try:
            live = frozenset(v.value.node_id for v in await self._store.list_nodes())
            now = self._monotonic()
            if self._referenced is None or now - self._referenced_at >= REFERENCED_REFRESH_S:
                named: set[str] = set()
                for versioned in await self._store.list_volumes():
                    record = versioned.value
                    named.update(record.replica_nodes(), record.isr)
                    if record.owner:
                        named.add(record.owner)
                self._referenced, self._referenced_at = frozenset(named), now
        except store_errors.StoreError as exc:
            self._error("node-down: etcd unreadable, no decision this round", exc)
            return None
        return nd.TandemView(live=live, referenced=self._referenced)

    def _error(self, what: str, exc: BaseException) -> None:
        text = f"{what}: {exc}"
        if text != self._last_error:
            log.warning("%s", text)
            self._last_error = text
        else:
            log.debug("%s", text)


def _name(action: nd.Action) -> str:
    return {nd.ApplyTaint: "apply-taint", nd.RemoveTaint: "remove-taint",
            nd.DeletePods: "delete-pods", nd.Event: "event"}[type(action)]


def _well_formed(handle: str) -> bool:
    try:
        check_volume_id(handle)
    except InvalidArgumentError:
        return False
    return True
