"""A NATS trust chain for a test server in operator mode: an operator, a system account and an account for the
fleet, and users of that account with the permissions given, each written as a creds file (a user JWT and its
nkey seed) that nats-py logs in with (`user_credentials`).

Written here because nothing installable makes NATS JWTs: nats-py reads creds files but does not write them, and
`nsc`, the tool that does, is not on PyPI. A JWT is three base64url parts, the last the issuer's ed25519 (nkey)
signature of the first two; the claims are those of nats-io/jwt v2 that nats-server checks."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import nkeys

UNLIMITED = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True, "conn": -1,
             "leaf": -1}
JETSTREAM_UNLIMITED = {"disk_storage": -1, "mem_storage": -1, "streams": -1, "consumer": -1}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _keys(prefix: int) -> tuple[nkeys.KeyPair, str]:
    """A new key pair of role `prefix` (nkeys.PREFIX_BYTE_*) and its seed."""
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    return nkeys.from_seed(seed), seed.decode()


def _public(pair: nkeys.KeyPair) -> str:
    return str(pair.public_key.decode())


def _jwt(nats_claims: dict[str, Any], issuer: nkeys.KeyPair, subject: str, name: str) -> str:
    claims: dict[str, Any] = {"iat": int(time.time()), "iss": _public(issuer), "name": name, "sub": subject,
                              "nats": {"version": 2, **nats_claims}}
    claims["jti"] = base64.b32encode(hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()).decode()
    signed = f"{_b64(json.dumps({'typ': 'JWT', 'alg': 'ed25519-nkey'}).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signed}.{_b64(issuer.sign(signed.encode()))}"


class Trust:
    """An operator with a system account and one account (JetStream allowed) for the fleet's users."""

    def __init__(self) -> None:
        self.operator, _ = _keys(nkeys.PREFIX_BYTE_OPERATOR)
        self.system, _ = _keys(nkeys.PREFIX_BYTE_ACCOUNT)
        self.account, _ = _keys(nkeys.PREFIX_BYTE_ACCOUNT)

    def server_config(self) -> dict[str, Any]:
        """nats-server's configuration for this trust: the operator, and both accounts preloaded in memory."""
        op = self.operator
        return {
            "operator": _jwt({"type": "operator"}, op, _public(op), "operator"),
            "system_account": _public(self.system),
            "resolver": "MEMORY",
            "resolver_preload": {
                _public(self.system): _jwt({"type": "account", "limits": UNLIMITED}, op, _public(self.system), "SYS"),
                _public(self.account): _jwt({"type": "account", "limits": {**UNLIMITED, **JETSTREAM_UNLIMITED}}, op,
                                            _public(self.account), "fleet"),
            },
        }

    def user_creds(self, path: Path, name: str, permissions: dict[str, Any] | None = None) -> Path:
        """A creds file at `path` (mode 0600) for a new user `name` of the fleet's account, with `permissions` (a
        nats-server `permissions` block, as `node_permissions` gives; None: everything)."""
        user, seed = _keys(nkeys.PREFIX_BYTE_USER)
        claims: dict[str, Any] = {"type": "user", "subs": -1, "data": -1, "payload": -1}
        if permissions is not None:
            claims["pub"] = permissions.get("publish", {})
            claims["sub"] = permissions.get("subscribe", {})
            if permissions.get("allow_responses"):
                claims["resp"] = {"max": 1, "ttl": 0}
        token = _jwt(claims, self.account, _public(user), name)
        path.write_text(f"-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n"
                        f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n")
        path.chmod(0o600)
        return path
