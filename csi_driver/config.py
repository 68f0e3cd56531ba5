"""Process configuration: frozen dataclasses, validated once at start-up.

Nothing else reads argv or the environment; a bad value is a ``ConfigError`` with a message
that names the flag, and the CLI turns it into exit status 2.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from replication.hold import DEFAULT_HOLD_S

TOPOLOGY_KEY = "tandem.csi.io/node"
DRIVER_NAME = "tandem.csi.io"
DRIVER_VERSION = "0.1.0"
# Ownership/node lease TTL. A takeover waits for the dead owner's lease to lapse, so this is
# the floor of failover time; the owner self-fences 0.5 s before it, so it must also cover
# etcd hiccups (renewals every TTL/3: two may be missed). Integer seconds: etcd grants whole
# seconds, and a fencing clock on 2.5 s over a 2 s (or 3 s) lease has no margin (or a lie).
DEFAULT_LEASE_TTL_S = 2
MAX_LEASE_TTL_S = 600
# The node-down responder (docs/node-down-responder.md). "fenced" acts per pod on tandem's own
# evidence (lapsed claims) and is the default wherever a Kubernetes API is configured. Grace
# (kubelet-gated modes only): 15x the node lease TTL (a node plugin restart or an etcd hiccup
# is not a death), 3 kubelet Lease renewals (10 s each), and under Kubernetes'
# node-monitor-grace-period (40 s; 50 s since 1.32).
NODE_DOWN_MODES = ("off", "fenced", "fenced-taint", "taint", "delete-pods")
DEFAULT_NODE_DOWN_GRACE_S = 30.0
DEFAULT_NODE_DOWN_MAX_FRACTION = 0.5

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class ConfigError(ValueError):
    """A configuration value is missing or invalid."""


def default_node_down_mode(kubeconfig: str | None, environ: Mapping[str, str]) -> str:
    """``fenced`` when the controller can reach a Kubernetes API (in a pod, or given a
    kubeconfig), else ``off``: outside Kubernetes there is nothing to respond to."""
    if kubeconfig or environ.get("KUBERNETES_SERVICE_HOST"):
        return "fenced"
    return "off"


def lease_ttl_arg(text: str) -> int:
    """``--lease-ttl`` as an argparse type: whole seconds in 1..600 ("2" or "2.0"; "2.5"
    is refused with the reason, exit status 2)."""
    try:
        value = float(text)
        check_lease_ttl(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc) if isinstance(exc, ConfigError)
                                         else f"not a number: {text!r}") from None
    return int(value)


def check_lease_ttl(value: float) -> None:
    if not math.isfinite(value) or value != int(value) or not 1 <= value <= MAX_LEASE_TTL_S:
        raise ConfigError(f"--lease-ttl must be whole seconds within 1..{MAX_LEASE_TTL_S} "
                          f"(etcd leases are), got {value}")


def api_server_url(text: str) -> str:
    """An API server URL: https:// (or http://) host[:port], nothing after it."""
    from urllib.parse import urlsplit

    try:
        url = urlsplit(text)
        url.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError:
        url = urlsplit("")
    if url.scheme not in ("https", "http") or not url.hostname or url.path not in ("", "/") \
            or url.query or url.fragment:
        raise argparse.ArgumentTypeError(f"not an API server URL: {text!r} "
                                         "(expected https://HOST[:PORT])")
    return text.rstrip("/")


