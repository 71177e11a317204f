"""The router's config (CONTRACT.md section 6 plus added keys), decoded from TOML strictly."""

from __future__ import annotations

import difflib
import json
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta

from contracts.oncall import OncallConfig, check_oncall
from contracts.secrets import check_secret_forms, given, redact_text, secret_forms
from contracts.sources import EXAMPLE as SOURCE_EXAMPLE
from contracts.sources import SourceConfig, compile_source

DURATION_PATTERN: Final = r"^[0-9]+(\.[0-9]+)?(us|ms|s|m|h|d)$"
Duration = Annotated[str, Meta(pattern=DURATION_PATTERN)]
_UNIT_US: Final = {"us": 1, "ms": 1_000, "s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}
_DURATION_RE: Final = re.compile(DURATION_PATTERN)
# Longer durations are refused: a deadline must stay a 64-bit integer of microseconds.
_TOO_LONG_US: Final = 100 * 366 * 86_400_000_000

SubjectToken = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


def duration_us(text: str) -> int:
    """Microseconds of `"500ms"`, `"30s"`, `"15m"`, `"6h"`, `"2d"`."""
    m = _DURATION_RE.match(text)
    if m is None:
        raise ValueError(f"not a duration: {text!r} (use e.g. 500ms, 30s, 15m, 6h, 2d)")
    unit = m.group(2)
    us = float(text[: -len(unit)]) * _UNIT_US[unit]
    if us >= _TOO_LONG_US:  # (also inf, from a number beyond binary64's range)
        raise ValueError(f"duration too long: {text!r} (at most 100 years)")
    return round(us)


class ConfigError(Exception):
    """A config that cannot be used; the message names the key's path."""


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class NatsConfig(_Section):
    """`[nats]`: where the server is and how to reach it securely.

    Every credential and TLS key is optional; an empty string is the same as leaving the key
    out. Secrets (`password`, `token`, `nkey_seed`) may also be given as `<key>_file` (a path)
    or `<key>_env` (a variable's name): see contracts/secrets.py. Paths are relative to the
    config file's folder. `router.jetstream.connection.connect_options` turns this into the
    options of a connection, for the daemon and the client commands alike.
    """

    url: str = "embedded"
    embedded_port: Annotated[int, Meta(ge=0, le=65535)] = 4222
    user: str | None = None
    password: str | None = None
    password_file: str | None = None
    password_env: str | None = None
    token: str | None = None
    token_file: str | None = None
    token_env: str | None = None
    nkey_seed: str | None = None  # a user's nkey seed (SU...)
    nkey_seed_file: str | None = None
    nkey_seed_env: str | None = None
    creds: str | None = None  # a .creds file (user JWT and seed), as `nsc` writes them
    tls_ca: str | None = None  # PEM file of the CA(s) that signed the server's certificate
    tls_cert: str | None = None  # PEM client certificate (with tls_key: mutual TLS)
    tls_key: str | None = None  # PEM private key of tls_cert
    tls_handshake_first: bool = False  # TLS before the server's INFO (server: tls { handshake_first: true })


class StreamsConfig(_Section):
    events: SubjectToken = "EVENTS"
    exceptions: SubjectToken = "EXCEPTIONS"
    deadletter: SubjectToken = "DEADLETTER"
    max_age: Duration = "7d"
    duplicate_window: Duration = "10m"
    replicas: Annotated[int, Meta(ge=1, le=5)] = 1


class SnapshotsConfig(_Section):
    path: str = "data/router.db"
    every_events: Annotated[int, Meta(ge=1)] = 100_000
    every: Duration = "5s"
    resident_actors: Annotated[int, Meta(ge=100)] = 200_000
    synchronous: Literal["OFF", "NORMAL", "FULL"] = "NORMAL"
    # Every snapshot also goes to a KV bucket in the cluster (`<router.consumer>_state`), from
    # which a partition whose local store is missing or behind is restored at start.
    cluster_copy: bool = True


class RouterConfig(_Section):
    consumer: SubjectToken = "router"
    partitions: Annotated[int, Meta(ge=1, le=1024)] = 1
    fetch_batch: Annotated[int, Meta(ge=1, le=100_000)] = 2000
    max_ack_pending: Annotated[int, Meta(ge=100)] = 100_000
    shutdown_timeout: Duration = "15s"
    timer_horizon: Duration = "60s"
    # Partition ownership (KV `<consumer>_owners`): the owner renews every `lease_renew_every`;
    # a standby takes a partition over once its record stood still for `lease`.
    lease: Duration = "10s"
    lease_renew_every: Duration = "3s"


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "console", "json"] = "auto"
    # How often the router logs its one-line `router_summary` at info; "0s" for never.
    summary_every: Duration = "10s"


