"""A local HTTP receiver for webhook and PagerDuty tests: records every request, fails on purpose.

Runs a ThreadingHTTPServer on a free loopback port in a thread. `failing = True` answers 503
(and records the attempt as refused); otherwise 202 and the request counts as accepted.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.natsserver import HOST


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    accepted: bool

    def json(self) -> Any:
        return json.loads(self.body)


class Receiver:
    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.failing = False
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                with receiver.lock:
                    accepted = not receiver.failing
                    receiver.requests.append(
                        Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, accepted)
                    )
                self.send_response(202 if accepted else 503)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"status":"success"}' if accepted else b'{"status":"unavailable"}')

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def accepted(self, path: str | None = None) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.accepted and (path is None or r.path == path)]

    def refused(self) -> int:
        with self.lock:
            return sum(1 for r in self.requests if not r.accepted)


@contextlib.contextmanager
def running_receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.thread.start()
    try:
        yield r
    finally:
        r.server.shutdown()
        r.server.server_close()
