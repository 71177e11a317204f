"""Reading secrets: one resolver for the three forms of CONTRACT.md section 6 (inline, `_file`, `_env`).

Which keys are secrets and how they are redacted is pure and lives in contracts/secrets.py; this
module does the I/O (a file, the environment). Errors are `ConfigError`s naming the key's path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import msgspec

from contracts.config import Config, ConfigError
from contracts.secrets import given, is_secret_key


def resolve_secret(cfg: Config, section: str, name: str, env: Mapping[str, str] | None = None) -> str | None:
    """The value of secret `name` of `[section]` (e.g. "nats", "password"), or None when not set.

    Inline: the value as written. `<name>_file`: the file's text without its trailing line end
    (relative paths are against the config file's folder). `<name>_env`: the variable's value.
    A file that cannot be read, a variable that is not set, and a file or variable that is empty
    are errors (the form was given on purpose, so nothing there is a mistake); an empty inline
    value is the same as no value. The config loader already refused two forms at once.
    """
    table: object = cfg
    for part in section.split("."):  # `sources.<name>`: a table of a dict
        table = table[part] if isinstance(table, dict) else getattr(table, part)
    inline = getattr(table, name, None)
    from_file = getattr(table, name + "_file", None)
    from_env = getattr(table, name + "_env", None)
    if given(from_file):
        assert isinstance(from_file, str)
        path = cfg.resolve(from_file.strip())
        key = f"{section}.{name}_file"
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"{key}: cannot read {path}: {exc.strerror or exc} "
                f'(a file holding the secret, e.g. {name}_file = "/run/secrets/{name}")'
            ) from None
        except UnicodeDecodeError:
            raise ConfigError(f"{key}: {path} is not UTF-8 text") from None
        value = text.rstrip("\r\n")
        if not value.strip():
            raise ConfigError(f"{key}: {path} is empty")
        return value
    if given(from_env):
        assert isinstance(from_env, str)
        variable = from_env.strip()
        environ = os.environ if env is None else env
        key = f"{section}.{name}_env"
        if variable not in environ:
            raise ConfigError(
                f"{key}: environment variable {variable} is not set "
                f'(the name of a variable holding the secret, e.g. {name}_env = "{name.upper()}")'
            )
        if not environ[variable].strip():
            raise ConfigError(f"{key}: environment variable {variable} is empty")
        return environ[variable]
    if given(inline):
        assert isinstance(inline, str)
        return inline
    return None


def resolve_all(cfg: Config, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every secret the config sets, by key path (`nats.password`): fails early, as `router run` starts."""
    found: dict[str, str] = {}

    def walk(struct: object, path: str) -> None:
        for field in msgspec.structs.fields(type(struct)):  # type: ignore[arg-type]
            value = getattr(struct, field.name)
            if isinstance(value, msgspec.Struct):
                walk(value, f"{path}.{field.name}" if path else field.name)
            elif isinstance(value, dict):  # [sources.<name>]
                for name, table in value.items():
                    if isinstance(table, msgspec.Struct):
                        walk(table, f"{path}.{field.name}.{name}" if path else f"{field.name}.{name}")
            elif path and is_secret_key(field.name):
                secret = resolve_secret(cfg, path, field.name, env)
                if secret is not None:
                    found[f"{path}.{field.name}"] = secret

    walk(cfg, "")
    return found