class SkuRules(_Section):
    low_stock_threshold: Annotated[int, Meta(ge=-(2**53 - 1), le=2**53 - 1)] = 5
    return_window_hours: Annotated[int, Meta(ge=1, le=24 * 366)] = 24
    return_spike_min_units: Annotated[int, Meta(ge=0, le=2**53 - 1)] = 10
    return_spike_ratio: Annotated[float, Meta(ge=0)] = 0.2


class ShipmentRules(_Section):
    stall_after: Duration = "6h"
    # stall_after per carrier (matched exactly, case-sensitive), e.g. { SURFACE-CO = "24h" }.
    carriers: dict[str, str] = {}  # each value checked as a Duration in config_from_dict


class CampaignRules(_Section):
    cpa_min_spend: float = 100.0


class RulesConfig(_Section):
    # A `ts` further ahead of the event's JetStream timestamp is invalid (CONTRACT section 2).
    max_future_skew: Duration = "1h"
    sku: SkuRules = msgspec.field(default_factory=SkuRules)
    shipment: ShipmentRules = msgspec.field(default_factory=ShipmentRules)
    campaign: CampaignRules = msgspec.field(default_factory=CampaignRules)


class HttpConfig(_Section):
    """`[http]`: the console and HTTP API served by `router run` (CONTRACT.md sections 6 and 7).

    `listen` is "host:port" (an IPv6 host in brackets, "[::1]:8080"), or "off"; port 0 picks a
    free port and the router writes the URL it serves to `<data>/http.url`. On an address that
    is not loopback a `token` is required. `token` guards the page and the read API,
    `ingest_token` (default: `token`) guards `POST /events`; both may be given as `_file` or
    `_env` (contracts/secrets.py). `trusted_proxies`: the addresses whose `X-Forwarded-Proto`
    and `X-Forwarded-For` are believed (a TLS-terminating reverse proxy on the same machine); a
    request seen as https gets its session cookie marked `Secure`.
    """

    listen: str = "127.0.0.1:8080"
    token: str | None = None
    token_file: str | None = None
    token_env: str | None = None
    ingest_token: str | None = None
    ingest_token_file: str | None = None
    ingest_token_env: str | None = None
    idempotency_ttl: Duration = "24h"
    trusted_proxies: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1", "::1"])


