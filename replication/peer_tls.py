"""TLS for replication connections: confidentiality and integrity of every frame after
the handshake (issue 11), on top of ``peer_auth``'s node identity.

The cluster has one TLS key pair (``tls.key``, ``tls.crt``, made by ``tandem credentials
generate``) that every node holds, like the cluster secret: both ends present it and accept
only certificates in the trust file (``tls.crt``; during a rotation it holds the old and the
new certificate, and each node presents the first pair it is given). There are no host names
to check: who the peer is, is what the HMAC handshake inside the TLS channel proves.

TLS 1.3 only (AES-GCM or ChaCha20-Poly1305, forward secrecy). Renewed files (cert-manager
renews before expiry; kubelet swaps the Secret's files at once) are picked up without a
restart (``reload_forever``). Must not: open sockets or read anything but the files it is
given.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

SERVER_NAME = "tandem-replication"  # SNI only: certificates are checked against the trust file


class TlsConfigError(ValueError):
    """A TLS file is missing, malformed, or its key readable by others."""


RELOAD_CHECK_S = 30.0  # how often the processes look for renewed files

Stamp = tuple[tuple[int, int], ...]


def _stamp(paths: tuple[Path, ...]) -> Stamp:
    """(mtime_ns, size) of each file; one that cannot be looked at is (-1, -errno), so a
    missing file is one more state to compare, not an error of its own."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError as exc:
            out.append((-1, -(exc.errno or 0)))
        else:
            out.append((st.st_mtime_ns, st.st_size))
    return tuple(out)


@dataclass(frozen=True)
class _Files:
    """What the TLS files hold at one moment, read and checked once."""

    stamp: Stamp  # taken before reading: a later change shows as a new stamp
    digest: bytes  # of all three files' bytes: a rewrite with the same bytes is no change
    trusted: str


def _read(cert: Path, key: Path, trust: Path) -> _Files:
    stamp = _stamp((cert, key, trust))
    try:
        if os.stat(key).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise TlsConfigError(f"TLS key {key} is accessible to group or others: chmod 600 it")
        blobs = [path.read_bytes() for path in (cert, key, trust)]
        trusted = blobs[2].decode("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise TlsConfigError(f"TLS files: {exc}") from None
    digest = hashlib.sha256(b"".join(hashlib.sha256(b).digest() for b in blobs)).digest()
    return _Files(stamp, digest, trusted)


@dataclass
class PeerTls:
    """The contexts for both ends of a replication connection, and the files behind them."""

    server: ssl.SSLContext
    client: ssl.SSLContext
    files: tuple[Path, Path, Path]  # certificate, key, trust
    loaded: _Files  # what the contexts hold
    rejected: Stamp | None = None  # files found unusable: not looked at again until they change

    def reload_if_changed(self) -> bool:
        """Read the files again into the same contexts when they changed (a renewal by
        cert-manager, a rotation step): new connections use them, open ones keep theirs.
        False when nothing changed (no context is built then). TlsConfigError when the
        new files are unusable: the loaded pair stays, and the same files are not tried
        (nor reported) again until they change. Trust only grows: dropping an anchor
        needs a restart."""
        stamp = _stamp(self.files)
        if stamp in (self.loaded.stamp, self.rejected):
            return False
        cert, key, trust = self.files
        try:
            fresh = _read(cert, key, trust)
            if fresh.digest == self.loaded.digest:  # touched or rewritten, not changed
                self.loaded, self.rejected = fresh, None
                return False
            # One scratch context proves the files usable before ours are touched.
            _context(ssl.Purpose.CLIENT_AUTH, cert, key, fresh.trusted)
            for ctx in (self.server, self.client):
                _load(ctx, cert, key, fresh.trusted)
        except TlsConfigError:
            self.rejected = stamp
            raise
        self.loaded, self.rejected = fresh, None
        return True


def load_peer_tls(cert_file: Path, key_file: Path, trust_file: Path | None = None) -> PeerTls:
    """Contexts presenting ``cert_file``/``key_file`` and trusting ``trust_file`` (default:
    the certificate file itself, which may hold several certificates while rotating; with
    cert-manager, its ``ca.crt``)."""
    cert, key = Path(cert_file), Path(key_file)
    trust = Path(trust_file or cert_file)
    files = _read(cert, key, trust)
    return PeerTls(_context(ssl.Purpose.CLIENT_AUTH, cert, key, files.trusted),
                   _context(ssl.Purpose.SERVER_AUTH, cert, key, files.trusted),
                   (cert, key, trust), files)


async def reload_forever(tls: PeerTls, log: logging.Logger, what: str) -> None:
    """Check for renewed TLS files every RELOAD_CHECK_S (a task of the node and targets);
    unusable files are logged once, not at every check, until they change again."""
    while True:
        await asyncio.sleep(RELOAD_CHECK_S)
        try:
            if tls.reload_if_changed():
                log.info("%s: replication TLS files reloaded", what)
        except TlsConfigError as exc:
            log.error("%s: replication TLS files not reloaded (keeping the loaded ones): %s",
                      what, exc)


def _context(purpose: ssl.Purpose, cert: Path, key: Path, trusted: str) -> ssl.SSLContext:
    server = purpose is ssl.Purpose.CLIENT_AUTH
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED  # both ways: a peer without the cluster cert gets nothing
    _load(ctx, cert, key, trusted)
    return ctx


def _load(ctx: ssl.SSLContext, cert: Path, key: Path, trusted: str) -> None:
    try:
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(cadata=trusted)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise TlsConfigError(f"TLS files {cert}, {key}: {exc}") from None
