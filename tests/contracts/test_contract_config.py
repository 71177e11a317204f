"""Config: the section-6 defaults, strict keys named by path, durations, loading from a file."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors import Thresholds
from contracts.config import Config, ConfigError, config_from_dict, duration_us, load_config


def test_defaults_are_the_contract_ones() -> None:
    cfg = config_from_dict({})
    assert cfg.nats.url == "embedded"
    assert (cfg.streams.events, cfg.streams.exceptions, cfg.streams.deadletter) == (
        "EVENTS",
        "EXCEPTIONS",
        "DEADLETTER",
    )
    assert cfg.snapshots.path == "data/router.db"
    sku = cfg.rules.sku
    assert (sku.low_stock_threshold, sku.return_window_hours, sku.return_spike_min_units) == (5, 24, 10)
    assert sku.return_spike_ratio == 0.2
    assert cfg.rules.shipment.stall_after == "6h"
    assert cfg.rules.campaign.cpa_min_spend == 100.0
    assert Thresholds.from_rules(cfg.rules) == Thresholds()


@pytest.mark.parametrize(
    ("raw", "prefix"),
    [
        ({"nats": {"urll": "nats://x:4222"}}, "nats.urll:"),
        ({"rules": {"sku": {"low_stok_threshold": 3}}}, "rules.sku.low_stok_threshold:"),
        ({"rules": {"shipments": {}}}, "rules.shipments:"),
        ({"bogus": 1}, "bogus:"),
        ({"streams": {"events": 5}}, "streams.events:"),
        ({"streams": {"events": "A.B"}}, "streams.events:"),
        ({"rules": {"sku": {"low_stock_threshold": "5"}}}, "rules.sku.low_stock_threshold:"),
        ({"rules": {"sku": {"low_stock_threshold": 2.5}}}, "rules.sku.low_stock_threshold:"),
        ({"rules": {"sku": {"return_window_hours": 0}}}, "rules.sku.return_window_hours:"),
        ({"rules": {"sku": {"return_spike_ratio": -0.1}}}, "rules.sku.return_spike_ratio:"),
        ({"rules": {"shipment": {"stall_after": "6"}}}, "rules.shipment.stall_after:"),
        ({"rules": {"shipment": {"stall_after": "6x"}}}, "rules.shipment.stall_after:"),
        ({"rules": {"shipment": {"stall_after": "-1h"}}}, "rules.shipment.stall_after:"),
        ({"rules": {"shipment": {"stall_after": "0s"}}}, "rules.shipment.stall_after:"),
        ({"rules": {"shipment": {"stall_after": 6}}}, "rules.shipment.stall_after:"),
        ({"nats": {"url": "http://localhost:4222"}}, "nats.url:"),
        ({"nats": {"url": "nats://a:4222, bogus"}}, "nats.url:"),
        ({"nats": "embedded"}, "nats:"),
        ({"__base_dir__": "/"}, "__base_dir__:"),
    ],
)
def test_a_bad_key_fails_with_its_path(raw: dict[str, object], prefix: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert str(info.value).startswith(prefix), str(info.value)
    assert "\n" not in str(info.value)


def test_several_urls_and_ints_for_floats() -> None:
    cfg = config_from_dict(
        {"nats": {"url": "nats://a:4222,tls://b:4222"}, "rules": {"campaign": {"cpa_min_spend": 50}}}
    )
    assert cfg.rules.campaign.cpa_min_spend == 50.0


@pytest.mark.parametrize(
    ("text", "us"),
    [
        ("500ms", 500_000),
        ("30s", 30_000_000),
        ("15m", 900_000_000),
        ("6h", 21_600_000_000),
        ("2d", 172_800_000_000),
        ("1.5h", 5_400_000_000),
        ("250us", 250),
        ("0s", 0),
    ],
)
def test_durations(text: str, us: int) -> None:
    assert duration_us(text) == us


@pytest.mark.parametrize("text", ["", "6", "h", "6 h", "-1s", "1.s", "6H", "1w", ".5s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        duration_us(text)


def test_stall_after_reaches_the_thresholds() -> None:
    cfg = config_from_dict({"rules": {"shipment": {"stall_after": "90m"}, "sku": {"return_spike_ratio": 1}}})
    th = Thresholds.from_rules(cfg.rules)
    assert th.stall_after_us == 90 * 60 * 1_000_000
    assert th.return_spike_ratio == 1.0


def test_load_config_resolves_paths_against_the_file(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "config.toml"
    path.parent.mkdir()
    path.write_text('[snapshots]\npath = "state/r.db"\n\n[rules.sku]\nlow_stock_threshold = 3\n')
    cfg = load_config(path)
    assert cfg.rules.sku.low_stock_threshold == 3
    assert cfg.snapshot_path == path.parent.resolve() / "state" / "r.db"
    assert cfg.data_dir == path.parent.resolve() / "state"


def test_load_config_errors_name_the_file_or_the_key(tmp_path: Path) -> None:
    bad_toml = tmp_path / "a.toml"
    bad_toml.write_text("[nats\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad_toml)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
    bad_key = tmp_path / "b.toml"
    bad_key.write_text('[nats]\nurll = "x"\n')
    with pytest.raises(ConfigError, match=r"^nats\.urll:"):
        load_config(bad_key)


def test_without_a_file_the_defaults_are_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None)
    assert cfg.nats.url == "embedded"
    assert cfg.snapshot_path == tmp_path / "data" / "router.db"
    (tmp_path / "config.toml").write_text('[streams]\nevents = "EV2"\n')
    assert load_config(None).streams.events == "EV2"


def test_config_is_a_struct_with_defaults() -> None:
    assert Config().rules.shipment.stall_after == "6h"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"rules": {"shipment": {"stall_after": "6 hours"}}},
            'rules.shipment.stall_after: "6 hours" is not a duration: a string of a number and a unit '
            '(us, ms, s, m, h, d) with no space, e.g. stall_after = "6h"',
        ),
        (
            {"streams": {"max_age": "7days"}},
            'streams.max_age: "7days" is not a duration: a string of a number and a unit '
            '(us, ms, s, m, h, d) with no space, e.g. max_age = "7d"',
        ),
        (
            {"snapshots": {"every": 5}},
            "snapshots.every: 5 is not a duration: a string of a number and a unit "
            '(us, ms, s, m, h, d) with no space, e.g. every = "5s"',
        ),
        (
            {"streams": {"events": "A.B"}},
            'streams.events: "A.B" is not a valid name: 1-64 of A-Z a-z 0-9 _ -, e.g. events = "EVENTS"',
        ),
        (
            {"rules": {"shipment": {"stall_after": "0s"}}},
            'rules.shipment.stall_after: must be longer than 0, e.g. stall_after = "6h"',
        ),
    ],
)
def test_a_bad_value_is_shown_with_a_good_example_not_a_regex(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    assert str(info.value) == message
    assert "regex" not in str(info.value)


def test_a_wrong_type_names_an_example_of_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"rules": {"sku": {"low_stock_threshold": "5"}}})
    assert str(info.value).endswith(", e.g. low_stock_threshold = 5")


def test_the_log_summary_interval() -> None:
    assert duration_us(config_from_dict({}).log.summary_every) == 10_000_000
    assert duration_us(config_from_dict({"log": {"summary_every": "0s"}}).log.summary_every) == 0
    with pytest.raises(ConfigError, match=r'^log.summary_every: "10" is not a duration: .*e.g. summary_every = "10s"$'):
        config_from_dict({"log": {"summary_every": "10"}})


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"rules": {"sku": {"low_stok_threshold": 3}}},
         '"low_stok_threshold" is not a key of [rules.sku]; did you mean low_stock_threshold '
         "(e.g. low_stock_threshold = 5)? Its keys: low_stock_threshold, return_window_hours,"),
        ({"htpp": {"listen": "127.0.0.1:8080"}},
         '"htpp" is not a key of the config; did you mean http? Its keys: nats, streams, snapshots, router, log, '
         "rules, sources, http, oncall."),
        ({"oncall": {"webhook": {"url": "http://x", "secret": "s"}}},
         '"secret" is not a key of [oncall.webhook]; did you mean signing_secret? Its keys: url, signing_secret,'),
        ({"oncall": {"routes": [{"target": "webhook", "kinds": ["sku"]}]}},
         '"kinds" is not a key of [oncall.routes[0]]; did you mean kind? Its keys: target, kind, rule, severity.'),
        ({"streams": {"retention": "7d"}},
         '"retention" is not a key of [streams]. Its keys: events, exceptions, deadletter, max_age,'),
        ({"sources": {"shop": {"kind": "sku", "key": "$.k", "type": "counted", "secrett": "x"}}},
         '"secrett" is not a key of [sources.shop]; did you mean secret? Its keys: kind, key, type,'),
    ],
)
def test_an_unknown_key_names_the_table_the_likely_key_and_the_keys_there(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    text = str(info.value)
    path = message.split('"')[1]
    assert text.split(": ", 1)[0].endswith(path), text
    assert message in text, text
    assert "base_dir" not in text
