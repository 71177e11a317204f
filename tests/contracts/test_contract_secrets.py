"""Secrets in the config: the three forms, the checks that go with them, and the one redaction function."""

from __future__ import annotations

import pytest

from contracts.config import ConfigError, config_from_dict
from contracts.secrets import REDACTED, is_secret_key, redact, redact_text

# A password with every character that broke the old cut-at-the-first-@ redaction.
HARD = "p@ss:w/rd"
SEED = "SUAKXXV5GZF6LOEC2CTDT2FCEEO3PQNFK7S7BETRRXJ4OE6LQWA5NMDDY4"
JWT = "eyJ0eXAiOiJKV1QiLCJhbGciOiJlZDI1NTE5LW5rZXkifQ.eyJqdGkiOiJBQkMiLCJzdWIiOiJVQUJDIn0.c2lnbmF0dXJlX2J5dGVz"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (f"nats://router:{HARD}@10.0.0.5:4222", "nats://***@10.0.0.5:4222"),
        ("nats://s3cr3t-token@nats.example.com:4222", "nats://***@nats.example.com:4222"),
        (
            f"nats://a:{HARD}@h1:4222,tls://b:{HARD}@h2:4222, nats://h3:4222",
            "nats://***@h1:4222,tls://***@h2:4222, nats://h3:4222",
        ),
        (
            f"cannot connect to NATS at nats://u:{HARD}@h:4222 (nats.url): OSError('nats://u:{HARD}@h:4222')",
            "cannot connect to NATS at nats://***@h:4222 (nats.url): OSError('nats://***@h:4222')",
        ),
        ("nats://127.0.0.1:4222 and user@example.com", "nats://127.0.0.1:4222 and user@example.com"),
        (f"seed {SEED} here", "seed *** here"),
        (f"jwt={JWT}", "jwt=***"),
        (
            "-----BEGIN USER NKEY SEED-----\nSUAB\n------END USER NKEY SEED------",
            "-----BEGIN USER NKEY SEED-----***------END USER NKEY SEED------",
        ),
        ("-----BEGIN PRIVATE KEY-----\nMIGHAgEA\n-----END PRIVATE KEY-----", "-----BEGIN PRIVATE KEY-----***-----END PRIVATE KEY-----"),
        (f"{{'user': 'router', 'password': '{HARD}', 'token': \"t0k\"}}", "{'user': 'router', 'password': '***', 'token': \"***\"}"),
        (f'{{"pass": "{HARD}", "auth_token": "t0k"}}', '{"pass": "***", "auth_token": "***"}'),
        ("password=hunter2 ingest_token=abc tokens=5", "password=*** ingest_token=*** tokens=5"),
        ('{"password": "a\\"b@c", "user": "u"}', '{"password": "***", "user": "u"}'),
        ("{'password': 'it\\'s-@'}", "{'password': '***'}"),
        ("seed=42 processed=7", "seed=42 processed=7"),
    ],
)
def test_redact_text(text: str, shown: str) -> None:
    assert redact_text(text) == shown


def test_no_part_of_a_hard_password_survives() -> None:
    for piece in ("p@ss", "ss:w", "w/rd", "rd@"):
        assert piece not in redact_text(f"url=nats://router:{HARD}@host:4222"), piece


def test_redact_masks_secret_keys_at_any_depth_and_text_everywhere() -> None:
    data = {
        "nats": {
            "url": f"nats://u:{HARD}@h:4222",
            "user": "router",
            "password": HARD,
            "password_file": "/run/secrets/nats",
            "token": None,
            "nkey_seed": "",
            "creds": "router.creds",
        },
        "http": {"ingest_token": "abc", "webhook_secret": "xyz", "listen": "127.0.0.1:8080"},
        "errors": [f"nats://u:{HARD}@h", (SEED, 3)],
        4: "four",
    }
    shown = redact(data)
    assert shown == {
        "nats": {
            "url": "nats://***@h:4222",
            "user": "router",
            "password": REDACTED,
            "password_file": "/run/secrets/nats",  # where it is, not what it is
            "token": None,  # not set stays not set
            "nkey_seed": "",
            "creds": "router.creds",
        },
        "http": {"ingest_token": REDACTED, "webhook_secret": REDACTED, "listen": "127.0.0.1:8080"},
        "errors": ["nats://***@h", (REDACTED, 3)],
        4: "four",
    }
    assert data["nats"]["password"] == HARD  # a copy: the original is untouched


def test_which_keys_are_secrets() -> None:
    assert all(map(is_secret_key, ["password", "token", "ingest_token", "nkey_seed", "signing_secret"]))
    assert not any(map(is_secret_key, ["user", "password_file", "token_env", "creds", "tls_key", "seed"]))


@pytest.mark.parametrize(
    ("nats", "prefix"),
    [
        ({"password": "a", "password_file": "f", "user": "u"}, "nats.password: given as password and password_file"),
        ({"token_file": "f", "token_env": "T"}, "nats.token: given as token_file and token_env"),
        ({"nkey_seed": SEED, "nkey_seed_env": "SEED"}, "nats.nkey_seed: given as nkey_seed and nkey_seed_env"),
        ({"password": "a"}, "nats.user: required with nats.password"),
        ({"user": "u"}, "nats.password: required with nats.user"),
        ({"user": "u", "password_env": "P", "token": "t"}, "nats.token: give user and password, or token"),
        ({"creds": "a.creds", "nkey_seed_file": "seed"}, "nats.nkey_seed: give creds"),
        ({"url": "tls://h:4222", "tls_cert": "c.pem"}, "nats.tls_key: tls_cert and tls_key go together"),
        ({"url": "tls://h:4222", "tls_key": "k.pem"}, "nats.tls_cert: tls_cert and tls_key go together"),
        ({"tls_ca": "ca.pem"}, "nats.tls_ca: TLS settings are for an external server"),
        ({"tls_handshake_first": True}, "nats.tls_handshake_first: TLS settings are for an external server"),
        ({"password_fil": "x"}, "nats.password_fil:"),  # a typo is an unknown key
    ],
)
def test_secret_and_transport_keys_that_do_not_fit(nats: dict[str, object], prefix: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"nats": nats})
    assert str(info.value).startswith(prefix), str(info.value)


def test_two_forms_of_a_secret_elsewhere_are_refused_too() -> None:
    # Any section: the rule is by key name, so the next sections' secrets get it for free.
    from contracts.secrets import check_secret_forms

    assert check_secret_forms({"http": {"token": "a", "token_env": "B"}}) == (
        'http.token: given as token and token_env; give one of token (inline), token_file '
        '(e.g. token_file = "/run/secrets/token") or token_env (e.g. token_env = "TOKEN")'
    )
    assert check_secret_forms({"http": {"token": "", "token_env": "B"}}) is None  # empty = not set


def test_empty_values_are_not_set() -> None:
    cfg = config_from_dict(
        {"nats": {"url": "nats://h:4222", "user": "", "password": "", "token_file": "", "tls_ca": "", "creds": ""}}
    )
    assert cfg.nats.user == ""  # kept as written; `given()` treats it as absent everywhere


def test_a_bad_url_error_does_not_echo_its_password() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"nats": {"url": f"nats://u:{HARD}@h:4222, bogus"}})
    assert "p@ss" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        config_from_dict({"nats": {"url": f"http://u:{HARD}@h:4222"}})
    assert "p@ss" not in str(info.value)
    assert str(info.value).startswith("nats.url: 'http://***@h:4222'")