class Config(_Section):
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    streams: StreamsConfig = msgspec.field(default_factory=StreamsConfig)
    snapshots: SnapshotsConfig = msgspec.field(default_factory=SnapshotsConfig)
    router: RouterConfig = msgspec.field(default_factory=RouterConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    rules: RulesConfig = msgspec.field(default_factory=RulesConfig)
    # Partner webhooks mapped onto events (contracts/sources.py), by source name.
    sources: dict[str, SourceConfig] = {}
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    oncall: OncallConfig = msgspec.field(default_factory=OncallConfig)
    # The folder relative paths are resolved against (the config file's folder).
    base_dir: str = msgspec.field(default="", name="__base_dir__")

    def resolve(self, path: str) -> Path:
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else Path(self.base_dir or ".") / p

    @property
    def snapshot_path(self) -> Path:
        return self.resolve(self.snapshots.path)

    @property
    def data_dir(self) -> Path:
        return self.snapshot_path.parent


_PATH_RE: Final = re.compile(r"- at `\$((?:\.[A-Za-z0-9_\-]+|\[[^\]]*\])*)`")
_UNKNOWN_RE: Final = re.compile(r"Object contains unknown field `([^`]*)`")


def _key_path(message: str) -> str:
    """`nats.url` from msgspec's ``... - at `$.nats.url` ``, with unknown fields appended."""
    m = _PATH_RE.search(message)
    path = m.group(1).lstrip(".") if m else ""
    u = _UNKNOWN_RE.search(message)
    if u:
        path = f"{path}.{u.group(1)}" if path else u.group(1)
    return path or "(top level)"


_MISSING: Final = object()


def _value_at(root: object, path: str) -> object:
    """The value at a dotted key path of a parsed document or a Struct, or _MISSING."""
    node = root
    for part in path.split("."):
        if isinstance(node, dict):
            node = node.get(part, _MISSING)
        elif isinstance(node, msgspec.Struct):
            node = getattr(node, part, _MISSING)
        else:
            return _MISSING
    return node


def _toml(value: object) -> str:
    """How a value is written in TOML (strings quoted), for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _validation_message(exc: msgspec.ValidationError, raw: dict[str, object]) -> str:
    """`<key.path>: <what is wrong with the value written>, e.g. <key> = <a good value>`.

    msgspec says "Expected `str` matching regex '^[0-9]+...'" for a bad pattern; a user
    needs the value they wrote and one that works (the key's default) instead.
    """
    text = str(exc)
    path = _key_path(text)
    unknown = _UNKNOWN_RE.search(text)
    if unknown:
        known = _unknown_key_message(path, unknown.group(1))
        if known:
            return known
    value = _value_at(raw, path)
    default = _value_at(Config(), path)
    key = path.rsplit(".", 1)[-1]
    scalar = isinstance(default, (str, int, float)) and not isinstance(default, msgspec.Struct)
    example = f", e.g. {key} = {_toml(default)}" if scalar else _example(path)
    if isinstance(default, str) and _DURATION_RE.match(default) and value is not _MISSING:
        return (
            f"{path}: {_toml(value)} is not a duration: a string of a number and a unit "
            f"(us, ms, s, m, h, d) with no space{example}"
        )
    if "matching regex" in text and isinstance(value, str):
        return f"{path}: {_toml(value)} is not a valid name: 1-64 of A-Z a-z 0-9 _ -{example}"
    return f"{path}: {text}{example}"


def _table_type(table: str) -> object:
    """The Struct type of the table at a key path (`oncall.webhook`, `sources.x`, `oncall.routes[0]`)."""
    typ: object = Config
    for part in re.findall(r"\[[^\]]*\]|[^.\[\]]+", table):
        origin = typing.get_origin(typ)
        if origin is dict:
            typ = typing.get_args(typ)[1]
        elif origin is list and part.startswith("["):
            typ = typing.get_args(typ)[0]
        elif isinstance(typ, type) and issubclass(typ, msgspec.Struct) and not part.startswith("["):
            named = {f.encode_name: f.type for f in msgspec.structs.fields(typ)}
            if part not in named:
                return None
            typ = named[part]
        else:
            return None
    return typ


def _unknown_key_message(path: str, name: str) -> str | None:
    """`<path>: not a key of [<table>]; did you mean <key> (e.g. <key> = <default>)? Its keys: ...`."""
    table = path[: -len(name)].rstrip(".") if path.endswith(name) else ""
    typ = _table_type(table)
    if not (isinstance(typ, type) and issubclass(typ, msgspec.Struct)):
        return None
    keys = [f.encode_name for f in msgspec.structs.fields(typ) if not f.encode_name.startswith("_")]
    where = f"[{table}]" if table else "the config"
    message = f"{path}: {_toml(name)} is not a key of {where}"
    close = [k for k in keys if len(min(k, name, key=len)) >= 3 and (k in name or name in k)]
    close = close or difflib.get_close_matches(name, keys, n=1, cutoff=0.75)
    if close:
        try:
            default = getattr(typ(), close[0], None)
        except (TypeError, msgspec.ValidationError):
            default = None  # a table with required keys
        shown = isinstance(default, (int, float)) or (isinstance(default, str) and default != "")
        example = f" (e.g. {close[0]} = {_toml(default)})" if shown else ""
        message += f"; did you mean {close[0]}{example}?"
    else:
        message += "."
    return f"{message} Its keys: {', '.join(keys)}."


_CARRIERS_EXAMPLE: Final = ', e.g. carriers = { SURFACE-CO = "24h", EXPRESS-CO = "90m" }'


def _example(path: str) -> str:
    """An example for keys whose default is no example (a table)."""
    if path == "sources" or path.startswith(("sources.", "sources[")):
        return ", " + SOURCE_EXAMPLE
    if path == "rules.shipment.carriers" or path.startswith(("rules.shipment.carriers.", "rules.shipment.carriers[")):
        return _CARRIERS_EXAMPLE
    return ""


def _duration(path: str, text: str, example: str, *, positive: bool) -> int:
    """Microseconds of a duration key's value; ConfigError names the key and a good value."""
    try:
        us = duration_us(text)
    except ValueError as exc:
        what = str(exc) if str(exc).startswith("duration too long") else (
            f"{_toml(text)} is not a duration: a string of a number and a unit (us, ms, s, m, h, d) with no space"
        )
        raise ConfigError(f"{path}: {what}{example}") from None
    if positive and us <= 0:
        raise ConfigError(f"{path}: must be longer than 0{example}")
    return us


def _check_carriers(raw: dict[str, object]) -> None:
    """Name the carrier whose value is not a string (msgspec would say `carriers[...]`)."""
    rules = raw.get("rules")
    shipment = rules.get("shipment") if isinstance(rules, dict) else None
    carriers = shipment.get("carriers") if isinstance(shipment, dict) else None
    if isinstance(carriers, dict):
        for carrier, value in carriers.items():
            if not isinstance(value, str):
                raise ConfigError(
                    f"rules.shipment.carriers.{carrier}: {_toml(value)} is not a duration string{_CARRIERS_EXAMPLE}"
                )


def config_from_dict(raw: dict[str, object], base_dir: str = "") -> Config:
    """Validate a parsed TOML document; ConfigError names the key's path and an example."""
    if "__base_dir__" in raw:
        raise ConfigError("__base_dir__: not a config key")
    _check_carriers(raw)
    _check_sources_raw(raw)
    try:
        cfg = msgspec.convert({**raw, "__base_dir__": base_dir}, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(_validation_message(exc, raw)) from None
    shipment = cfg.rules.shipment
    _duration("rules.shipment.stall_after", shipment.stall_after, ', e.g. stall_after = "6h"', positive=True)
    for carrier, text in shipment.carriers.items():
        if not carrier:
            raise ConfigError(f"rules.shipment.carriers: a carrier name is empty{_CARRIERS_EXAMPLE}")
        _duration(f"rules.shipment.carriers.{carrier}", text, _CARRIERS_EXAMPLE, positive=True)
    _duration("rules.max_future_skew", cfg.rules.max_future_skew, ', e.g. max_future_skew = "1h"', positive=False)
    _check_lease(cfg)
    _check_sources(cfg)
    url = cfg.nats.url.strip()
    if url != "embedded":
        for part in url.split(","):
            if not re.match(r"^(nats|tls|ws|wss)://[^\s]+$", part.strip()):
                raise ConfigError(
                    f"nats.url: {redact_text(part.strip())!r} is not 'embedded' or a nats://host:port URL"
                )
    problem = check_secret_forms(raw) or _check_nats(raw.get("nats"), cfg.nats) or check_oncall(cfg.oncall)
    if problem:
        raise ConfigError(problem)
    _check_http(raw.get("http"), cfg.http)
    return cfg


_SOURCE_NAME_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")


def _check_sources_raw(raw: dict[str, object]) -> None:
    """Name the source (and the field) msgspec would call `sources[...]`."""
    sources = raw.get("sources")
    if sources is None:
        return
    if not isinstance(sources, dict):
        raise ConfigError(f"sources: a table of tables, {SOURCE_EXAMPLE}")
    for name, table in sources.items():
        if not isinstance(table, dict):
            raise ConfigError(f"sources.{name}: a table, {SOURCE_EXAMPLE}")
        for sub in ("fields", "types"):
            entries = table.get(sub)
            if isinstance(entries, dict):
                for field, value in entries.items():
                    if sub == "types" and not isinstance(value, str):
                        raise ConfigError(f'sources.{name}.types.{field}: {_toml(value)} is not an event type string, e.g. {field} = "in_transit"')
                    if not isinstance(value, (str, int, float, bool)):
                        raise ConfigError(f'sources.{name}.fields.{field}: {_toml(value)} is not a path, template or value, e.g. {field} = "$.{field}"')
        try:
            msgspec.convert(table, SourceConfig)
        except msgspec.ValidationError as exc:
            text = str(exc)
            missing = re.search(r"missing required field `([^`]*)`", text)
            path = missing.group(1) if missing else _key_path(text)
            unknown = _UNKNOWN_RE.search(text)
            known = _unknown_key_message(f"sources.{name}.{path}", unknown.group(1)) if unknown else None
            if known:
                raise ConfigError(f"{known} A whole source, {SOURCE_EXAMPLE}") from None
            raise ConfigError(f"sources.{name}.{path}: {_PATH_RE.sub('', text).strip()}, {SOURCE_EXAMPLE}") from None


def _check_sources(cfg: Config) -> None:
    """Each `[sources.<name>]` mapping compiles (paths, templates, types, times, signature)."""
    for name, src in cfg.sources.items():
        if not _SOURCE_NAME_RE.match(name):
            raise ConfigError(
                f"sources.{name}: {name!r} is not a source name: 1-64 of A-Z a-z 0-9 _ - "
                "(it is the last part of POST /sources/<name>), e.g. [sources.shopify]"
            )
        try:
            compile_source(name, src)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if given(src.signature_header) != bool(secret_forms(msgspec.structs.asdict(src), "secret")):
            missing = "secret" if given(src.signature_header) else "signature_header"
            raise ConfigError(
                f"sources.{name}.{missing}: signature_header and a secret go together "
                f'(e.g. signature_header = "X-Shopify-Hmac-Sha256", secret_env = "SHOPIFY_WEBHOOK_SECRET"); '
                f"without both, POST /sources/{name} takes the ingest token instead"
            )


_LISTEN_EXAMPLE: Final = 'e.g. listen = "127.0.0.1:8080", "[::1]:8080", "0.0.0.0:8080" (with a token), or "off"'
_HOST_RE: Final = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)$")


def parse_listen(text: str) -> tuple[str, int] | None:
    """`("127.0.0.1", 8080)` of `"127.0.0.1:8080"` (`"[::1]:8080"` gives `"::1"`), None for "off".

    Raises ValueError with what is wrong (the caller names the key)."""
    text = text.strip()
    if text == "off":
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not _HOST_RE.match(host) or not port_text.isdigit():
        raise ValueError(f"{text!r} is not host:port or \"off\"")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"{text!r}: port {port} is above 65535")
    return host.removeprefix("[").removesuffix("]"), port


def is_loopback(host: str) -> bool:
    """Whether `host` (as `parse_listen` gives it) is a loopback address."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_http(raw: object, h: HttpConfig) -> None:
    table: dict[str, object] = raw if isinstance(raw, dict) else {}
    try:
        bound = parse_listen(h.listen)
    except ValueError as exc:
        raise ConfigError(f"http.listen: {exc}; {_LISTEN_EXAMPLE}") from None
    _duration("http.idempotency_ttl", h.idempotency_ttl, ', e.g. idempotency_ttl = "24h"', positive=True)
    for i, proxy in enumerate(h.trusted_proxies):
        import ipaddress

        try:
            ipaddress.ip_network(proxy.strip(), strict=False)
        except ValueError:
            raise ConfigError(
                f"http.trusted_proxies[{i}]: {proxy!r} is not an IP address or network, "
                'e.g. trusted_proxies = ["127.0.0.1", "10.0.0.0/8"]'
            ) from None
    if bound is not None and not is_loopback(bound[0]) and not secret_forms(table, "token"):
        raise ConfigError(
            f"http.listen: {h.listen!r} is not a loopback address and no http.token is set: anyone who "
            "reaches it could read every entity's state. Set a token (e.g. token_file = "
            '"/run/secrets/router_http_token"), or listen on loopback (e.g. listen = "127.0.0.1:8080")'
        )


def _check_lease(cfg: Config) -> None:
    r = cfg.router
    lease, renew = duration_us(r.lease), duration_us(r.lease_renew_every)
    if lease < 1_000_000:
        raise ConfigError(f'router.lease: {r.lease!r} is shorter than 1s, e.g. lease = "10s"')
    if renew <= 0 or renew * 3 > lease:
        raise ConfigError(
            f"router.lease_renew_every: {r.lease_renew_every!r} must be above 0 and at most a third of "
            f"router.lease ({r.lease!r}), so that two renewals can fail before the lease lapses, "
            f'e.g. lease = "10s", lease_renew_every = "3s"'
        )


def _check_nats(raw: object, n: NatsConfig) -> str | None:
    """Credential and TLS keys that only make sense together, or not at all."""
    table: dict[str, object] = raw if isinstance(raw, dict) else {}
    has_user, has_password = given(n.user), bool(secret_forms(table, "password"))
    if has_password and not has_user:
        return 'nats.user: required with nats.password (e.g. user = "router")'
    if has_user and not has_password:
        return 'nats.password: required with nats.user (e.g. password_file = "/run/secrets/nats_password")'
    if has_user and secret_forms(table, "token"):
        return "nats.token: give user and password, or token, not both"
    if given(n.creds) and secret_forms(table, "nkey_seed"):
        return "nats.nkey_seed: give creds (a .creds file holds the seed) or nkey_seed, not both"
    if given(n.tls_cert) != given(n.tls_key):
        missing = "tls_key" if given(n.tls_cert) else "tls_cert"
        return (
            f"nats.{missing}: tls_cert and tls_key go together "
            '(e.g. tls_cert = "certs/client.pem", tls_key = "certs/client-key.pem")'
        )
    tls = [k for k in ("tls_ca", "tls_cert", "tls_key") if given(getattr(n, k))]
    if n.tls_handshake_first:
        tls.append("tls_handshake_first")
    if tls and n.url.strip() == "embedded":
        return (
            f"nats.{tls[0]}: TLS settings are for an external server; the embedded one listens on "
            'loopback without TLS (set e.g. url = "tls://nats.example.com:4222")'
        )
    return None


def load_config(path: str | os.PathLike[str] | None) -> Config:
    """Read `path`, else ./config.toml when present, else the built-in defaults."""
    import tomllib

    if path is None:
        default = Path("config.toml")
        if not default.exists():
            return Config(base_dir=str(Path.cwd()))
        path = default
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config: {exc.strerror}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return config_from_dict(raw, base_dir=str(p.resolve().parent))
