"""Decentralized auth for a test server: an operator, a system account, an account with JetStream and a
user, as signed JWTs (what `nsc` makes), the server config that trusts them and the user's .creds file."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import nkeys


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class _Key:
    seed: str
    public: str
    pair: Any


def _key(prefix: int) -> _Key:
    seed = nkeys.encode_seed(os.urandom(32), prefix)
    pair = nkeys.from_seed(bytearray(seed))
    return _Key(seed.decode(), pair.public_key.decode(), pair)


def _jwt(issuer: _Key, subject: str, name: str, nats: dict[str, Any]) -> str:
    claims: dict[str, Any] = {
        "iat": int(time.time()),
        "iss": issuer.public,
        "name": name,
        "sub": subject,
        "nats": {**nats, "version": 2},
    }
    claims["jti"] = base64.b32encode(hashlib.sha256(json.dumps(claims).encode()).digest()).decode().rstrip("=")
    signed = f"{_b64(json.dumps({'typ': 'JWT', 'alg': 'ed25519-nkey'}).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signed}.{_b64(issuer.pair.sign(signed.encode()))}"


@dataclass(frozen=True)
class Decentralized:
    server_conf: str  # the operator-mode part of a nats-server config
    creds: str  # the user's .creds file
    user_jwt: str
    user_seed: str


def decentralized() -> Decentralized:
    operator = _key(nkeys.PREFIX_BYTE_OPERATOR)
    system = _key(nkeys.PREFIX_BYTE_ACCOUNT)
    account = _key(nkeys.PREFIX_BYTE_ACCOUNT)
    user = _key(nkeys.PREFIX_BYTE_USER)
    unlimited = {"subs": -1, "conn": -1, "leaf": -1, "imports": -1, "exports": -1, "data": -1, "payload": -1}
    jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
    op_jwt = _jwt(operator, operator.public, "operator", {"type": "operator", "system_account": system.public})
    sys_jwt = _jwt(operator, system.public, "SYS", {"type": "account", "limits": unlimited})
    acc_jwt = _jwt(operator, account.public, "APP", {"type": "account", "limits": {**unlimited, **jetstream}})
    user_jwt = _jwt(account, user.public, "router", {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1})
    conf = (
        f'operator: "{op_jwt}"\n'
        f"system_account: {system.public}\n"
        "resolver: MEMORY\n"
        f'resolver_preload: {{\n  {system.public}: "{sys_jwt}"\n  {account.public}: "{acc_jwt}"\n}}\n'
    )
    creds = (
        f"-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        "NKEY Seed printed below can be used to sign and prove identity.\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{user.seed}\n------END USER NKEY SEED------\n"
    )
    return Decentralized(server_conf=conf, creds=creds, user_jwt=user_jwt, user_seed=user.seed)
