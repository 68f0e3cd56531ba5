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

Rotation: a secret file may hold several secrets, one per line; the first is the one this
node proves with, every one is accepted from peers. Add the new secret second everywhere,
then move it first everywhere, then drop the old one (docs/security.md): no two nodes ever
stop understanding each other.

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


def load_secret(path: Path) -> list[bytes]:
    """The cluster secrets in ``path``, one per line (the first is current): each at least
    32 bytes; the file not accessible to group or others."""
    try:
        st = os.stat(path)
        lines = Path(path).read_bytes().split(b"\n")
    except OSError as exc:
        raise SecretError(f"cluster secret {path}: {exc.strerror or exc}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(f"cluster secret {path} is accessible to group or others "
                          f"(mode {st.st_mode & 0o777:o}): chmod 600 it")
    secrets = [line.strip() for line in lines if line.strip()]
    if not secrets:
        raise SecretError(f"cluster secret {path} is empty (tandem credentials generate)")
    for i, secret in enumerate(secrets, 1):
        if len(secret) < MIN_SECRET_BYTES:
            raise SecretError(f"cluster secret {path}: line {i} holds {len(secret)} bytes; at "
                              f"least {MIN_SECRET_BYTES} are needed (tandem credentials "
                              "generate)")
    return secrets


def generate_secret() -> bytes:
    """A new cluster secret: 48 random bytes, hex (one line, no newline in it)."""
    return os.urandom(48).hex().encode()


def _field(value: bytes) -> bytes:
    return len(value).to_bytes(2, "big") + value


class PeerAuth:
    """This node's credentials for the handshake (one per process; connections share it)."""

    def __init__(self, secret: bytes | list[bytes], node_id: str,
                 random: Callable[[int], bytes] = os.urandom) -> None:
        """``secret``: one secret, or several (rotation): we prove with the first, accept
        proofs made with any."""
        secrets = [secret] if isinstance(secret, bytes) else list(secret)
        if not secrets or any(len(s) < MIN_SECRET_BYTES for s in secrets):
            raise SecretError(f"a cluster secret must be at least {MIN_SECRET_BYTES} bytes")
        self.node_id = node_id
        self._keys = [hmac.new(s, _KDF_LABEL, hashlib.sha256).digest() for s in secrets]
        self._random = random

    def nonce(self) -> bytes:
        value = self._random(NONCE_SIZE)
        if len(value) != NONCE_SIZE:
            raise ValueError("the random source gave a short nonce")
        return value

    def mac(self, role: str, client: str, server: str, nonce_c: bytes, nonce_s: bytes) -> bytes:
        """The proof ``role`` ("client" or "server") sends over the whole transcript."""
        return _mac(self._keys[0], role, client, server, nonce_c, nonce_s)

    def verify(self, proof: bytes, role: str, client: str, server: str, nonce_c: bytes,
               nonce_s: bytes) -> bool:
        ok = False
        for key in self._keys:  # every key, always: the time taken says nothing about which
            ok |= hmac.compare_digest(proof, _mac(key, role, client, server, nonce_c, nonce_s))
        return ok


def _mac(key: bytes, role: str, client: str, server: str, nonce_c: bytes,
         nonce_s: bytes) -> bytes:
    message = b"".join(_field(v) for v in (role.encode(), client.encode(), server.encode(),
                                           nonce_c, nonce_s))
    return hmac.new(key, message, hashlib.sha256).digest()
