"""Dev-cluster networking: bridge, per-node namespaces and veths, nft partitions.

Owns every ``ip`` / ``nft`` command the dev cluster runs, and the naming and addressing
scheme: cluster k gets bridge ``tdm<k>`` with 10.213.k.1/24 in the root namespace; node i
gets namespace ``tdm<k>-n<i>``, a veth ``tdm<k>n<i>h`` (host side, in the bridge) /
``eth0`` (inside) and address 10.213.k.(10+i)/24. No route beyond the /24 is ever added.

It must not start long-lived processes or decide *when* to create or delete anything
(that is cluster.py); it only knows *how*.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from replication import command
from replication.errors import CommandError as CommandError  # what the chokepoint raises

SUBNET_PREFIX = "10.213"
MAX_SUBNETS = 256
PARTITION_TABLE = "tandem_partition"
NETNS_DIR = "/var/run/netns"


def run(argv: Sequence[str], *, stdin: str | None = None, timeout: float = 30.0) -> str:
    """Run a short helper command to completion through the one subprocess chokepoint
    (``replication.command``: LC_ALL=C, reaped, typed errors); return its stdout."""
    data = stdin.encode() if stdin is not None else None
    return command.run(argv, input=data, timeout=timeout).stdout


def _json(argv: Sequence[str]) -> list[dict[str, Any]]:
    out = run(argv).strip()
    return list(json.loads(out)) if out else []


@dataclass(frozen=True)
class Names:
    """Interface, namespace and address naming for cluster k (names <= 15 chars)."""

    k: int

    @property
    def bridge(self) -> str:
        return f"tdm{self.k}"

    @property
    def host_ip(self) -> str:
        return f"{SUBNET_PREFIX}.{self.k}.1"

    def netns(self, i: int) -> str:
        return f"tdm{self.k}-n{i}"

    def veth(self, i: int) -> str:
        return f"tdm{self.k}n{i}h"

    def node_ip(self, i: int) -> str:
        return f"{SUBNET_PREFIX}.{self.k}.{10 + i}"


def can_use_netns() -> bool:
    return os.geteuid() == 0


def link_exists(name: str, netns: str | None = None) -> bool:
    prefix = ["ip", "-n", netns] if netns else ["ip"]
    try:
        run([*prefix, "link", "show", "dev", name])
    except CommandError:
        return False
    return True


def _subnet_in_use(k: int) -> bool:
    net = ipaddress.ip_network(f"{SUBNET_PREFIX}.{k}.0/24")
    for link in _json(["ip", "-j", "-4", "addr", "show"]):
        for addr in link.get("addr_info", []):
            if ipaddress.ip_address(addr["local"]) in net:
                return True
    return False


def _netns_taken(k: int) -> bool:
    # A namespace left by a crashed cluster whose bridge is gone still blocks its index.
    if not os.path.isdir(NETNS_DIR):
        return False
    return any(name.startswith(f"tdm{k}-") for name in os.listdir(NETNS_DIR))


def create_bridge() -> Names:
    """Create the first free ``tdm<k>`` bridge; creation itself is the cross-process lock."""
    for k in range(MAX_SUBNETS):
        names = Names(k)
        if link_exists(names.bridge) or _netns_taken(k) or _subnet_in_use(k):
            continue
        try:
            run(["ip", "link", "add", names.bridge, "type", "bridge"])
        except CommandError:
            if link_exists(names.bridge):
                continue  # another cluster won the race for this index
            raise
        return names
    raise CommandError(("ip", "link", "add", "tdm<k>"), 1, "all 10.213.k.0/24 subnets in use")


def configure_bridge(names: Names) -> None:
    run(["ip", "addr", "add", f"{names.host_ip}/24", "dev", names.bridge])
    run(["ip", "link", "set", names.bridge, "up"])


def create_netns(name: str) -> None:
    run(["ip", "netns", "add", name])


def create_veth(names: Names, i: int) -> None:
    """Veth pair: host end enslaved to the bridge, peer born inside the node namespace."""
    ns, veth = names.netns(i), names.veth(i)
    run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
    run(["ip", "link", "set", veth, "master", names.bridge, "up"])
    run(["ip", "-n", ns, "addr", "add", f"{names.node_ip(i)}/24", "dev", "eth0"])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    run(["ip", "-n", ns, "link", "set", "eth0", "up"])


def set_node_link(veth: str, netns: str, up: bool) -> None:
    state = "up" if up else "down"
    run(["ip", "link", "set", veth, state])
    run(["ip", "-n", netns, "link", "set", "eth0", state])


def node_link_up(veth: str, netns: str) -> bool | None:
    """True when both ends are administratively up; None when either end is missing."""
    if not (netns_exists(netns) and link_exists(veth) and link_exists("eth0", netns)):
        return None
    host = _json(["ip", "-j", "link", "show", "dev", veth])
    inner = _json(["ip", "-n", netns, "-j", "link", "show", "dev", "eth0"])
    return all("UP" in link[0].get("flags", []) for link in (host, inner))


def netns_exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))


def netns_pids(name: str) -> list[int]:
    if not netns_exists(name):
        return []
    return [int(p) for p in run(["ip", "netns", "pids", name]).split()]


def nsenter_prefix(netns: str) -> list[str]:
    # nsenter --net only switches the network namespace; `ip netns exec` would also
    # unshare the mount namespace and hide the node's mounts from everyone else.
    return ["nsenter", f"--net={NETNS_DIR}/{netns}", "--"]


def delete_netns(name: str) -> None:
    if netns_exists(name):
        run(["ip", "netns", "del", name])


def delete_link(name: str) -> None:
    if not link_exists(name):
        return
    try:
        run(["ip", "link", "del", name])
    except CommandError:
        # A veth vanishes on its own, asynchronously, when its peer's namespace dies.
        if link_exists(name):
            raise


def partition_ruleset(drop_hosts: Sequence[str], drop_tcp: Sequence[tuple[str, int]]) -> str:
    """An nft script (re)defining the partition table: drop the given peers both ways."""
    inbound: list[str] = []
    outbound: list[str] = []
    if drop_hosts:
        hosts = ", ".join(drop_hosts)
        inbound.append(f"ip saddr {{ {hosts} }} drop")
        outbound.append(f"ip daddr {{ {hosts} }} drop")
    for host, port in drop_tcp:
        inbound.append(f"ip saddr {host} tcp sport {port} drop")
        outbound.append(f"ip daddr {host} tcp dport {port} drop")
    table = f"inet {PARTITION_TABLE}"
    # "add" then "delete" makes the delete safe when the table does not exist yet; the
    # whole script is one nft transaction, so rules never half-apply.
    lines = [f"add table {table}", f"delete table {table}", f"table {table} {{"]
    for chain, hook, rules in (("input", "input", inbound), ("output", "output", outbound)):
        lines.append(f"  chain {chain} {{")
        lines.append(f"    type filter hook {hook} priority -10; policy accept;")
        lines.extend(f"    {rule}" for rule in rules)
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def apply_partition(netns: str, ruleset: str) -> None:
    run([*nsenter_prefix(netns), "nft", "-f", "-"], stdin=ruleset)


def remove_partition(netns: str) -> None:
    if has_partition(netns):
        run([*nsenter_prefix(netns), "nft", "delete", "table", "inet", PARTITION_TABLE])


def has_partition(netns: str) -> bool:
    if not netns_exists(netns):
        return False
    tables = run([*nsenter_prefix(netns), "nft", "list", "tables"])
    return f"table inet {PARTITION_TABLE}" in tables.splitlines()
