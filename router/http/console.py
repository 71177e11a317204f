"""The operator page at `/` and the JSON it needs beyond the contract's API.

- `GET /`: the page (router/http/static/index.html); its script and style under
  `/console/static/`. No build step: the files are shipped in the package as they are.
- `GET /console/board`: the open exceptions counted by severity, kind, rule and location, from
  the open index (`Runtime.open_counts`: one GROUP BY, no actor loaded), for the board's
  groups; the feed's raises and clears move them on between reads. An instance counts the
  partitions it runs (`partitions` says which).
- `GET /console/history/<kind>/<key>?limit=20`: the entity's last events from EVENTS
  (subject-filtered: `events.<kind>.<key>`, or `events.*.<kind>.<key>` when partitioned) and
  its last exceptions from EXCEPTIONS (`exceptions.<kind>.*.<key>`), oldest first.
- `GET /console/deadletters?limit=100&reason=`: the latest dead letters with their reasons,
  counts by reason among them, the stream's total, and which were redriven.

Every route here needs read access (the token or the login cookie, when a token is set).
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import aclosing
from pathlib import Path
from typing import Any, Final

from nats.js.errors import NotFoundError
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles

from contracts.events import KEY_RE, KINDS
from contracts.times import rfc3339
from router.http.context import HttpContext, route
from router.jetstream.deadletters import RedriveLedger
from router.jetstream.history import json_or_none, last_messages, preview
from router.jetstream.recovery import direct_batches, timestamp_ns
from router.jetstream.streams import stored_subject_filter

STATIC: Final = Path(__file__).with_name("static")
MAX_HISTORY: Final = 200
MAX_DEAD: Final = 1000
_NO_STORE: Final = {"Cache-Control": "no-store"}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=_NO_STORE)


def _limit(request: Request, default: int, most: int) -> int | JSONResponse:
    raw = request.query_params.get("limit", "")
    if raw == "":
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        return _error(400, f"limit: an integer from 1 to {most}, not {raw!r}")
    return int(raw)


def _time(text: str) -> str:
    try:
        return rfc3339((timestamp_ns(text) + 500) // 1000)
    except ValueError:
        return text


def routes(ctx: HttpContext) -> list[BaseRoute]:
    cfg = ctx.cfg
    nc = ctx.nc

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=_NO_STORE)

    async def board(request: Request) -> Response:
        """The open set counted by severity, kind, rule and location (the open index's GROUP BY)."""
        h = ctx.rt.health()
        try:
            counts = await ctx.rt.open_counts()
        except Exception as exc:
            return _error(503, f"counting the open exceptions failed: {type(exc).__name__}: {exc}")
        groups = [[*values, n] for values, n in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))]
        return JSONResponse(
            {
                "groups": groups,  # [severity, kind, rule, location or null, count]
                "total": sum(counts.values()),
                "partitions": sorted(p.partition for p in h.partitions),
                "partition_count": cfg.router.partitions,
            },
            headers=_NO_STORE,
        )

    async def history(request: Request) -> Response:
        kind, key = request.path_params["kind"], request.path_params["key"]
        if kind not in KINDS or not KEY_RE.match(key):
            return _error(400, f"bad_subject: {kind}/{key} is not <kind>/<key> (kind one of {', '.join(KINDS)})")
        n = _limit(request, 20, MAX_HISTORY)
        if isinstance(n, JSONResponse):
            return n
        events_filter = stored_subject_filter(f"events.{kind}.{key}", cfg.router.partitions)
        try:
            events = await last_messages(nc, cfg.streams.events, events_filter, n)
            excs = await last_messages(nc, cfg.streams.exceptions, f"exceptions.{kind}.*.{key}", n)
        except Exception as exc:
            return _error(503, f"reading the streams failed: {type(exc).__name__}: {exc}")
        out_events = []
        for m in events:
            body = json_or_none(m.data)
            out_events.append(
                {
                    "seq": m.seq,
                    "time": _time(m.time),
                    "subject": m.subject,
                    "type": body.get("type") if isinstance(body, dict) else None,
                    "payload": preview(m.data),
                }
            )
        out_excs = []
        for m in excs:
            body = json_or_none(m.data)
            if isinstance(body, dict):
                out_excs.append({**body, "stream_seq": m.seq})
        return JSONResponse(
            {"kind": kind, "key": key, "events": out_events, "exceptions": out_excs}, headers=_NO_STORE
        )

    async def deadletters(request: Request) -> Response:
        n = _limit(request, 100, MAX_DEAD)
        if isinstance(n, JSONResponse):
            return n
        reason = request.query_params.get("reason", "")
        stream = cfg.streams.deadletter
        try:
            info = await nc.jsm().stream_info(stream)
        except NotFoundError:
            return JSONResponse({"stream": stream, "total": 0, "by_reason": {}, "items": []}, headers=_NO_STORE)
        except Exception as exc:
            return _error(503, f"reading {stream} failed: {type(exc).__name__}: {exc}")
        total = int(info.state.messages or 0)
        first, last = int(info.state.first_seq or 0), int(info.state.last_seq or 0)
        items: list[dict[str, Any]] = []
        if total and last:
            # The latest `n` (of the reason asked, among the latest MAX_DEAD when filtered).
            start = max(first, 1, last - (MAX_DEAD if reason else n) + 1)
            async with aclosing(direct_batches(nc, stream, {"seq": start}, last)) as messages:
                async for msg in messages:
                    h = dict(msg.headers or {})
                    if reason and h.get("Router-Error") != reason:
                        continue
                    items.append(
                        {
                            "number": int(h.get("Nats-Sequence", 0)),
                            "time": _time(h.get("Nats-Time-Stamp", "")),
                            "reason": h.get("Router-Error", "?"),
                            "detail": h.get("Router-Detail", ""),
                            "subject": h.get("Router-Subject", ""),
                            "events_seq": int(h["Router-Seq"]) if h.get("Router-Seq", "").isdigit() else None,
                            "truncated": int(h["Router-Truncated"]) if h.get("Router-Truncated", "").isdigit() else None,
                            "payload": preview(bytes(msg.data or b""), 200),
                            "redriven": None,
                        }
                    )
            items = items[-n:]
        try:
            ledger = await RedriveLedger.open(nc, stream, create=False)
            redriven = await ledger.numbers()
            for item in items:
                if item["number"] in redriven and (held := await ledger.get(item["number"])) is not None:
                    item["redriven"] = {"seq": held[0].seq, "at": held[0].at, "state": held[0].state}
        except Exception:
            pass  # never redriven (no bucket yet), or NATS away: shown without the marks
        items.reverse()  # newest first
        by_reason = Counter(i["reason"] for i in items)
        return JSONResponse(
            {
                "stream": stream,
                "total": total,
                "by_reason": dict(by_reason.most_common()),
                "items": items,
                "as_of": rfc3339(time.time_ns() // 1000),
            },
            headers=_NO_STORE,
        )

    return [
        route("/", page),
        route("/console/board", board),
        route("/console/history/{kind}/{key}", history),
        route("/console/deadletters", deadletters),
        Mount("/console/static", app=StaticFiles(directory=STATIC), name="console-static"),
    ]
