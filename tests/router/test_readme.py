"""The README's console examples print what the commands print."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import anyio
import nats
import pytest

from router import cli
from tests.support.natsserver import NatsServer

README = Path(__file__).resolve().parents[2] / "README.md"


def console_examples(text: str) -> list[tuple[list[str], list[str]]]:
    """(argv after `router`, output lines) of every `$ router ...` line in ```console blocks."""
    examples: list[tuple[list[str], list[str]]] = []
    for block in re.findall(r"^```console\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        current: tuple[list[str], list[str]] | None = None
        for line in block.splitlines():
            if line.startswith("$ "):
                argv = shlex.split(line[2:])
                current = (argv[1:], []) if argv[0] == "router" else None
                if current is not None:
                    examples.append(current)
            elif current is not None:
                current[1].append(line)
    return examples


async def _events_stream(url: str) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(name="EVENTS", subjects=["events.>"])
    finally:
        await nc.close()


def test_readme_pub_and_check_config_examples_match_the_real_output(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NATS_URL", raising=False)
    (tmp_path / "bad.toml").write_text('[rules.shipment]\nstall_after = "6 hours"\n')
    monkeypatch.delenv("NATS_PASSWORD", raising=False)
    (tmp_path / "prod.toml").write_text(
        '[nats]\nurl = "nats://127.0.0.1:4222"\nuser = "router"\npassword_env = "NATS_PASSWORD"\n'
    )
    anyio.run(_events_stream, nats_server.url)
    examples = [(argv, out) for argv, out in console_examples(README.read_text()) if argv[0] in ("pub", "check-config")]
    assert len(examples) >= 3, examples
    for argv, expected in examples:
        extra = ["--server", nats_server.url] if argv[0] == "pub" else []
        code = cli.main([*argv, *extra])
        out, err = capsys.readouterr()
        assert code != 0, argv  # the README shows refusals
        assert (out + err).splitlines() == expected, argv
