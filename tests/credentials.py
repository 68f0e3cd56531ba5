"""Credentials for tests: a cluster secret per test run, and PeerAuth for any node id.

The replication data plane refuses anonymous peers, so every test client and server
authenticates like a real node does: with a secret file of mode 0600.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from devtools.devcluster import cluster_secret_path, load_spec
from devtools.devcluster.cluster import tls_paths
from replication.peer_auth import PeerAuth, load_secret
from replication.peer_tls import load_peer_tls

SECRET = os.urandom(32).hex().encode()  # this test run's cluster secret


def auth(node_id: str, secret: bytes = SECRET) -> PeerAuth:
    return PeerAuth(secret, node_id)


def write_secret(path: Path, secret: bytes = SECRET) -> Path:
    """``secret`` in ``path`` (mode 0600), as a replica server's --secret-file."""
    path.write_bytes(secret + b"\n")
    path.chmod(0o600)
    return path


def cluster_auth(cluster_dir: str | Path, node_id: str = "tandem-verify") -> PeerAuth:
    """Credentials of a dev cluster (its up() made the secret)."""
    return PeerAuth(load_secret(cluster_secret_path(Path(cluster_dir))), node_id)


def cluster_tls(cluster_dir: str | Path) -> ssl.SSLContext | None:
    """A dev cluster's replication TLS client context, if it runs with TLS."""
    if not load_spec(Path(cluster_dir)).replication_tls:
        return None
    return load_peer_tls(*tls_paths(Path(cluster_dir))).client