def parse_size(text: str) -> int:
    """'512M', '2G', '4096', '1GiB' -> bytes (binary units)."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ConfigError(f"invalid size {text!r} (examples: 4096, 512M, 2G)")
    unit = (match.group(2) or "").upper().rstrip("B").rstrip("I")
    return int(match.group(1)) * _UNITS[unit]


def parse_host_port(text: str, flag: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{flag}: expected HOST:PORT, got {text!r}")
    return host, int(port)


def parse_unix_endpoint(text: str, flag: str) -> Path:
    prefix = "unix://"
    if not text.startswith(prefix) or not text[len(prefix):].startswith("/"):
        raise ConfigError(f"{flag}: expected unix:///absolute/path.sock, got {text!r}")
    return Path(text[len(prefix):])


def parse_etcd_endpoints(text: str) -> tuple[str, ...]:
    endpoints = tuple(e.strip() for e in text.split(",") if e.strip())
    if not endpoints:
        raise ConfigError("--etcd-endpoints: at least one endpoint is required")
    for endpoint in endpoints:
        bare = endpoint.removeprefix("http://")
        parse_host_port(bare, "--etcd-endpoints")
    return endpoints


def check_prefix(prefix: str) -> str:
    if not prefix.startswith("/") or not prefix.endswith("/"):
        raise ConfigError(f"--etcd-prefix must start and end with '/', got {prefix!r}")
    return prefix


@dataclass(frozen=True)
class EtcdConfig:
    endpoints: tuple[str, ...]
    prefix: str = "/tandem/"


@dataclass(frozen=True)
class ControllerConfig:
    csi_socket: Path
    etcd: EtcdConfig
    agent_key_file: Path
    default_replicas: int = 3
    agent_timeout_s: float = 10.0
    creating_grace_s: float = 60.0
    replace_after_s: float = 300.0
    node_down_mode: str = "off"
    node_down_grace_s: float = DEFAULT_NODE_DOWN_GRACE_S
    node_down_max_fraction: float = DEFAULT_NODE_DOWN_MAX_FRACTION
    kubeconfig: Path | None = None
    kube_api_server: str | None = None  # overrides the API address (no kube-proxy)

    def __post_init__(self) -> None:
        if not 1 <= self.default_replicas <= 5:
            raise ConfigError("--default-replicas must be within 1..5")
        if self.replace_after_s <= 0:
            raise ConfigError("--replace-dead-after must be > 0 seconds")
        if self.node_down_mode not in NODE_DOWN_MODES:
            raise ConfigError(f"--node-down-responder: expected one of {NODE_DOWN_MODES}, "
                              f"got {self.node_down_mode!r}")
        if not 5 <= self.node_down_grace_s <= 3600:
            raise ConfigError("--node-down-grace must be within 5..3600 s, "
                              f"got {self.node_down_grace_s}")
        if not 0 < self.node_down_max_fraction <= 1:
            raise ConfigError("--node-down-max-fraction must be within (0, 1], "
                              f"got {self.node_down_max_fraction}")


@dataclass(frozen=True)
class NodeConfig:
    node_id: str
    csi_socket: Path
    agent_listen: tuple[str, int]
    replica_listen: tuple[str, int]
    etcd: EtcdConfig
    pool_kind: str
    pool_dir: Path | None
    pool_size: int
    lvm_vg: str | None
    lvm_thin_pool: str | None
    state_dir: Path
    cluster_secret_file: Path
    agent_public_key_file: Path
    lease_ttl_s: int = DEFAULT_LEASE_TTL_S
    max_volumes: int = 0
    hold_io_s: float = DEFAULT_HOLD_S
    # Replication over TLS (replication.peer_tls): both or neither; every node alike.
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_trust_file: Path | None = None  # default: the certificate file itself
    health_listen: tuple[str, int] | None = None  # GET /readyz (csi_driver.node.health)

    def __post_init__(self) -> None:
        if not _NODE_ID_RE.match(self.node_id):
            raise ConfigError(f"--node-id: invalid node id {self.node_id!r}")
        if self.pool_kind not in ("file", "lvm"):
            raise ConfigError(f"--pool: expected 'file' or 'lvm', got {self.pool_kind!r}")
        if self.pool_kind == "file" and (self.pool_dir is None or self.pool_size <= 0):
            raise ConfigError("--pool file needs --pool-dir and a positive --pool-size")
        if self.pool_kind == "lvm" and not self.lvm_vg:
            raise ConfigError("--pool lvm needs --lvm-vg")
        check_lease_ttl(self.lease_ttl_s)
        if not 0 <= self.hold_io_s <= 3600:
            raise ConfigError(f"--hold-io-timeout must be within 0..3600 s, got {self.hold_io_s}")
        if self.max_volumes < 0:
            raise ConfigError("--max-volumes must be >= 0 (0 = unlimited)")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ConfigError("--tls-cert-file and --tls-key-file go together")
        if self.tls_trust_file is not None and self.tls_cert_file is None:
            raise ConfigError("--tls-trust-file needs --tls-cert-file and --tls-key-file")

    @property
    def agent_address(self) -> str:
        return f"{self.agent_listen[0]}:{self.agent_listen[1]}"

    @property
    def replica_address(self) -> str:
        return f"{self.replica_listen[0]}:{self.replica_listen[1]}"
