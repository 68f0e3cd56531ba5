"""Replication over TLS (issue 11): data intact through the encrypted channel, and a peer
without the cluster certificate (or with it but without the secret) gets nothing."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from csi_driver.credentials import write_credentials
from replication.errors import ReplicaUnavailableError
from replication.payloads import WriteBatch
from replication.peer_tls import PeerTls, TlsConfigError, load_peer_tls
from replication.pool.file import FilePool
from replication.replica_client import ReplicaClient
from replication.replica_connection import expect_ok
from replication.replica_server import ReplicaServer
from tests.credentials import auth

pytestmark = pytest.mark.integration
MIB = 1 << 20
_T = TypeVar("_T")


def run(coro: Coroutine[Any, Any, _T]) -> _T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def cluster_tls(directory: Path) -> PeerTls:
    write_credentials(directory)
    return load_peer_tls(directory / "tls.crt", directory / "tls.key")


async def serving(tmp_path: Path, tls: ssl.SSLContext) -> ReplicaServer:
    pool = FilePool(tmp_path / "pool", 1 << 30)
    pool.create("vol-t", 64 * MIB)
    server = ReplicaServer(pool, tmp_path / "meta", auth("node-b"), tls=tls)
    await server.start("127.0.0.1", 0)
    return server


def test_data_crosses_the_encrypted_channel_intact(tmp_path: Path) -> None:
    tls = cluster_tls(tmp_path / "creds")

    async def body() -> None:
        server = await serving(tmp_path, tls.server)
        client = await ReplicaClient.connect("127.0.0.1", server.port, auth("node-a"),
                                             tls=tls.client)
        try:
            assert client.node_id == "node-b"
            expect_ok(await client.fence("vol-t", 1))
            big, small = os.urandom(MIB), os.urandom(4096)
            batch = WriteBatch.build([(8 * MIB + i * 4096, os.urandom(4096)) for i in range(64)])
            results = await asyncio.gather(
                client.write("vol-t", 1, 0, big), client.write("vol-t", 1, 2 * MIB, small),
                client.write_batch("vol-t", 1, batch))
            for r in results:
                expect_ok(r)
            expect_ok(await client.flush("vol-t", 1))
            assert bytes(expect_ok(await client.read("vol-t", 1, 0, MIB)).payload) == big
            assert bytes(expect_ok(await client.read("vol-t", 1, 2 * MIB, 4096)).payload) == small
        finally:
            client.close()
            await server.close()
        image = (tmp_path / "pool" / "vol-t.img").read_bytes()
        assert image[:MIB] == big  # what the replica stored, not ciphertext

    run(body())


def test_peers_without_the_cluster_certificate_get_nothing(tmp_path: Path) -> None:
    tls = cluster_tls(tmp_path / "creds")
    other = cluster_tls(tmp_path / "other")  # another cluster's credentials

    async def body() -> None:
        server = await serving(tmp_path, tls.server)
        try:
            with pytest.raises(ReplicaUnavailableError):  # plain text to a TLS port
                await ReplicaClient.connect("127.0.0.1", server.port, auth("node-a"),
                                            connect_timeout_s=2.0)
            with pytest.raises(ReplicaUnavailableError):  # a certificate it does not trust
                await ReplicaClient.connect("127.0.0.1", server.port, auth("node-a"),
                                            tls=other.client, connect_timeout_s=2.0)
            with pytest.raises(ReplicaUnavailableError, match="failed to authenticate"):
                await ReplicaClient.connect(  # the certificate, but not the secret
                    "127.0.0.1", server.port, auth("node-a", b"w" * 32), tls=tls.client)
            assert not server.connections or all(not c.authenticated for c in
                                                 server.connections)
        finally:
            await server.close()

    run(body())


def test_a_tls_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    cluster_tls(tmp_path / "creds")
    (tmp_path / "creds" / "tls.key").chmod(0o644)
    with pytest.raises(TlsConfigError, match="group or others"):
        load_peer_tls(tmp_path / "creds" / "tls.crt", tmp_path / "creds" / "tls.key")


def test_rotation_nodes_one_step_apart_understand_each_other(tmp_path: Path) -> None:
    """docs/security.md's TLS rotation: trust both certificates, then present the new one,
    then drop the old one; nodes one step apart connect both ways."""
    for name in ("old", "new"):
        write_credentials(tmp_path / name)
    pem = {n: (tmp_path / n / "tls.crt").read_text() for n in ("old", "new")}

    def step(present: str, trust: list[str], where: str) -> PeerTls:
        d = tmp_path / where
        d.mkdir()
        (d / "tls.crt").write_text("".join(pem[n] for n in [present, *trust]))
        key = d / "tls.key"
        key.write_bytes((tmp_path / present / "tls.key").read_bytes())
        key.chmod(0o600)
        return load_peer_tls(d / "tls.crt", key)

    steps = [step("old", [], "s0"), step("old", ["new"], "s1"), step("new", ["old"], "s2"),
             step("new", [], "s3")]

    async def connects(server_tls: PeerTls, client_tls: PeerTls, where: Path) -> None:
        server = await serving(where, server_tls.server)
        try:
            client = await ReplicaClient.connect("127.0.0.1", server.port, auth("node-a"),
                                                 tls=client_tls.client)
            client.close()
        finally:
            await server.close()

    async def body() -> None:
        for i in range(3):
            for a, b in ((steps[i], steps[i + 1]), (steps[i + 1], steps[i])):
                await connects(a, b, tmp_path / f"run-{i}-{id(a)}")
        with pytest.raises(ReplicaUnavailableError):  # the ends of the rotation do not
            await connects(steps[0], steps[3], tmp_path / "run-ends")

    run(body())


def test_renewed_files_are_picked_up_without_a_restart(tmp_path: Path) -> None:
    """cert-manager renews before expiry and kubelet swaps the Secret's files: a running
    node reloads them (new connections use them) instead of failing at expiry."""
    for name in ("old", "new"):
        write_credentials(tmp_path / name)
    pem = {n: (tmp_path / n / "tls.crt").read_text() for n in ("old", "new")}
    key = {n: (tmp_path / n / "tls.key").read_bytes() for n in ("old", "new")}
    here = tmp_path / "node"
    here.mkdir()

    def install(present: str, trust: list[str]) -> None:
        (here / "tls.crt").write_text("".join(pem[n] for n in [present, *trust]))
        (here / "tls.key").write_bytes(key[present])
        (here / "tls.key").chmod(0o600)

    install("old", [])
    server_tls = load_peer_tls(here / "tls.crt", here / "tls.key")
    assert not server_tls.reload_if_changed()  # nothing changed yet
    peer = tmp_path / "peer"
    peer.mkdir()
    (peer / "tls.crt").write_text(pem["new"])
    (peer / "tls.key").write_bytes(key["new"])
    (peer / "tls.key").chmod(0o600)
    new_only = load_peer_tls(peer / "tls.crt", peer / "tls.key")

    async def body() -> None:
        server = await serving(tmp_path, server_tls.server)
        try:
            with pytest.raises(ReplicaUnavailableError):  # it knows only the old pair
                await ReplicaClient.connect("127.0.0.1", server.port, auth("node-a"),
                                            tls=new_only.client, connect_timeout_s=2.0)
            install("new", ["old"])  # the renewal lands while the node runs
            assert server_tls.reload_if_changed()
            client = await ReplicaClient.connect("127.0.0.1", server.port, auth("node-a"),
                                                 tls=new_only.client)
            client.close()
        finally:
            await server.close()

    run(body())


def _ca_signed_pair(directory: Path) -> None:
    """What cert-manager's CA issuer makes (deploy/components/cert-manager-tls): a CA, and
    a leaf for client and server auth signed by it; Secret files tls.crt, tls.key, ca.crt."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.datetime.now(datetime.UTC)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("tandem-replication-ca"))
          .issuer_name(name("tandem-replication-ca")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder().subject_name(name("tandem-replication"))
            .issuer_name(ca.subject).public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir()
    pem = serialization.Encoding.PEM
    (directory / "ca.crt").write_bytes(ca.public_bytes(pem))
    (directory / "tls.crt").write_bytes(leaf.public_bytes(pem))
    (directory / "tls.key").write_bytes(leaf_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (directory / "tls.key").chmod(0o600)


def test_a_ca_issued_certificate_with_its_ca_as_trust(tmp_path: Path) -> None:
    _ca_signed_pair(tmp_path / "secret")
    s = tmp_path / "secret"
    tls = load_peer_tls(s / "tls.crt", s / "tls.key", s / "ca.crt")

    async def body() -> None:
        server = await serving(tmp_path, tls.server)
        try:
            client = await ReplicaClient.connect("127.0.0.1", server.port, auth("node-a"),
                                                 tls=tls.client)
            expect_ok(await client.fence("vol-t", 1))
            client.close()
        finally:
            await server.close()

    run(body())
