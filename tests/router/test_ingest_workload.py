"""A seeded workload published one third over HTTP (with retried idempotency keys, invalid bodies
and the batch form) and the rest over NATS ends, against the fold of the stream, with every
exception exactly once and nothing stored twice."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from pathlib import Path
from urllib.parse import quote

import nats
import pytest

from contracts.config import duration_us
from contracts.decode import DecodeError, check_ingest
from router.workload import workload
from tests.router.test_ingest_http import http_router
from tests.support.natsserver import NatsServer
from tests.support.oracle import read_stream
from tests.support.procs import settled_exactly_once

pytestmark = pytest.mark.anyio

DAY_US = 86_400_000_000


def path_of(subject: str) -> tuple[str, str, str]:
    """(path, kind, key) of a subject as an HTTP producer would post it (bad subjects stay bad)."""
    tokens = subject.split(".")
    kind = tokens[1] if len(tokens) > 1 else ""
    key = ".".join(tokens[2:])
    return f"/events/{quote(kind, safe='')}/{quote(key, safe='')}", kind, key


async def test_one_third_over_http_ends_exactly_once(tmp_path: Path, nats_server: NatsServer) -> None:
    url = nats_server.url
    # A day ahead, so that no timer fires while the test runs (the skew guard allows two days).
    messages = list(workload(seed=21, count=4500, bad_share=0.03, now_us=time.time_ns() // 1000 + DAY_US))
    rng = random.Random(21)
    async with http_router(tmp_path, url) as (rp, client, cfg):
        skew = duration_us(cfg.rules.max_future_skew)
        nc = await nats.connect(url)
        sent_nats = 0
        accepted: dict[str, tuple[int, bytes, str]] = {}  # idempotency key -> (seq, body, subject)
        rejected: Counter[str] = Counter()
        retried = 0
        batch: list[tuple[int, str, str, bytes]] = []

        async def flush_batch() -> None:
            # The event's bytes as they are, inside the line: what is stored.
            lines = [json.dumps({"kind": k, "key": key, "idempotency_key": f"wl-{i}"}).encode()[:-1] + b', "event": ' + d + b"}"
                     for i, k, key, d in batch]
            r = await client.post("/events", content=b"\n".join(lines))
            assert r.status_code == 200, r.text
            answers = [json.loads(x) for x in r.text.splitlines()]
            assert len(answers) == len(batch)
            for (i, k, key, d), a in zip(batch, answers, strict=True):
                assert a["status"] == 202, a
                assert a["duplicate"] is False
                accepted[f"wl-{i}"] = (a["seq"], d, f"events.{k}.{key}")
            batch.clear()

        try:
            for i, (subject, data) in enumerate(messages):
                if i % 3:
                    await nc.publish(subject, data)
                    sent_nats += 1
                    continue
                path, kind, key = path_of(subject)
                try:
                    check_ingest(kind, key, data, time.time_ns() // 1000, skew)
                    expect: str | None = None
                except DecodeError as err:
                    expect = err.code
                if expect is None and i % 9 == 3:
                    # Some valid events go in batches of up to 40 lines (one request each).
                    assert b"\n" not in data
                    batch.append((i, kind, key, data))
                    if len(batch) >= 40:
                        await nc.flush()
                        await flush_batch()
                    continue
                await nc.flush()  # what NATS got before this post is stored before it (one key's order)
                r = await client.post(path, content=data, headers={"Idempotency-Key": f"wl-{i}"})
                if expect is not None:
                    assert r.status_code == 400, (subject, data, r.text)
                    assert r.json()["error"] == expect, (subject, data, r.text)
                    rejected[expect] += 1
                    continue
                assert r.status_code == 202, (subject, data, r.text)
                assert r.json()["duplicate"] is False
                accepted[f"wl-{i}"] = (r.json()["seq"], data, subject)
                if rng.random() < 0.25:  # the producer did not see the answer and retries at once
                    again = await client.post(path, content=data, headers={"Idempotency-Key": f"wl-{i}"})
                    assert again.json() == {"seq": r.json()["seq"], "duplicate": True}
                    retried += 1
            if batch:
                await flush_batch()
            await nc.flush()
            # Retries long after the first copies, single and batched: all duplicates of the first seq.
            for idem in rng.sample(sorted(accepted), 60):
                seq, data, subject = accepted[idem]
                path, kind, key = path_of(subject)
                r = await client.post(path, content=data, headers={"Idempotency-Key": idem})
                assert r.json() == {"seq": seq, "duplicate": True}
                retried += 1
        finally:
            await nc.close()

        assert rejected["bad_subject"] > 0
        assert rejected["invalid"] + rejected["malformed"] + rejected["unknown_type"] > 0
        assert retried > 100
        exp = await settled_exactly_once(url, cfg, rp, timeout=120)
        assert rp.running

    # Nothing stored twice: each accepted HTTP event once, at its seq, with its bytes.
    events = await read_stream(url, cfg.streams.events)
    ids = Counter(m.headers.get("Nats-Msg-Id", "") for m in events)
    http_ids = {i: n for i, n in ids.items() if i.startswith("http:")}
    assert all(n == 1 for n in http_ids.values())
    assert len(http_ids) == len(accepted)
    by_seq = {m.seq: m for m in events}
    for idem, (seq, data, subject) in accepted.items():
        m = by_seq[seq]
        assert (m.subject, m.data) == (subject, data), idem
        assert m.headers["Nats-Msg-Id"] == f"http:{subject.split('.', 1)[1].replace('.', ':', 1)}:{idem}"
    from_producers = [m for m in events if not m.headers.get("Nats-Msg-Id", "").startswith("msg:")]
    assert len(from_producers) == sent_nats + len(accepted)
    # The fold saw HTTP events applied like any other; every exception exactly once (settled_exactly_once).
    assert exp.exception_ids
    raised_by_http = {
        i for i in exp.exception_ids if i.rsplit(":", 1)[1].isdigit() and int(i.rsplit(":", 1)[1]) in
        {seq for seq, _, _ in accepted.values()}
    }
    assert raised_by_http, "no exception was caused by an event that came over HTTP"
