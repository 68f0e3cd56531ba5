"""One connection's side of the mutual handshake (``peer_auth``), sans-IO: the nonces, the
proof each side sends, the check of the other side's, and the peer's HELLO.

``replication.protocol.Connection`` frames these payloads and moves its state on the
answers; this module only knows what they must contain. Without credentials (codec tests,
tools on a trusted link) the HELLOs carry no token and nothing is proven. The methods a
side calls only with credentials, and only in the state the Connection checks, assert it.
Must not: frame, keep request ids or connection state, do I/O, or import csi_driver, grpc
or etcd.
"""

from __future__ import annotations

from replication.messages import Buffer, RemoteProtocolError
from replication.payloads import Hello
from replication.peer_auth import MAC_SIZE, NONCE_SIZE, PeerAuth


class PeerHandshake:
    """The handshake material of one connection (either role)."""

    def __init__(self, auth: PeerAuth | None) -> None:
        self.auth = auth
        self.peer_hello: Hello | None = None
        self.nonces: tuple[bytes, bytes] = (b"", b"")  # (client's, server's)
        self._hello_node = ""  # the node id our own HELLO named

    # -- client ---------------------------------------------------------------------------

    def client_hello(self) -> bytes:
        """Our HELLO's payload (with credentials): ours to make, so the nonce is fresh and
        the node id ours."""
        auth = self.auth
        assert auth is not None
        nonce = auth.nonce()
        payload = Hello(auth.node_id, nonce).encode()
        self.nonces, self._hello_node = (nonce, b""), auth.node_id
        return payload

    def server_proven(self, payload: Buffer) -> bool:
        """Take the server's OK HELLO reply: True if it proved itself and our AUTH must
        follow, False without credentials; RemoteProtocolError if its proof is wrong."""
        hello = Hello.decode(payload)
        if self.auth is not None:
            token, nonce_c = hello.token, self.nonces[0]
            nonce_s, proof = token[:NONCE_SIZE], token[NONCE_SIZE:]
            if len(token) != NONCE_SIZE + MAC_SIZE or not self.auth.verify(
                    proof, "server", self._hello_node, hello.node_id, nonce_c, nonce_s):
                raise RemoteProtocolError(
                    f"replica server {hello.node_id!r} failed to authenticate")
            self.nonces = (nonce_c, nonce_s)
            self.peer_hello = hello
            return True
        self.peer_hello = hello
        return False

    def client_proof(self) -> bytes:
        """Our AUTH payload, once the server has proven itself."""
        auth, peer = self.auth, self.peer_hello
        assert auth is not None and peer is not None
        nonce_c, nonce_s = self.nonces
        return auth.mac("client", auth.node_id, peer.node_id, nonce_c, nonce_s)

    # -- server ---------------------------------------------------------------------------

    def accept_hello(self, payload: Buffer) -> bool:
        """Take the client's HELLO (already validated); False if it brings no nonce although
        we require authentication."""
        hello = Hello.decode(payload)
        if self.auth is not None:
            if len(hello.token) != NONCE_SIZE:
                return False
            self.nonces = (hello.token, self.auth.nonce())
        self.peer_hello = hello
        return True

    def server_hello(self) -> bytes:
        """Our OK HELLO reply's payload (with credentials): our nonce and our proof."""
        auth, peer = self.auth, self.peer_hello
        assert auth is not None and peer is not None
        nonce_c, nonce_s = self.nonces
        proof = auth.mac("server", peer.node_id, auth.node_id, nonce_c, nonce_s)
        return Hello(auth.node_id, nonce_s + proof).encode()

    def client_proven(self, proof: Buffer) -> bool:
        """True if the client's AUTH payload proves it holds the secret."""
        auth, peer = self.auth, self.peer_hello
        assert auth is not None and peer is not None  # AUTH follows an authenticated HELLO
        nonce_c, nonce_s = self.nonces
        return auth.verify(bytes(proof), "client", peer.node_id, auth.node_id, nonce_c, nonce_s)
