"""What the on-call sink sent, what is pending and what failed: `router oncall status` and the page.

The sink writes this as JSON to `<data folder>/oncall/status.json` every second (a reader on the
same machine, such as the console inside `router run`, reads the file: `read_status(cfg)`) and
answers the same JSON on the NATS subject `router.oncall.status` (`STATUS_SUBJECT`, for readers
elsewhere). Shape::

    {"updated_at": "...Z", "sink_id": "host:pid:rand", "pid": 123, "started_at": "...Z",
     "targets": {"alertmanager": {
        "sent": {"open": 12, "close": 3, "resend": 40},   # accepted by the target
        "failed": 0,                                       # refused for good (4xx): see recent
        "retrying": null | {"what": "...", "attempts": 4, "since": "...Z", "error": "HTTP 503 ..."},
        "pending": {"stream": 0, "held": 1, "due": 0},     # EXCEPTIONS messages not yet done;
                                                           # open exceptions waiting for min_open;
                                                           # past it, not sent yet (behind a retry)
        "open": 9, "skipped_backfill": 0, "done_seq": 412, "caught_up": true,
        "last_success": "...Z" | null, "reconciled_at": "...Z" | null,
        "recent": [{"at": "...Z", "action": "open", "alert": "sku|SKU-1|stockout|BLR-1",
                    "id": "...", "outcome": "accepted", "detail": ""}, ...]}}}

`pending.stream` counts messages of EXCEPTIONS the target's consumer has not finished (the backlog
while a target is down); `retrying` is set while a delivery is being retried.
"""

from __future__ import annotations

import json
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from contracts.config import Config
from contracts.times import rfc3339

STATUS_SUBJECT: Final = "router.oncall.status"
STATUS_FILE: Final = "status.json"
RECENT: Final = 50


def now_iso() -> str:
    return rfc3339(time.time_ns() // 1000)


def oncall_dir(cfg: Config) -> Path:
    return cfg.data_dir / "oncall"


@dataclass
class TargetStatus:
    sent: dict[str, int] = field(default_factory=lambda: {"open": 0, "close": 0, "resend": 0})
    failed: int = 0
    retrying: dict[str, Any] | None = None
    pending_stream: int = 0
    held: int = 0
    due: int = 0
    open: int = 0
    skipped_backfill: int = 0
    done_seq: int = 0
    caught_up: bool = False
    last_success: str | None = None
    reconciled_at: str | None = None
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RECENT))

    def record(self, action: str, alert: str, exc_id: str, outcome: str, detail: str = "") -> None:
        at = now_iso()
        if outcome == "accepted":
            self.sent[action] = self.sent.get(action, 0) + 1
            self.last_success = at
            self.retrying = None
        elif outcome == "rejected":
            self.failed += 1
            self.retrying = None
        if action != "resend" or outcome != "accepted":
            self.recent.appendleft(
                {"at": at, "action": action, "alert": alert, "id": exc_id, "outcome": outcome, "detail": detail}
            )

    def as_json(self) -> dict[str, Any]:
        return {
            "sent": dict(self.sent),
            "failed": self.failed,
            "retrying": self.retrying,
            "pending": {"stream": self.pending_stream, "held": self.held, "due": self.due},
            "open": self.open,
            "skipped_backfill": self.skipped_backfill,
            "done_seq": self.done_seq,
            "caught_up": self.caught_up,
            "last_success": self.last_success,
            "reconciled_at": self.reconciled_at,
            "recent": list(self.recent),
        }


@dataclass
class SinkStatus:
    sink_id: str = ""
    targets: dict[str, TargetStatus] = field(default_factory=dict)
    started_at: str = field(default_factory=now_iso)

    def as_json(self) -> dict[str, Any]:
        return {
            "updated_at": now_iso(),
            "sink_id": self.sink_id,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "targets": {name: t.as_json() for name, t in self.targets.items()},
        }

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (STATUS_FILE + ".tmp")
        tmp.write_text(json.dumps(self.as_json(), indent=1))
        os.replace(tmp, folder / STATUS_FILE)


def read_status(cfg: Config) -> dict[str, Any] | None:
    """The status the sink last wrote to its data folder, or None when there is none."""
    try:
        data = json.loads((oncall_dir(cfg) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def format_status(data: dict[str, Any]) -> str:
    """The status for people: one block per target."""
    lines = [f"on-call sink pid {data.get('pid')}, started {data.get('started_at')}, updated {data.get('updated_at')}"]
    for name, t in sorted(data.get("targets", {}).items()):
        sent = t.get("sent", {})
        pend = t.get("pending", {})
        due = f", {pend['due']} due and not sent yet" if pend.get("due") else ""
        lines.append(
            f"{name}: sent open {sent.get('open', 0)}, close {sent.get('close', 0)}, resend {sent.get('resend', 0)}; "
            f"failed {t.get('failed', 0)}; pending {pend.get('stream', 0)} in the stream, {pend.get('held', 0)} held "
            f"for min_open{due}; open {t.get('open', 0)}; {'caught up' if t.get('caught_up') else 'catching up'} "
            f"(through seq {t.get('done_seq', 0)})"
        )
        retry = t.get("retrying")
        if retry:
            lines.append(
                f"  retrying since {retry.get('since')} ({retry.get('attempts')} attempts): {retry.get('what')}: "
                f"{retry.get('error')}"
            )
        for r in t.get("recent", [])[:10]:
            if r.get("outcome") != "accepted" or r.get("action") != "resend":
                detail = f" ({r['detail']})" if r.get("detail") else ""
                lines.append(f"  {r.get('at')} {r.get('action')} {r.get('alert')} {r.get('outcome')}{detail}")
    return "\n".join(lines)
