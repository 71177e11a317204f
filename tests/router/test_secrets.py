"""Reading secrets (inline, `_file`, `_env`), the connect options built from them, and that no secret
reaches a log line or `router check-config`."""

from __future__ import annotations

import io
import json
import logging
import os
import ssl
import tomllib
from pathlib import Path
from typing import Any

import nkeys
import pytest
import structlog

from contracts.config import Config, ConfigError, config_from_dict
from router import cli
from router.jetstream.connection import connect_options
from router.logs import configure_logging
from router.secrets import resolve_all, resolve_secret
from tests.support.tls import make_certs

HARD = "p@ss:w/rd"
URL = f"nats://router:{HARD}@127.0.0.1:4333"


def user_seed() -> str:
    return str(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode())


SEED = user_seed()


def cfg_of(tmp_path: Path, **nats: Any) -> Config:
    return config_from_dict({"nats": {"url": "nats://127.0.0.1:4333", **nats}}, base_dir=str(tmp_path))


# --- the resolver ----------------------------------------------------------------------------


def test_three_forms_give_the_same_secret(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "pw").write_text(HARD + "\n")
    env = {"ROUTER_PW": HARD}
    for form in ({"password": HARD}, {"password_file": "secrets/pw"}, {"password_env": "ROUTER_PW"}):
        cfg = cfg_of(tmp_path, user="router", **form)
        assert resolve_secret(cfg, "nats", "password", env) == HARD, form
        assert resolve_all(cfg, env) == {"nats.password": HARD}
    assert resolve_secret(cfg_of(tmp_path, token=""), "nats", "token") is None  # empty: not set
    assert resolve_all(cfg_of(tmp_path), {}) == {}


@pytest.mark.parametrize(
    ("form", "message"),
    [
        ({"password_file": "nope"}, "nats.password_file: cannot read {dir}/nope: No such file or directory"),
        ({"password_file": "empty"}, "nats.password_file: {dir}/empty is empty"),
        ({"password_env": "ROUTER_UNSET_PW"}, "nats.password_env: environment variable ROUTER_UNSET_PW is not set"),
        ({"password_env": "ROUTER_EMPTY_PW"}, "nats.password_env: environment variable ROUTER_EMPTY_PW is empty"),
    ],
)
def test_a_missing_secret_names_its_key(tmp_path: Path, form: dict[str, str], message: str) -> None:
    (tmp_path / "empty").write_text("\n")
    cfg = cfg_of(tmp_path, user="router", **form)
    with pytest.raises(ConfigError) as info:
        resolve_all(cfg, {"ROUTER_EMPTY_PW": ""})
    assert str(info.value).startswith(message.format(dir=tmp_path)), str(info.value)


# --- connect options: one function, one rule for empty values ----------------------------------


def test_connect_options_from_each_kind_of_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "seed").write_text(SEED + "\n")
    (tmp_path / "router.creds").write_text("creds")
    base = connect_options(cfg_of(tmp_path), "nats://a:4222, nats://b:4222", name="x")
    assert base == {"servers": ["nats://a:4222", "nats://b:4222"], "name": "x"}
    assert connect_options(None, "nats://a:4222", name="x") == {"servers": ["nats://a:4222"], "name": "x"}

    monkeypatch.setenv("ROUTER_TEST_PW", HARD)
    opts = connect_options(cfg_of(tmp_path, user="router", password_env="ROUTER_TEST_PW"), "nats://a", name="x")
    assert (opts["user"], opts["password"]) == ("router", HARD)
    assert connect_options(cfg_of(tmp_path, token="t0k"), "nats://a", name="x")["token"] == "t0k"
    assert connect_options(cfg_of(tmp_path, nkey_seed_file="seed"), "nats://a", name="x")["nkeys_seed_str"] == SEED
    creds = connect_options(cfg_of(tmp_path, creds="router.creds"), "nats://a", name="x")
    assert creds["user_credentials"] == str(tmp_path / "router.creds")


def test_empty_values_are_not_sent(tmp_path: Path) -> None:
    """The daemon sent `user` with an empty password and the client sent empty strings: now neither."""
    cfg = cfg_of(tmp_path, user="", password="", token="", nkey_seed="", creds="", tls_ca="", tls_cert="", tls_key="")
    assert connect_options(cfg, "nats://a", name="x") == {"servers": ["nats://a"], "name": "x"}


@pytest.mark.parametrize(
    ("nats", "prefix"),
    [
        ({"nkey_seed": "SUnotaseed"}, "nats.nkey_seed: not a valid nkey seed"),
        ({"nkey_seed": "SA" + SEED[2:]}, "nats.nkey_seed: not an nkey user seed"),
        ({"nkey_seed_file": "nope"}, "nats.nkey_seed_file: cannot read"),
        ({"creds": "nope.creds"}, "nats.creds: cannot read"),
        ({"tls_ca": "nope.pem"}, "nats.tls_ca: cannot read"),
        ({"tls_ca": "garbage.pem"}, "nats.tls_ca: not a PEM CA certificate file"),
        ({"tls_cert": "garbage.pem", "tls_key": "garbage.pem"}, "nats.tls_cert:"),
    ],
)
def test_bad_keys_and_files_fail_with_the_key(tmp_path: Path, nats: dict[str, str], prefix: str) -> None:
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError) as info:
        connect_options(cfg_of(tmp_path, **nats), "nats://a", name="x")
    assert str(info.value).startswith(prefix), str(info.value)
    assert SEED[2:] not in str(info.value)


