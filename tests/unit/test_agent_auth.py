"""Per-call agent credentials (issue 11 #4): only the controller's key opens the agent API."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from csi_driver._gen import agent_pb2
from csi_driver.agent_auth import (
    WINDOW_S,
    AgentSigner,
    AgentVerifier,
    KeyFileError,
    load_public_keys,
    load_signer,
)
from csi_driver.credentials import kubernetes_secrets, write_credentials

ADDR = "10.0.0.1:7001"
DELETE = agent_pb2.DeleteReplicaRequest(volume_id="vol-1")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def pair(clock: Clock) -> tuple[AgentSigner, AgentVerifier, Ed25519PrivateKey]:
    key = Ed25519PrivateKey.generate()
    return AgentSigner(key, clock), AgentVerifier([key.public_key()], ADDR, clock), key


def test_a_signed_call_passes_once() -> None:
    clock = Clock()
    signer, verifier, _ = pair(clock)
    token = signer.token("DeleteReplica", ADDR, DELETE)
    assert verifier.refusal("DeleteReplica", token, DELETE) is None
    assert verifier.refusal("DeleteReplica", token, DELETE) == "agent credentials already used"


@pytest.mark.parametrize(("method", "request_", "audience", "why"), [
    ("CreateReplica", DELETE, ADDR, "do not verify"),  # a token for another method
    ("DeleteReplica", agent_pb2.DeleteReplicaRequest(volume_id="vol-2"), ADDR, "do not verify"),
    ("DeleteReplica", DELETE, "10.0.0.2:7001", "do not verify"),  # meant for another node
])
def test_a_token_is_bound_to_method_request_and_agent(
    method: str, request_: agent_pb2.DeleteReplicaRequest, audience: str, why: str
) -> None:
    clock = Clock()
    signer, verifier, _ = pair(clock)
    token = signer.token("DeleteReplica", audience, DELETE)
    reason = verifier.refusal(method, token, request_)
    assert reason is not None and why in reason


@pytest.mark.parametrize("token", [None, "", "not base64!", "AAAA", "A" * 200])
def test_missing_or_malformed_credentials_are_refused(token: str | None) -> None:
    _, verifier, _ = pair(Clock())
    assert verifier.refusal("ListReplicas", token, agent_pb2.ListReplicasRequest()) is not None


def test_stale_and_future_tokens_are_refused() -> None:
    clock = Clock()
    signer, verifier, _ = pair(clock)
    old = signer.token("DeleteReplica", ADDR, DELETE)
    clock.now += WINDOW_S + 1
    assert "time window" in (verifier.refusal("DeleteReplica", old, DELETE) or "")
    future = signer.token("DeleteReplica", ADDR, DELETE)
    clock.now -= 2 * WINDOW_S + 2
    assert "time window" in (verifier.refusal("DeleteReplica", future, DELETE) or "")


def test_a_node_key_is_not_the_controller_key() -> None:
    clock = Clock()
    _, verifier, _ = pair(clock)
    stranger = AgentSigner(Ed25519PrivateKey.generate(), clock)
    token = stranger.token("DeleteReplica", ADDR, DELETE)
    assert verifier.refusal("DeleteReplica", token, DELETE) == "agent credentials do not verify"


def test_rotation_accepts_old_and_new_public_keys() -> None:
    clock = Clock()
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    verifier = AgentVerifier([old.public_key(), new.public_key()], ADDR, clock)
    for key in (old, new):
        token = AgentSigner(key, clock).token("DeleteReplica", ADDR, DELETE)
        assert verifier.refusal("DeleteReplica", token, DELETE) is None


def test_the_replay_cache_forgets_what_cannot_be_replayed() -> None:
    clock = Clock()
    signer, verifier, _ = pair(clock)
    for _ in range(50):
        token = signer.token("ListReplicas", ADDR, agent_pb2.ListReplicasRequest())
        assert verifier.refusal("ListReplicas", token, agent_pb2.ListReplicasRequest()) is None
    clock.now += 3 * WINDOW_S
    token = signer.token("ListReplicas", ADDR, agent_pb2.ListReplicasRequest())
    assert verifier.refusal("ListReplicas", token, agent_pb2.ListReplicasRequest()) is None
    assert len(verifier._seen) == 1


def test_key_files(tmp_path: Path) -> None:
    write_credentials(tmp_path / "c")
    signer = load_signer(tmp_path / "c" / "agent.key")
    verifier = AgentVerifier(load_public_keys(tmp_path / "c" / "agent.pub"), ADDR)
    token = signer.token("DeleteReplica", ADDR, DELETE)
    assert verifier.refusal("DeleteReplica", token, DELETE) is None
    assert (tmp_path / "c" / "agent.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "c" / "cluster-secret").stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        write_credentials(tmp_path / "c")  # never over a cluster's credentials
    (tmp_path / "c" / "agent.key").chmod(0o644)
    with pytest.raises(KeyFileError, match="group or others"):
        load_signer(tmp_path / "c" / "agent.key")
    bad = tmp_path / "bad.pub"
    bad.write_text("abc\n")
    with pytest.raises(KeyFileError, match="64 hex digits"):
        load_public_keys(bad)
    bad.write_text("\n")
    with pytest.raises(KeyFileError, match="no key"):
        load_public_keys(bad)
    with pytest.raises(KeyFileError):
        load_signer(tmp_path / "missing")


def test_kubernetes_secrets_split_the_private_key_from_the_nodes() -> None:
    text = kubernetes_secrets("tandem-system")
    node, controller = text.split("---\n")
    assert "name: tandem-credentials" in node and "cluster-secret:" in node
    assert "agent.pub:" in node and "agent.key" not in node
    assert "name: tandem-controller-credentials" in controller and "agent.key:" in controller
    assert "cluster-secret" not in controller
