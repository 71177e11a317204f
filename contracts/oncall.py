"""`[oncall]`: where `router oncall` sends exceptions (CONTRACT.md sections 6 and 8), decoded strictly.

Pure data and checks, no I/O. `contracts.config.Config` holds an `OncallConfig`; its loader calls
`check_oncall`, which returns the first problem as `<key.path>: <what>, e.g. <a good value>`.

```toml
[oncall]
alertmanager = "http://127.0.0.1:9093"   # empty: no Alertmanager
min_open = { low_stock = "2m" }          # per rule, counted from detected_at (0 by default)
console_url = "https://router.example.com"   # the console's external URL, for generatorURL
runbooks = { stockout = "https://wiki.example.com/runbooks/stockout" }
resend_every = "60s"                     # open alerts re-posted to Alertmanager this often
reconcile_every = "15s"                  # compared with router.exceptions.open this often
backfill_age = "0s"                      # raises whose event_ts is older than this at detection
                                         # are not paged ("0s": every raise pages)
in_router = true                         # `router run` runs the sink too (false: `router oncall` only)

[oncall.pagerduty]                       # Events API v2; off without a routing key
routing_key_file = "/run/secrets/pagerduty"
url = "https://events.pagerduty.com/v2/enqueue"

[oncall.webhook]                         # the exception payload as is, signed; off without url
url = "https://hooks.example.com/router"
signing_secret_env = "ROUTER_WEBHOOK_SECRET"

[[oncall.routes]]                        # which exceptions go to pagerduty / webhook
target = "pagerduty"
severity = ["critical"]
```
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

from contracts.rules import RULES

_DURATION: Final = r"^[0-9]+(\.[0-9]+)?(us|ms|s|m|h|d)$"
Duration = Annotated[str, Meta(pattern=_DURATION)]
_UNIT_US: Final = {"us": 1, "ms": 1_000, "s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}
RULE_NAMES: Final = frozenset(r.name for r in RULES)
KIND_NAMES: Final = ("sku", "shipment", "campaign")
SEVERITIES: Final = ("critical", "warning")
PAGERDUTY_URL: Final = "https://events.pagerduty.com/v2/enqueue"
_URL_RE: Final = re.compile(r"^https?://[^\s/@?#]+(/[^\s]*)?$")


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class PagerDutyConfig(_Section):
    """`[oncall.pagerduty]`: PagerDuty Events API v2. Off while no routing key is given."""

    routing_key: str | None = None
    routing_key_file: str | None = None
    routing_key_env: str | None = None
    url: str = PAGERDUTY_URL


class WebhookConfig(_Section):
    """`[oncall.webhook]`: POST of each exception payload as is, with an HMAC-SHA256 signature header."""

    url: str = ""
    signing_secret: str | None = None
    signing_secret_file: str | None = None
    signing_secret_env: str | None = None
    signature_header: str = "X-Router-Signature"


class OncallRoute(_Section):
    """One `[[oncall.routes]]` entry: exceptions matching every list given go to `target`."""

    target: Literal["pagerduty", "webhook"]
    kind: list[str] = []
    rule: list[str] = []
    severity: list[str] = []

    def matches(self, kind: str, rule: str, severity: str) -> bool:
        return (
            (not self.kind or kind in self.kind)
            and (not self.rule or rule in self.rule)
            and (not self.severity or severity in self.severity)
        )


class OncallConfig(_Section):
    alertmanager: str = ""
    min_open: dict[str, Any] = {}  # each value checked as a Duration by check_oncall
    console_url: str = ""
    runbooks: dict[str, Any] = {}  # each value checked as a URL by check_oncall
    resend_every: Duration = "60s"
    reconcile_every: Duration = "15s"
    backfill_age: Duration = "0s"
    # Durable consumers on EXCEPTIONS are `<consumer>_<target>` (oncall_alertmanager, ...).
    consumer: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_-]{1,48}$")] = "oncall"
    # With a target set, `router run` runs the sink too; false: only `router oncall` does.
    in_router: bool = True
    pagerduty: PagerDutyConfig = msgspec.field(default_factory=PagerDutyConfig)
    webhook: WebhookConfig = msgspec.field(default_factory=WebhookConfig)
    routes: list[OncallRoute] = []

    @property
    def configured(self) -> bool:
        """Whether any target is set (then `router run` runs the sink too)."""
        return bool(self.alertmanager.strip() or self.webhook.url.strip() or _given_secret(self.pagerduty))

    def targets(self) -> list[str]:
        out = []
        if self.alertmanager.strip():
            out.append("alertmanager")
        if _given_secret(self.pagerduty):
            out.append("pagerduty")
        if self.webhook.url.strip():
            out.append("webhook")
        return out

    def routed(self, target: str, kind: str, rule: str, severity: str) -> bool:
        """Whether an exception goes to `target` (pagerduty, webhook): every exception when no
        route names the target, else those some route of the target matches."""
        mine = [r for r in self.routes if r.target == target]
        return not mine or any(r.matches(kind, rule, severity) for r in mine)


def _given_secret(pd: PagerDutyConfig) -> bool:
    return any(v is not None and v.strip() for v in (pd.routing_key, pd.routing_key_file, pd.routing_key_env))


def duration_us(text: str) -> int:
    m = re.match(_DURATION, text)
    if m is None:
        raise ValueError(text)
    return round(float(text[: -len(m.group(2))]) * _UNIT_US[m.group(2)])


def _url_problem(path: str, value: str, example: str, *, empty_ok: bool) -> str | None:
    text = value.strip()
    if not text and empty_ok:
        return None
    if "@" in text.split("//", 1)[-1].split("/", 1)[0]:
        return f"{path}: credentials do not belong in a URL (they would be logged); {example}"
    if not _URL_RE.match(text):
        return f"{path}: {text!r} is not an http:// or https:// URL, {example}"
    return None


def check_oncall(o: OncallConfig) -> str | None:
    """The first problem of `[oncall]` as `<key.path>: ..., e.g. ...`, or None."""
    problem = (
        _url_problem("oncall.alertmanager", o.alertmanager, 'e.g. alertmanager = "http://127.0.0.1:9093"',
                     empty_ok=True)
        or _url_problem("oncall.console_url", o.console_url, 'e.g. console_url = "https://router.example.com"',
                        empty_ok=True)
        or _url_problem("oncall.pagerduty.url", o.pagerduty.url, f'e.g. url = "{PAGERDUTY_URL}"', empty_ok=False)
        or _url_problem("oncall.webhook.url", o.webhook.url, 'e.g. url = "https://hooks.example.com/router"',
                        empty_ok=True)
    )
    if problem:
        return problem
    for rule, text in o.min_open.items():
        if rule not in RULE_NAMES:
            return f"oncall.min_open.{rule}: not a rule (one of {', '.join(sorted(RULE_NAMES))}), e.g. min_open = {{ low_stock = \"2m\" }}"
        if not isinstance(text, str) or not re.match(_DURATION, text):
            return f'oncall.min_open.{rule}: {text!r} is not a duration, e.g. min_open = {{ {rule} = "2m" }}'
    for rule, url in o.runbooks.items():
        if rule not in RULE_NAMES:
            return (f"oncall.runbooks.{rule}: not a rule (one of {', '.join(sorted(RULE_NAMES))}), "
                    'e.g. runbooks = { stockout = "https://wiki.example.com/runbooks/stockout" }')
        if not isinstance(url, str):
            return f'oncall.runbooks.{rule}: {url!r} is not a URL string, e.g. runbooks = {{ {rule} = "https://wiki.example.com/runbooks/{rule}" }}'
        problem = _url_problem(f"oncall.runbooks.{rule}", url,
                               f'e.g. runbooks = {{ {rule} = "https://wiki.example.com/runbooks/{rule}" }}',
                               empty_ok=False)
        if problem:
            return problem
    if duration_us(o.resend_every) < 1_000_000 or duration_us(o.resend_every) > 180_000_000:
        return (f"oncall.resend_every: {o.resend_every!r} must be 1s to 3m (Alertmanager expects active alerts "
                'again every 30s-3m), e.g. resend_every = "60s"')
    if duration_us(o.reconcile_every) < 1_000_000:
        return f'oncall.reconcile_every: {o.reconcile_every!r} is shorter than 1s, e.g. reconcile_every = "15s"'
    if not re.match(r"^[A-Za-z0-9-]{1,64}$", o.webhook.signature_header):
        return ('oncall.webhook.signature_header: not a header name, '
                'e.g. signature_header = "X-Router-Signature"')
    if o.webhook.url.strip() and not any(
        v is not None and v.strip()
        for v in (o.webhook.signing_secret, o.webhook.signing_secret_file, o.webhook.signing_secret_env)
    ):
        return ('oncall.webhook.signing_secret: required with oncall.webhook.url (receivers check the signature), '
                'e.g. signing_secret_env = "ROUTER_WEBHOOK_SECRET"')
    targets = o.targets()
    for i, route in enumerate(o.routes):
        where = f"oncall.routes[{i}]"
        if route.target not in targets:
            what = "[oncall.pagerduty] routing_key" if route.target == "pagerduty" else "[oncall.webhook] url"
            return f"{where}.target: {route.target!r} is not configured (set {what}), e.g. target = \"pagerduty\""
        for field, allowed in (("kind", KIND_NAMES), ("rule", tuple(sorted(RULE_NAMES))), ("severity", SEVERITIES)):
            for value in getattr(route, field):
                if value not in allowed:
                    return (f"{where}.{field}: {value!r} is not one of {', '.join(allowed)}, "
                            f'e.g. {field} = ["{allowed[0]}"]')
    return None
