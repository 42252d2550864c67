"""Optional authentication of peers: an HMAC-SHA256 challenge over a shared token.

With ``LMCACHE_P2P_AUTH_TOKEN`` (or ``LMCACHE_P2P_AUTH_TOKEN_FILE``) set, every instance of a
deployment holds the same token, and a connection proves knowledge of it both ways without the
token crossing the wire:

    server -> client   HELLO: a fresh 32-byte random nonce Ns, flag "authentication required"
    client -> server   AUTH: its own nonce Nc and  HMAC(token, "lmcache-p2p/1 client" || Ns || Nc)
    server -> client   WELCOME: HMAC(token, "lmcache-p2p/1 server" || Ns || Nc)

* The server checks the client's proof (constant-time compare) before it reads any request; a
  client without the token, or with a wrong one, gets ERROR AUTH_REFUSED and the connection closes:
  no chunk is ever sent to it.
* A client that holds the token checks the server's proof too, so it never loads KV from a peer
  that does not know the token (the chunk checksum is xxh3, which protects against accidents, not
  against a forger). A server without a token sends a zero proof, which fails that check.
* The two labels keep a proof from being replayed in the other direction; both nonces make every
  proof fresh, so a recorded exchange is useless on another connection.

What this does not give: secrecy of the chunks on the wire (use a private network, or a service
mesh's mTLS). Standard library only.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from lmcache_connector.tiers.peer.protocol import NONCE_BYTES, PROOF_BYTES

_CLIENT_LABEL = b"lmcache-p2p/1 client"
_SERVER_LABEL = b"lmcache-p2p/1 server"


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def client_proof(token: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """What a client sends to prove it knows ``token``."""
    return _proof(token, _CLIENT_LABEL, server_nonce, client_nonce)


def server_proof(token: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    """What a server sends back to prove it knows ``token`` too."""
    return _proof(token, _SERVER_LABEL, server_nonce, client_nonce)


def proof_matches(expected: bytes, received: bytes) -> bool:
    """Constant-time comparison, so the time taken says nothing about how much of a guess was right."""
    return len(received) == PROOF_BYTES and hmac.compare_digest(expected, received)


def _proof(token: bytes, label: bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    if len(server_nonce) != NONCE_BYTES or len(client_nonce) != NONCE_BYTES:
        raise ValueError(f"nonces are {NONCE_BYTES} bytes")
    return hmac.new(token, label + server_nonce + client_nonce, hashlib.sha256).digest()
