"""Which config keys are secrets, the three ways to give one, and the one redaction function.

Pure code (no I/O): reading a `<key>_file` or `<key>_env` is `router.secrets.resolve_secret`.

A secret key (`password`, `token`, `ingest_token`, `nkey_seed`, `secret`, `routing_key`, and any key
whose name ends in `_password`, `_token`, `_secret` or `_seed`) may be given in one of three forms
(CONTRACT.md section 6):

    password = "inline"              # in the file itself
    password_file = "secrets/nats"   # a file holding it (relative to the config file's folder)
    password_env = "NATS_PASSWORD"   # an environment variable holding it

An empty value (`""`) in any of the three forms is the same as leaving the key out.

`redact(value)` masks secrets in anything about to be shown: the values of secret keys in
mappings, and inside any text the user:password part of URLs, nkey seeds, JWTs, PEM private
keys and `password=...`-style pairs. The structlog processor of every log line and the config
printer of `router check-config` both use it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

REDACTED: Final = "***"

# Key names that are secrets wherever they appear in the config.
SECRET_KEYS: Final = frozenset({"password", "token", "ingest_token", "nkey_seed", "secret", "routing_key"})
_SECRET_SUFFIXES: Final = ("_password", "_token", "_secret", "_seed")
# Names that hold secrets outside the config too (nats-py's CONNECT fields, HTTP headers).
_ALSO_SECRET: Final = frozenset({"pass", "auth_token", "jwt", "sig", "nkeys_seed_str", "authorization"})
FORMS: Final = ("", "_file", "_env")


def is_secret_key(name: str) -> bool:
    """Whether a config key of this name holds a secret (its value is never shown)."""
    return name in SECRET_KEYS or name.endswith(_SECRET_SUFFIXES)


def given(value: object) -> bool:
    """The one rule for optional values: None and empty (or blank) strings mean "not set"."""
    if value is None:
        return False
    return not (isinstance(value, str) and not value.strip())


def secret_forms(table: Mapping[str, object], name: str) -> list[str]:
    """The keys of `table` that give secret `name` (`name`, `name_file`, `name_env`) with a value."""
    return [name + form for form in FORMS if given(table.get(name + form))]


def check_secret_forms(raw: Mapping[str, object], path: str = "") -> str | None:
    """The first secret given in more than one form anywhere in a parsed TOML document, as an error."""
    names = set()
    for key in raw:
        for form in ("_file", "_env"):
            if key.endswith(form) and is_secret_key(key.removesuffix(form)):
                names.add(key.removesuffix(form))
        if is_secret_key(key):
            names.add(key)
    for name in sorted(names):
        forms = secret_forms(raw, name)
        if len(forms) > 1:
            where = f"{path}.{name}" if path else name
            return (
                f"{where}: given as {' and '.join(forms)}; give one of {name} (inline), "
                f'{name}_file (e.g. {name}_file = "/run/secrets/{name}") or '
                f'{name}_env (e.g. {name}_env = "{name.upper()}")'
            )
    for key, value in raw.items():
        if isinstance(value, Mapping):
            problem = check_secret_forms(value, f"{path}.{key}" if path else str(key))
            if problem:
                return problem
    return None


# --- redaction -------------------------------------------------------------------------------

_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*://"
# A URL runs to whitespace, a quote or a bracket; a password may hold `@`, `:` and `/`, so the
# credentials end at the LAST `@` of the URL (of each URL of a comma-separated list).
_URL_RE: Final = re.compile(r"(?<![A-Za-z0-9+.\-])" + _SCHEME + r"[^\s\"'<>()\[\]{}]*")
_URL_SPLIT_RE: Final = re.compile(r",(?=" + _SCHEME + ")")
# NATS nkey seeds (user, account, operator, server, cluster, curve): S, a type letter, 56 base32.
_SEED_RE: Final = re.compile(r"S[UAONCX][A-Z2-7]{56}")
_JWT_RE: Final = re.compile(r"eyJ[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]{4,}\.[A-Za-z0-9_\-]*")
_PEM_RE: Final = re.compile(
    r"(-----BEGIN [A-Z0-9 ]*(?:PRIVATE KEY|SEED|JWT)[A-Z0-9 ]*-----)(.*?)(-+END [A-Z0-9 ]+-+)", re.DOTALL
)
_PAIR_WORDS: Final = ("pass", "token", "secret", "_seed", "seed_str", "authorization")
# `password='x'`, `"token": "x"`, `'pass': 'x'` (the repr of a dict; escaped quotes inside are
# part of the value) and `password=x`. The key is matched from its secret word on (what comes
# before, `ingest_` of `ingest_token`, is kept as it is), so no match is tried at every letter.
_PAIR_RE: Final = re.compile(
    r"(password|passwd|pass|token|secret|_seed|seed_str|authorization)"
    r"""(?:(['"]?\s*[:=]\s*)(['"])((?:\\.|(?!\3)[^\\])*)\3|(\s*=\s*)([^\s'",}\])]+))""",
    re.IGNORECASE,
)


def _mask_pair(m: re.Match[str]) -> str:
    if m.group(3) is not None:
        return f"{m.group(1)}{m.group(2)}{m.group(3)}{REDACTED}{m.group(3)}"
    return f"{m.group(1)}{m.group(5)}{REDACTED}"


def _redact_url(match: re.Match[str]) -> str:
    parts = []
    for part in _URL_SPLIT_RE.split(match.group(0)):
        scheme, sep, rest = part.partition("://")
        if "@" in rest:
            rest = REDACTED + "@" + rest.rsplit("@", 1)[1]
        parts.append(scheme + sep + rest)
    return ",".join(parts)


def redact_text(text: str) -> str:
    """`text` with URL credentials, nkey seeds, JWTs, private keys and secret pairs masked."""
    if "://" in text:
        text = _URL_RE.sub(_redact_url, text)
    if "-----BEGIN" in text:
        text = _PEM_RE.sub(lambda m: f"{m.group(1)}{REDACTED}{m.group(3)}", text)
    text = _SEED_RE.sub(REDACTED, text)
    text = _JWT_RE.sub(REDACTED, text)
    lowered = text.lower()
    if ("=" in text or ":" in text) and any(word in lowered for word in _PAIR_WORDS):
        text = _PAIR_RE.sub(_mask_pair, text)
    return text


def redact(value: Any, key: str | None = None) -> Any:
    """A copy of `value` safe to show: the one redaction function.

    Mappings: the values of secret keys become `***` (when set); everything else is redacted
    recursively. Text: `redact_text`. Other values are returned as they are.
    """
    if key is not None and (is_secret_key(key) or key.lower() in _ALSO_SECRET):
        return REDACTED if given(value) else value
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: redact(v, k if isinstance(k, str) else None) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    if isinstance(value, tuple):
        return tuple(redact(v) for v in value)
    return value
