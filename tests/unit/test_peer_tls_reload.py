"""``PeerTls.reload_if_changed``: contexts are built only for files whose bytes changed, a
broken renewal keeps the loaded pair and is reported once (the handshakes over reloaded
contexts: tests/integration/test_replica_tls.py)."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest

from csi_driver.credentials import new_tls_pair
from replication import peer_tls
from replication.peer_tls import PeerTls, TlsConfigError, load_peer_tls


def install(directory: Path, key: bytes, cert: bytes) -> None:
    (directory / "tls.crt").write_bytes(cert)
    (directory / "tls.key").write_bytes(key)
    (directory / "tls.key").chmod(0o600)


def trusted(tls: PeerTls) -> list[object]:
    return [c["subject"] for c in tls.server.get_ca_certs()]


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list[ssl.Purpose]:
    """The purposes of the SSL contexts peer_tls builds from now on."""
    purposes: list[ssl.Purpose] = []
    real = peer_tls._context

    def counting(purpose: ssl.Purpose, cert: Path, key: Path, trust: str) -> ssl.SSLContext:
        purposes.append(purpose)
        return real(purpose, cert, key, trust)

    monkeypatch.setattr(peer_tls, "_context", counting)
    return purposes


def test_contexts_are_built_only_when_the_bytes_change(
        tmp_path: Path, built: list[ssl.Purpose]) -> None:
    old_key, old_crt = new_tls_pair()
    install(tmp_path, old_key, old_crt)
    tls = load_peer_tls(tmp_path / "tls.crt", tmp_path / "tls.key")
    built.clear()
    assert not tls.reload_if_changed()  # nothing changed
    install(tmp_path, old_key, old_crt)  # rewritten with the same bytes
    os.utime(tmp_path / "tls.crt", ns=(1, 1))
    assert not tls.reload_if_changed()
    assert built == []
    new_key, new_crt = new_tls_pair()
    install(tmp_path, new_key, new_crt + old_crt)  # a renewal, trusting both
    before = trusted(tls)
    assert tls.reload_if_changed()
    assert len(built) == 1  # one scratch context checks the files; ours are reloaded
    assert len(trusted(tls)) == len(before) + 1
    assert not tls.reload_if_changed()


def test_a_broken_renewal_keeps_the_loaded_pair_and_is_reported_once(
        tmp_path: Path, built: list[ssl.Purpose]) -> None:
    key, crt = new_tls_pair()
    install(tmp_path, key, crt)
    tls = load_peer_tls(tmp_path / "tls.crt", tmp_path / "tls.key")
    before = trusted(tls)
    (tmp_path / "tls.crt").write_bytes(b"not a certificate\n")
    with pytest.raises(TlsConfigError):
        tls.reload_if_changed()
    assert not tls.reload_if_changed()  # the same broken files: not tried, not reported again
    assert trusted(tls) == before
    (tmp_path / "tls.key").unlink()  # a swap half done: another state, reported once too
    with pytest.raises(TlsConfigError, match="TLS files"):
        tls.reload_if_changed()
    assert not tls.reload_if_changed()
    built.clear()
    install(tmp_path, key, crt)  # back to what is loaded: nothing to build
    assert not tls.reload_if_changed()
    assert built == [] and trusted(tls) == before
