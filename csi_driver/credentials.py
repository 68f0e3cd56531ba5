"""A cluster's credentials, made in one place: the replication secret every node holds
(``replication.peer_auth``) and the key pair whose private half only the controller holds
(``csi_driver.agent_auth``). ``tandem credentials generate`` and the dev cluster use it.

Files (one directory, 0700): ``cluster-secret`` (0600, nodes), ``tls.key`` (0600) and
``tls.crt`` (nodes: the replication TLS pair, ``replication.peer_tls``), ``agent.key``
(0600, the controller), ``agent.pub`` (0644, nodes). In Kubernetes the same contents live
in two Secrets: ``tandem-credentials`` (cluster-secret, tls.crt, tls.key, agent.pub) for the
node DaemonSet and ``tandem-controller-credentials`` (agent.key) for the controller.
"""

from __future__ import annotations

import base64
import datetime
import os
from pathlib import Path

from csi_driver.agent_auth import generate_key_pair
from replication.atomic_file import write_atomic
from replication.peer_auth import generate_secret

FILES = ("cluster-secret", "tls.key", "tls.crt", "agent.key", "agent.pub")
_PUBLIC = ("tls.crt", "agent.pub")
TLS_VALID_DAYS = 3650


def new_credentials() -> dict[str, bytes]:
    private, public = generate_key_pair()
    tls_key, tls_crt = new_tls_pair()
    return {"cluster-secret": generate_secret() + b"\n", "tls.key": tls_key, "tls.crt": tls_crt,
            "agent.key": f"{private}\n".encode(), "agent.pub": f"{public}\n".encode()}


def new_tls_pair() -> tuple[bytes, bytes]:
    """The cluster's replication TLS key and self-signed certificate (PEM): the one trust
    anchor nodes accept (replication.peer_tls)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    # A name of its own: while rotating, nodes trust two of these certificates, and OpenSSL
    # finds a trust anchor by its subject name (two alike: the second never verifies).
    cn = f"tandem-replication-{os.urandom(6).hex()}"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=TLS_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, False, False,
                                     False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                              ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def write_credentials(directory: Path) -> None:
    """New credentials into ``directory`` (created 0700; refuses to replace existing ones:
    rotation adds lines, docs/security.md)."""
    existing = [name for name in FILES if (directory / name).exists()]
    if existing:
        raise FileExistsError(f"{directory} already holds {', '.join(existing)}")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, data in new_credentials().items():
        write_atomic(directory / name, data, mode=0o644 if name in _PUBLIC else 0o600)


def kubernetes_secrets(namespace: str) -> str:
    """New credentials as the two Secret manifests the deployment mounts."""
    creds = new_credentials()

    def secret(name: str, keys: tuple[str, ...]) -> str:
        data = "".join(f"  {k}: {base64.b64encode(creds[k]).decode()}\n" for k in keys)
        return (f"apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n"
                f"  namespace: {namespace}\ntype: Opaque\ndata:\n{data}")

    return (secret("tandem-credentials", ("cluster-secret", "tls.crt", "tls.key", "agent.pub"))
            + "---\n"
            + secret("tandem-controller-credentials", ("agent.key",)))
