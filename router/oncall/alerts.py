"""What each target receives for an exception (CONTRACT.md section 8): pure functions, no I/O.

- Alertmanager: an alert whose labels identify it (`alertname` = rule, `kind`, `key`, `severity`,
  `location` when the rule has one, `carrier` for shipments whose carrier is known), `startsAt` =
  the raise's `detected_at`, annotations `summary` (its message), `id`, `runbook_url` when the
  rule has one, and `generatorURL` to the entity on the console.
- PagerDuty Events v2: trigger and resolve with `dedup_key` = `<kind>.<rule>.<key>[.<location>]`,
  hashed when longer than PagerDuty's 255 characters.
- Webhook: the exception payload exactly as published, signed with HMAC-SHA256 of the body.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from typing import Any, Final
from urllib.parse import quote

from contracts.oncall import OncallConfig
from contracts.times import rfc3339, to_us

DEDUP_MAX: Final = 255
SIGNATURE_PREFIX: Final = "sha256="


def parse_time_us(text: str) -> int:
    """Microseconds since the epoch of a time the router wrote (RFC 3339, UTC `Z`)."""
    return to_us(dt.datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00")))


def alert_key(exc: dict[str, Any]) -> str:
    """The identity of an exception's alert: one per kind, key, rule and location."""
    return f"{exc['kind']}|{exc['key']}|{exc['rule']}|{exc.get('location') or ''}"


def labels(exc: dict[str, Any], carrier: str | None = None) -> dict[str, str]:
    out = {
        "alertname": str(exc["rule"]),
        "kind": str(exc["kind"]),
        "key": str(exc["key"]),
        "severity": str(exc["severity"]),
    }
    if exc.get("location"):
        out["location"] = str(exc["location"])
    if carrier:
        out["carrier"] = carrier
    return out


def console_link(cfg: OncallConfig, kind: str, key: str) -> str:
    """The entity's drill-down on the operator page (`<console_url>/#<kind>/<key>`, the URL the page
    itself shares), or "" without a console URL."""
    base = cfg.console_url.strip().rstrip("/")
    if not base:
        return ""
    return f"{base}/#{quote(kind, safe='')}/{quote(key, safe='')}"


def am_alert(
    cfg: OncallConfig, exc: dict[str, Any], alert_labels: dict[str, str], *, ends_at_us: int
) -> dict[str, Any]:
    """The Alertmanager alert of an open exception (`exc` its raise), ending at `ends_at_us`.

    Firing: `ends_at_us` in the future (re-posted before it passes). Resolved: the time of the
    clear (never before `startsAt`, which Alertmanager refuses).
    """
    starts = parse_time_us(exc["detected_at"])
    annotations = {"summary": str(exc["message"]), "id": str(exc["id"])}
    runbook = cfg.runbooks.get(exc["rule"])
    if runbook:
        annotations["runbook_url"] = str(runbook)
    alert: dict[str, Any] = {
        "labels": alert_labels,
        "annotations": annotations,
        "startsAt": rfc3339(starts),
        "endsAt": rfc3339(max(ends_at_us, starts)),
    }
    link = console_link(cfg, exc["kind"], exc["key"])
    if link:
        alert["generatorURL"] = link
    return alert


def dedup_key(kind: str, rule: str, key: str, location: str | None) -> str:
    """`<kind>.<rule>.<key>` and `.<location>` when there is one; over 255 characters, a readable
    prefix and the SHA-256 of the whole (kind, rule and key hold no dots, so it is unambiguous)."""
    text = f"{kind}.{rule}.{key}" + (f".{location}" if location else "")
    if len(text) <= DEDUP_MAX:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()
    return f"{text[:DEDUP_MAX - len(digest) - 1]}#{digest}"


_PD_SEVERITY: Final = {"critical": "critical", "warning": "warning"}


def pagerduty_event(
    cfg: OncallConfig, routing_key: str, exc: dict[str, Any], action: str, alert_labels: dict[str, str]
) -> dict[str, Any]:
    """A PagerDuty Events v2 body: `trigger` (from the raise) or `resolve`."""
    event: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": action,
        "dedup_key": dedup_key(exc["kind"], exc["rule"], exc["key"], exc.get("location")),
    }
    if action != "trigger":
        return event
    location = exc.get("location")
    event["payload"] = {
        "summary": str(exc["message"])[:1024],
        "source": f"{exc['kind']}/{exc['key']}" + (f"@{location}" if location else ""),
        "severity": _PD_SEVERITY.get(exc["severity"], "warning"),
        "timestamp": exc["detected_at"],
        "component": exc["key"],
        "group": location or exc["kind"],
        "class": exc["rule"],
        "custom_details": {**exc, "labels": alert_labels},
    }
    event["client"] = "ops-router"
    links = []
    link = console_link(cfg, exc["kind"], exc["key"])
    if link:
        event["client_url"] = link
        links.append({"href": link, "text": "ops-router console"})
    runbook = cfg.runbooks.get(exc["rule"])
    if runbook:
        links.append({"href": str(runbook), "text": f"runbook: {exc['rule']}"})
    if links:
        event["links"] = links
    return event


def signature(secret: str, body: bytes) -> str:
    """`sha256=<hex HMAC-SHA256 of the body>`, the webhook's signature header value."""
    return SIGNATURE_PREFIX + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, body: bytes, header: str) -> bool:
    """What a receiver does: compare in constant time."""
    return hmac.compare_digest(signature(secret, body), header.strip())


def is_backfill(exc: dict[str, Any], backfill_age_us: int) -> bool:
    """A raise caused by an event whose `event_ts` was older than `backfill_age` when the router
    detected it (a partner's back-fill, a replay of old data). Timer raises never are: their
    `event_ts` is the deadline, and their lateness is the router's, not the data's."""
    if backfill_age_us <= 0 or exc.get("seq") is None:
        return False
    try:
        return parse_time_us(exc["detected_at"]) - parse_time_us(exc["event_ts"]) > backfill_age_us
    except (KeyError, ValueError, TypeError):
        return False
