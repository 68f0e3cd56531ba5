"""Per-call credentials for the node agent API: only the controller can create, delete or
resize a replica, or list a node's volumes.

The controller holds an Ed25519 private key; every node holds only the public key(s). Each
call carries, in the ``tandem-agent-auth`` metadata, a signature over::

    "tandem-agent-v1" | method | audience (the agent's address) | time | nonce | sha256(request)

so a token works for one request, to one agent, once, within ``WINDOW_S`` of its time. A
node (or root on it) can therefore not drive another node's agent: the key that signs is
not on the nodes. The agent checks every call in one gRPC interceptor (``AgentAuthInterceptor``)
before any servicer code runs; a refusal is UNAUTHENTICATED.

Key files hold hex, one key per line: the controller's ``agent.key`` one private key, a
node's ``agent.pub`` one or more public keys (rotation: add the new public key on every
node, switch the controller's key, then drop the old public key).

Clocks: the window needs node clocks within ``WINDOW_S`` of the controller's (NTP, as
etcd leases and TLS already assume).
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from google.protobuf.message import Message

METADATA_KEY = "tandem-agent-auth"
WINDOW_S = 60.0
_LABEL = b"tandem-agent-v1"
_TOKEN = struct.Struct(">Q16s64s")  # time (ms), nonce, signature
_MAX_NONCES = 100_000  # a bounded replay cache: ~10 MiB at most


class KeyFileError(ValueError):
    """An agent key file is missing, malformed, or readable by others (private key)."""


def _read_hex_lines(path: Path, private: bool) -> list[bytes]:
    try:
        st = os.stat(path)
        text = Path(path).read_text("ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"agent key file {path}: {exc}") from None
    if private and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"agent key file {path} is accessible to group or others: chmod 600")
    keys = []
    for i, line in enumerate(text.split(), 1):
        try:
            raw = bytes.fromhex(line)
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise KeyFileError(f"agent key file {path}: line {i} is not 64 hex digits")
        keys.append(raw)
    if not keys:
        raise KeyFileError(f"agent key file {path} holds no key")
    return keys


def load_signer(path: Path) -> AgentSigner:
    (seed, *rest) = _read_hex_lines(path, private=True)
    if rest:
        raise KeyFileError(f"agent key file {path}: one private key, not {1 + len(rest)}")
    return AgentSigner(Ed25519PrivateKey.from_private_bytes(seed))


def load_public_keys(path: Path) -> list[Ed25519PublicKey]:
    return [Ed25519PublicKey.from_public_bytes(k) for k in _read_hex_lines(path, private=False)]


def generate_key_pair() -> tuple[str, str]:
    """A new (private, public) key pair, each as one hex line."""
    from cryptography.hazmat.primitives import serialization as ser

    key = Ed25519PrivateKey.generate()
    seed = key.private_bytes(ser.Encoding.Raw, ser.PrivateFormat.Raw, ser.NoEncryption())
    pub = key.public_key().public_bytes(ser.Encoding.Raw, ser.PublicFormat.Raw)
    return seed.hex(), pub.hex()


def _message(method: str, audience: str, when_ms: int, nonce: bytes, request: bytes) -> bytes:
    digest = hashlib.sha256(request).digest()
    fields = (_LABEL, method.encode(), audience.encode(), when_ms.to_bytes(8, "big"), nonce)
    return b"".join(len(f).to_bytes(2, "big") + f for f in fields) + digest


class AgentSigner:
    """The controller's side: a token for each call."""

    def __init__(self, key: Ed25519PrivateKey, clock: Callable[[], float] = time.time) -> None:
        self._key = key
        self._clock = clock

    def token(self, method: str, audience: str, request: Message) -> str:
        when_ms, nonce = int(self._clock() * 1000), os.urandom(16)
        body = request.SerializeToString(deterministic=True)
        sig = self._key.sign(_message(method, audience, when_ms, nonce, body))
        return base64.b64encode(_TOKEN.pack(when_ms, nonce, sig)).decode()


class AgentVerifier:
    """The agent's side: is this call's token valid, fresh and unused?"""

    def __init__(self, keys: Sequence[Ed25519PublicKey], audience: str,
                 clock: Callable[[], float] = time.time) -> None:
        if not keys:
            raise KeyFileError("no agent public key")
        self._keys = list(keys)
        self.audience = audience
        self._clock = clock
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # nonce -> expiry, oldest first

    def refusal(self, method: str, token: str | None, request: Message) -> str | None:
        """None if the call may proceed, otherwise why not."""
        if not token:
            return "agent call without credentials"
        try:
            raw = base64.b64decode(token, validate=True)
            when_ms, nonce, sig = _TOKEN.unpack(raw)
        except (ValueError, struct.error):
            return "malformed agent credentials"
        now = self._clock()
        if abs(now - when_ms / 1000) > WINDOW_S:
            return "agent credentials outside the time window (clock skew or replay)"
        message = _message(method, self.audience, when_ms, nonce,
                           request.SerializeToString(deterministic=True))
        if not any(self._valid(k, sig, message) for k in self._keys):
            return "agent credentials do not verify"
        self._forget_expired(now)
        if nonce in self._seen:
            return "agent credentials already used"
        if len(self._seen) >= _MAX_NONCES:
            return "too many agent calls in the window"
        self._seen[nonce] = now + 2 * WINDOW_S
        return None

    @staticmethod
    def _valid(key: Ed25519PublicKey, sig: bytes, message: bytes) -> bool:
        try:
            key.verify(sig, message)
        except InvalidSignature:
            return False
        return True

    def _forget_expired(self, now: float) -> None:
        seen = self._seen
        while seen:
            nonce, expiry = next(iter(seen.items()))
            if expiry > now:
                break
            del seen[nonce]


class AgentAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Checks every unary agent call before its handler runs (UNAUTHENTICATED otherwise)."""

    def __init__(self, verifier: AgentVerifier) -> None:
        self._verifier = verifier

    async def intercept_service(
        self, continuation: Callable[[Any], Awaitable[Any]], details: Any,
    ) -> Any:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        method = str(details.method).rsplit("/", 1)[-1]
        token = dict(details.invocation_metadata or ()).get(METADATA_KEY)
        inner = handler.unary_unary
        verifier = self._verifier

        async def checked(request: Message, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            reason = verifier.refusal(method, token, request)
            if reason is not None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            checked, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)
