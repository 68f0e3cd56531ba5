"""Mutual authentication of replication peers: HMAC-SHA256 challenge-response over a
cluster secret, with nonces from both sides (DRBD's ``cram-hmac-alg``, both directions).

The handshake, carried by the codec (``replication.protocol``)::

    client -> HELLO   node C, token = nonce_c (32 random bytes)
    server -> HELLO   node S, token = nonce_s || HMAC(k, "server" | C | S | nonce_c | nonce_s)
    client -> AUTH    payload  =          HMAC(k, "client" | C | S | nonce_c | nonce_s)
    server -> AUTH    OK: both sides are READY; anything else closes the connection

Each side proves it holds the secret over a transcript that includes the other side's fresh
nonce (no replay), both node ids (the identity the peer claimed is bound to the
connection: the server checks it against the volume record before any data operation) and
its role (no reflection). ``k`` is derived from the secret for this one purpose.

What it does not do: protect the frames after the handshake (an attacker who can rewrite
TCP segments in flight needs TLS, a separate option), or tell apart two nodes that both
hold the secret (root on any node has it; docs/security.md).

Sans-IO: randomness is passed in; no sockets, clocks or files. ``load_secret`` is the one
helper that reads a file, for the processes that start a server or client.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from collections.abc import Callable
from pathlib import Path

NONCE_SIZE = 32
MAC_SIZE = 32
MIN_SECRET_BYTES = 32
_KDF_LABEL = b"tandem replication peer auth v1"


class SecretError(ValueError):
    """The cluster secret is missing, too short, or readable by others."""


def load_secret(path: Path) -> bytes:
    """The cluster secret from ``path``: at least 32 bytes, not readable by group/others."""
    try:
        st = os.stat(path)
        data = Path(path).read_bytes().strip()
    except OSError as exc:
        raise SecretError(f"cluster secret {path}: {exc.strerror or exc}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(f"cluster secret {path} is accessible to group or others "
                          f"(mode {st.st_mode & 0o777:o}): chmod 600 it")
    if len(data) < MIN_SECRET_BYTES:
        raise SecretError(f"cluster secret {path} holds {len(data)} bytes; at least "
                          f"{MIN_SECRET_BYTES} are needed (tandem secret generate)")
    return data


def _field(value: bytes) -> bytes:
    return len(value).to_bytes(2, "big") + value


class PeerAuth:
    """This node's credentials for the handshake (one per process; connections share it)."""

    def __init__(self, secret: bytes, node_id: str,
                 random: Callable[[int], bytes] = os.urandom) -> None:
        if len(secret) < MIN_SECRET_BYTES:
            raise SecretError(f"the cluster secret must be at least {MIN_SECRET_BYTES} bytes")
        self.node_id = node_id
        self._key = hmac.new(secret, _KDF_LABEL, hashlib.sha256).digest()
        self._random = random

    def nonce(self) -> bytes:
        value = self._random(NONCE_SIZE)
        if len(value) != NONCE_SIZE:
            raise ValueError("the random source gave a short nonce")
        return value

    def mac(self, role: str, client: str, server: str, nonce_c: bytes, nonce_s: bytes) -> bytes:
        """The proof ``role`` ("client" or "server") sends over the whole transcript."""
        message = b"".join(_field(v) for v in (role.encode(), client.encode(), server.encode(),
                                               nonce_c, nonce_s))
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def verify(self, proof: bytes, role: str, client: str, server: str, nonce_c: bytes,
               nonce_s: bytes) -> bool:
        return hmac.compare_digest(proof, self.mac(role, client, server, nonce_c, nonce_s))
