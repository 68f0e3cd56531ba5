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


def _stamp(paths: tuple[Path, ...]) -> tuple[tuple[int, int], ...]:
    out = []
    for path in paths:
        st = os.stat(path)
        out.append((st.st_mtime_ns, st.st_size))
    return tuple(out)


@dataclass
class PeerTls:
    """The contexts for both ends of a replication connection, and the files behind them."""

    server: ssl.SSLContext
    client: ssl.SSLContext
    files: tuple[Path, Path, Path]  # certificate, key, trust
    stamp: tuple[tuple[int, int], ...] = ()

    def reload_if_changed(self) -> bool:
        """Read the files again into the same contexts when they changed (a renewal by
        cert-manager, a rotation step): new connections use them, open ones keep theirs.
        False when nothing changed; TlsConfigError (the loaded pair stays) when the new
        files are unusable. Trust only grows: dropping an anchor needs a restart."""
        try:
            stamp = _stamp(self.files)
        except OSError as exc:
            raise TlsConfigError(f"TLS files: {exc}") from None
        if stamp == self.stamp:
            return False
        cert, key, trust = self.files
        fresh = load_peer_tls(cert, key, trust)  # checks everything before we touch ours
        for ctx in (self.server, self.client):
            ctx.load_cert_chain(cert, key)
            ctx.load_verify_locations(cadata=Path(trust).read_text("ascii"))
        self.stamp = fresh.stamp
        return True


def load_peer_tls(cert_file: Path, key_file: Path, trust_file: Path | None = None) -> PeerTls:
    """Contexts presenting ``cert_file``/``key_file`` and trusting ``trust_file`` (default:
    the certificate file itself, which may hold several certificates while rotating; with
    cert-manager, its ``ca.crt``)."""
    trust = Path(trust_file or cert_file)
    try:
        if os.stat(key_file).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise TlsConfigError(f"TLS key {key_file} is accessible to group or others: "
                                 "chmod 600 it")
        stamp = _stamp((Path(cert_file), Path(key_file), trust))
        trusted = trust.read_text("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise TlsConfigError(f"TLS files: {exc}") from None
    return PeerTls(_context(ssl.Purpose.CLIENT_AUTH, cert_file, key_file, trusted),
                   _context(ssl.Purpose.SERVER_AUTH, cert_file, key_file, trusted),
                   (Path(cert_file), Path(key_file), trust), stamp)


async def reload_forever(tls: PeerTls, log: logging.Logger, what: str) -> None:
    """Check for renewed TLS files every RELOAD_CHECK_S (a task of the node and targets)."""
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
    try:
        ctx.load_cert_chain(cert, key)
        ctx.load_verify_locations(cadata=trusted)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise TlsConfigError(f"TLS files {cert}, {key}: {exc}") from None
    return ctx
