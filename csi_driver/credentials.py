"""A cluster's credentials, made in one place: the replication secret every node holds
(``replication.peer_auth``) and the key pair whose private half only the controller holds
(``csi_driver.agent_auth``). ``tandem credentials generate`` and the dev cluster use it.

Files (one directory, 0700): ``cluster-secret`` (0600, nodes), ``agent.key`` (0600, the
controller), ``agent.pub`` (0644, nodes). In Kubernetes the same contents live in two
Secrets: ``tandem-credentials`` (cluster-secret, agent.pub) for the node DaemonSet and
``tandem-controller-credentials`` (agent.key) for the controller.
"""

from __future__ import annotations

import base64
from pathlib import Path

from csi_driver.agent_auth import generate_key_pair
from replication.atomic_file import write_atomic
from replication.peer_auth import generate_secret

FILES = ("cluster-secret", "agent.key", "agent.pub")


def new_credentials() -> dict[str, bytes]:
    private, public = generate_key_pair()
    return {"cluster-secret": generate_secret() + b"\n", "agent.key": f"{private}\n".encode(),
            "agent.pub": f"{public}\n".encode()}


def write_credentials(directory: Path) -> None:
    """New credentials into ``directory`` (created 0700; refuses to replace existing ones:
    rotation adds lines, docs/security.md)."""
    existing = [name for name in FILES if (directory / name).exists()]
    if existing:
        raise FileExistsError(f"{directory} already holds {', '.join(existing)}")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for name, data in new_credentials().items():
        write_atomic(directory / name, data, mode=0o644 if name == "agent.pub" else 0o600)


def kubernetes_secrets(namespace: str) -> str:
    """New credentials as the two Secret manifests the deployment mounts."""
    creds = new_credentials()

    def secret(name: str, keys: tuple[str, ...]) -> str:
        data = "".join(f"  {k}: {base64.b64encode(creds[k]).decode()}\n" for k in keys)
        return (f"apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n"
                f"  namespace: {namespace}\ntype: Opaque\ndata:\n{data}")

    return (secret("tandem-credentials", ("cluster-secret", "agent.pub")) + "---\n"
            + secret("tandem-controller-credentials", ("agent.key",)))
