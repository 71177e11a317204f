"""The three targets over HTTP: Alertmanager, PagerDuty Events v2 and a signed webhook.

Each call returns an `Outcome`: accepted (2xx), retry (no answer, 5xx, 408, 429: the target
is away or busy; the worker retries with backoff, without limit) or rejected (any other 4xx:
the target refuses this request for good, so it is recorded as failed and the worker moves
on rather than stall every later exception behind it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import httpx

from contracts.oncall import OncallConfig
from router.oncall import alerts

TIMEOUT_S: Final = 10.0
# Alertmanager takes any number of alerts per POST; the resend sends them in chunks of this many.
AM_CHUNK: Final = 500


@dataclass
class Entry:
    """One open exception as a target sees it (its raise, and the labels it was first sent with)."""

    akey: str
    exc: dict[str, Any]
    raw: bytes  # the raise payload as published
    labels: dict[str, str]
    # held: waiting for min_open; sending: being sent (a crash re-sends it); sent: the target has it;
    # skipped: a back-fill, never sent; closed: the router said it was no longer open when it was
    # due (a finished entity), not sent unless the router lists it open again.
    state: Literal["held", "sending", "sent", "skipped", "closed"]
    eligible_us: int


@dataclass(frozen=True)
class Outcome:
    kind: Literal["accepted", "retry", "rejected"]
    detail: str = ""


ACCEPTED: Final = Outcome("accepted")


def classify(resp: httpx.Response) -> Outcome:
    if 200 <= resp.status_code < 300:
        return ACCEPTED
    body = resp.text[:200].replace("\n", " ")
    detail = f"HTTP {resp.status_code}: {body}".strip()
    if resp.status_code >= 500 or resp.status_code in (408, 429):
        return Outcome("retry", detail)
    return Outcome("rejected", detail)


async def post(client: httpx.AsyncClient, url: str, content: bytes, headers: dict[str, str]) -> Outcome:
    try:
        resp = await client.post(url, content=content, headers=headers, timeout=TIMEOUT_S)
    except httpx.HTTPError as exc:
        return Outcome("retry", f"{type(exc).__name__}: {exc}"[:200])
    return classify(resp)


@dataclass
class Target:
    """What a worker needs of a target: open an entry, close it, and (Alertmanager) resend."""

    name: str
    cfg: OncallConfig
    client: httpx.AsyncClient
    secret: str = ""
    # Whether a finished entity (no clear event) closes the entry: see router.oncall.worker.
    reconciles: bool = True
    # Whether entries are re-posted while open (Alertmanager forgets what is not).
    resends: bool = False
    # Whether a raise is sent only while the router still lists it open (Alertmanager mirrors the
    # open set; PagerDuty and the webhook get every raise and clear, as a record, in order).
    checks_open: bool = False
    # Whether a first start (a sink taking over elsewhere) closes what cleared in the last hour
    # of the stream it folds: an earlier sink may have opened it (PagerDuty ignores a resolve of an
    # unknown dedup_key; Alertmanager keeps a resolved alert it never saw firing as resolved). The
    # webhook is a record: it gets no copies.
    closes_recent_on_first_start: bool = False
    sent: dict[str, int] = field(default_factory=dict)

    def routed(self, exc: dict[str, Any]) -> bool:
        if self.name == "alertmanager":
            return True  # Alertmanager gets every open exception and routes itself
        return self.cfg.routed(self.name, str(exc["kind"]), str(exc["rule"]), str(exc["severity"]))

    async def open(self, entry: Entry, now_us: int) -> Outcome:
        raise NotImplementedError

    async def close(self, entry: Entry, clear_raw: bytes | None, now_us: int) -> Outcome:
        raise NotImplementedError

    async def resend(self, entries: list[Entry], now_us: int) -> Outcome:
        return ACCEPTED


class Alertmanager(Target):
    def _url(self) -> str:
        return self.cfg.alertmanager.strip().rstrip("/") + "/api/v2/alerts"

    def firing_ends_us(self, now_us: int) -> int:
        # As Prometheus does: a firing alert ends by itself four resend periods after the last
        # post, so alerts of a sink that stopped for good resolve rather than stay forever.
        return now_us + 4 * alerts_resend_us(self.cfg)

    async def _post(self, body: list[dict[str, Any]]) -> Outcome:
        return await post(self.client, self._url(), json.dumps(body).encode(), {"Content-Type": "application/json"})

    async def open(self, entry: Entry, now_us: int) -> Outcome:
        return await self._post([alerts.am_alert(self.cfg, entry.exc, entry.labels, ends_at_us=self.firing_ends_us(now_us))])

    async def close(self, entry: Entry, clear_raw: bytes | None, now_us: int) -> Outcome:
        ends = now_us
        if clear_raw is not None:
            ends = alerts.parse_time_us(json.loads(clear_raw)["detected_at"])
        return await self._post([alerts.am_alert(self.cfg, entry.exc, entry.labels, ends_at_us=ends)])

    async def resend(self, entries: list[Entry], now_us: int) -> Outcome:
        ends = self.firing_ends_us(now_us)
        for i in range(0, len(entries), AM_CHUNK):
            chunk = [alerts.am_alert(self.cfg, e.exc, e.labels, ends_at_us=ends) for e in entries[i : i + AM_CHUNK]]
            outcome = await self._post(chunk)
            if outcome.kind != "accepted":
                return outcome
        return ACCEPTED


class PagerDuty(Target):
    async def _send(self, entry: Entry, action: str) -> Outcome:
        body = alerts.pagerduty_event(self.cfg, self.secret, entry.exc, action, entry.labels)
        return await post(self.client, self.cfg.pagerduty.url, json.dumps(body).encode(),
                          {"Content-Type": "application/json"})

    async def open(self, entry: Entry, now_us: int) -> Outcome:
        return await self._send(entry, "trigger")

    async def close(self, entry: Entry, clear_raw: bytes | None, now_us: int) -> Outcome:
        return await self._send(entry, "resolve")


class Webhook(Target):
    """The exception payloads as published: the raise once it is due, its clear once that comes."""

    async def _send(self, body: bytes, exc_id: str) -> Outcome:
        headers = {
            "Content-Type": "application/json",
            self.cfg.webhook.signature_header: alerts.signature(self.secret, body),
            "X-Router-Exception-Id": exc_id,  # the same on every retry: receivers drop repeats by it
        }
        return await post(self.client, self.cfg.webhook.url.strip(), body, headers)

    async def open(self, entry: Entry, now_us: int) -> Outcome:
        return await self._send(entry.raw, str(entry.exc["id"]))

    async def close(self, entry: Entry, clear_raw: bytes | None, now_us: int) -> Outcome:
        if clear_raw is None:
            return ACCEPTED  # a finished entity has no clear payload to pass on
        return await self._send(clear_raw, str(json.loads(clear_raw)["id"]))


def alerts_resend_us(cfg: OncallConfig) -> int:
    from contracts.oncall import duration_us

    return duration_us(cfg.resend_every)


def make_targets(cfg: OncallConfig, client: httpx.AsyncClient, secrets: dict[str, str]) -> list[Target]:
    out: list[Target] = []
    for name in cfg.targets():
        if name == "alertmanager":
            out.append(Alertmanager(name, cfg, client, resends=True, checks_open=True,
                                    closes_recent_on_first_start=True))
        elif name == "pagerduty":
            out.append(PagerDuty(name, cfg, client, secret=secrets["oncall.pagerduty.routing_key"],
                                 closes_recent_on_first_start=True))
        else:
            out.append(Webhook(name, cfg, client, secret=secrets["oncall.webhook.signing_secret"], reconciles=False))
    return out