def test_tls_context_presents_the_client_certificate(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    cfg = cfg_of(
        tmp_path, tls_ca="certs/ca.pem", tls_cert="certs/client.pem", tls_key="certs/client-key.pem",
        tls_handshake_first=True,
    )  # fmt: skip
    opts = connect_options(cfg, "tls://127.0.0.1:4333", name="x")
    context = opts["tls"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert any("ops-router test ca" in str(c.get("subject")) for c in context.get_ca_certs())
    assert opts["tls_handshake_first"] is True
    mismatched = cfg_of(tmp_path, tls_cert=str(certs.client_cert), tls_key=str(certs.rogue_key))
    with pytest.raises(ConfigError, match=r"^nats\.tls_cert: .* do not make a PEM certificate and its private key"):
        connect_options(mismatched, "nats://a", name="x")


# --- nothing secret in a log line --------------------------------------------------------------


def _log_everything(fmt: str) -> str:
    out = io.StringIO()
    configure_logging("debug", fmt, stream=out)  # type: ignore[arg-type]
    try:
        log = structlog.get_logger()
        log.info("router_started", url=URL, partitions=1)
        log.warning("nats_error", error=repr(OSError(f"cannot reach {URL}")))
        log.info("connect", options={"servers": [URL], "user": "router", "password": HARD, "token": "t0k3n"})
        log.info("loaded", nkey_seed=SEED, creds_text=f"-----BEGIN USER NKEY SEED-----\n{SEED}\n------END USER NKEY SEED------")
        password = HARD  # a local variable a traceback could show

        def fail() -> None:
            raise RuntimeError(f"lost {URL} ({len(password)})")

        try:
            fail()
        except RuntimeError:
            log.exception("failed")
        logging.getLogger("nats.aio.client").error("nats: error from %s", URL)
        # Noise asyncio logs whenever a connection upgraded to TLS closes: dropped.
        logging.getLogger("asyncio").warning("returning true from eof_received() has no effect when using ssl")
    finally:
        configure_logging("info", "json", stream=io.StringIO())
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_no_secret_in_any_log_line(fmt: str) -> None:
    text = _log_everything(fmt)
    for secret in (HARD, "p@ss", "w/rd", "t0k3n", SEED, SEED[2:20]):
        assert secret not in text, (secret, text)
    # The lines are there, with what is safe to show.
    assert "router_started" in text
    assert "nats://***@127.0.0.1:4333" in text
    assert "failed" in text
    assert "RuntimeError" in text
    assert "nats: error from nats://***@127.0.0.1:4333" in text
    if fmt == "json":
        lines = [json.loads(line) for line in text.splitlines()]
        assert lines[2]["options"] == {
            "servers": ["nats://***@127.0.0.1:4333"], "user": "router", "password": "***", "token": "***",
        }  # fmt: skip
        assert lines[3]["nkey_seed"] == "***"


# --- nothing secret in `router check-config` ---------------------------------------------------


def test_check_config_shows_no_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROUTER_TOKEN", "t0k3n")
    (tmp_path / "seed").write_text(SEED + "\n")
    (tmp_path / "config.toml").write_text(
        f'[nats]\nurl = "{URL}, nats://127.0.0.1:4334"\nuser = "router"\npassword = "{HARD}"\n'
        'nkey_seed_file = "seed"\n'
    )
    code = cli.main(["check-config"])
    out, err = capsys.readouterr()
    assert code == 0, err
    for shown in (out, err):
        assert "p@ss" not in shown
        assert "w/rd" not in shown
        assert SEED not in shown
    doc = tomllib.loads(out)["nats"]
    assert doc["url"] == "nats://***@127.0.0.1:4333, nats://127.0.0.1:4334"
    assert (doc["user"], doc["password"], doc["nkey_seed_file"]) == ("router", "***", "seed")
    cli.main(["check-config", "--json"])
    out, _ = capsys.readouterr()
    assert json.loads(out)["nats"]["password"] == "***"
    assert "p@ss" not in out

    (tmp_path / "config.toml").write_text('[nats]\nurl = "nats://h:4222"\ntoken_env = "ROUTER_TOKEN"\n')
    assert cli.main(["check-config"]) == 0
    out, _ = capsys.readouterr()
    assert "t0k3n" not in out
    assert 'token_env = "ROUTER_TOKEN"' in out
    monkeypatch.delenv("ROUTER_TOKEN")
    assert cli.main(["check-config"]) == 2
    _, err = capsys.readouterr()
    assert err.startswith("config error: nats.token_env: environment variable ROUTER_TOKEN is not set")
