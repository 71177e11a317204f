"""From `[nats]` to nats-py's connect options: one home, for the daemon and the client commands.

What it sets from the config (every key optional; an empty string is the same as no value):

- `servers`: the URL(s) given, comma-separated;
- `user` + `password` (both or neither), or `token`; secrets inline, `_file` or `_env`;
- `nkey_seed` (a user seed: the server's `authorization { users = [{ nkey: U... }] }`), or
  `creds` (a .creds file holding a user JWT and its seed), both through the `nkeys` package;
- `tls_ca` / `tls_cert` / `tls_key`: an SSL context that trusts `tls_ca` (else the system's
  CAs) and presents the client certificate (mutual TLS); it is used when the server asks for
  TLS or the URL is `tls://`; `tls_handshake_first` starts TLS before the server speaks;
- the callbacks given, and the connection `name`.

Reconnect policy and timeouts differ between the daemon and a one-shot client command, so the
callers add those. Credentials and keys are read here, at connect time; a missing or bad one is
a `ConfigError` naming the key.
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from contracts.config import Config, ConfigError, NatsConfig
from contracts.secrets import given
from router.secrets import resolve_secret

Callback = Callable[..., Awaitable[None]]


def servers(url: str) -> list[str]:
    """The server URLs of a comma-separated list."""
    return [u.strip() for u in url.split(",") if u.strip()]


def connect_options(
    cfg: Config | None,
    url: str,
    *,
    name: str,
    error_cb: Callback | None = None,
    disconnected_cb: Callback | None = None,
    reconnected_cb: Callback | None = None,
    closed_cb: Callback | None = None,
) -> dict[str, Any]:
    """Keyword arguments for `nats.connect` / `Client.connect` (never log them: they hold secrets)."""
    opts: dict[str, Any] = {"servers": servers(url), "name": name}
    for key, cb in (
        ("error_cb", error_cb),
        ("disconnected_cb", disconnected_cb),
        ("reconnected_cb", reconnected_cb),
        ("closed_cb", closed_cb),
    ):
        if cb is not None:
            opts[key] = cb
    if cfg is None:
        return opts
    n = cfg.nats
    password = resolve_secret(cfg, "nats", "password")
    if given(n.user) and password is not None:
        opts["user"], opts["password"] = n.user, password
    token = resolve_secret(cfg, "nats", "token")
    if token is not None:
        opts["token"] = token
    seed = resolve_secret(cfg, "nats", "nkey_seed")
    if seed is not None:
        opts["nkeys_seed_str"] = _check_seed(seed.strip(), _seed_key(n))
    creds = _set(n.creds)
    if creds is not None:
        opts["user_credentials"] = str(_readable(cfg, "nats.creds", creds))
    context = tls_context(cfg)
    if context is not None:
        opts["tls"] = context
    if n.tls_handshake_first:
        opts["tls_handshake_first"] = True
    return opts


def tls_context(cfg: Config) -> ssl.SSLContext | None:
    """The client's SSL context from `tls_ca`, `tls_cert` and `tls_key`; None when none is set."""
    n = cfg.nats
    ca, cert, key = _set(n.tls_ca), _set(n.tls_cert), _set(n.tls_key)
    if ca is None and cert is None and not n.tls_handshake_first:
        return None
    try:
        cafile = None if ca is None else str(_readable(cfg, "nats.tls_ca", ca))
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    except ssl.SSLError as exc:
        raise ConfigError(f"nats.tls_ca: not a PEM CA certificate file: {exc.reason or exc}") from None
    if cert is not None and key is not None:  # the config loader requires both or neither
        cert_path, key_path = _readable(cfg, "nats.tls_cert", cert), _readable(cfg, "nats.tls_key", key)
        try:
            context.load_cert_chain(str(cert_path), str(key_path))
        except ssl.SSLError as exc:
            raise ConfigError(
                f"nats.tls_cert: {cert_path} and nats.tls_key: {key_path} do not make a PEM certificate and its "
                f"private key: {exc.reason or exc}"
            ) from None
    return context


def _set(value: str | None) -> str | None:
    """`value`, or None when it is not set (None, or an empty string: the one rule)."""
    return value if given(value) else None


def _readable(cfg: Config, key: str, path: str) -> Path:
    p = cfg.resolve(path.strip())
    try:
        with p.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {p}: {exc.strerror or exc}") from None
    return p


def _seed_key(n: NatsConfig) -> str:
    for form in ("_file", "_env", ""):
        if given(getattr(n, "nkey_seed" + form)):
            return "nats.nkey_seed" + form
    return "nats.nkey_seed"


def _check_seed(seed: str, key: str) -> str:
    """A user nkey seed, checked now (nats-py would fail later with a cryptic error); never echoed."""
    import nkeys

    if not seed.startswith("SU"):
        raise ConfigError(f"{key}: not an nkey user seed (one line starting with SU, as `nk -gen user` prints)")
    try:
        nkeys.from_seed(bytearray(seed.encode()))
    except Exception:
        raise ConfigError(f"{key}: not a valid nkey seed (its checksum or length is wrong)") from None
    return seed


def is_transient(exc: BaseException) -> bool:
    """A JetStream request that failed for now and may succeed when asked again: no reply in time,
    no responder, JetStream unavailable (a stream or meta leader being elected on a cluster), or
    the connection away. What the request asked for may or may not have happened."""
    import nats.errors
    import nats.js.errors

    if isinstance(
        exc,
        (
            TimeoutError,
            nats.errors.TimeoutError,
            nats.errors.NoRespondersError,
            nats.errors.ConnectionClosedError,
            nats.errors.ConnectionReconnectingError,
            nats.errors.OutboundBufferLimitError,
            nats.errors.StaleConnectionError,
            nats.js.errors.ServiceUnavailableError,
            nats.js.errors.NoStreamResponseError,
        ),
    ):
        return True
    if isinstance(exc, nats.js.errors.APIError):
        # 503: JetStream not available now; 10012/10148: the consumer changed meanwhile (its
        # delete not yet applied by the new leader): deleted and made again by the next try.
        return exc.code in (503, 408) or exc.err_code in (10012, 10148)
    return False
