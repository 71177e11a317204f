"""A pytest plugin for .ci/run: the seconds each test file took (setup, call and teardown of
its tests), slowest first, so the CI budget can be watched file by file."""

from __future__ import annotations

from collections import defaultdict

import pytest

_seconds: defaultdict[str, float] = defaultdict(float)
_tests: defaultdict[str, int] = defaultdict(int)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = report.nodeid.split("::", 1)[0]
    _seconds[path] += report.duration
    if report.when == "setup":
        _tests[path] += 1


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _seconds:
        return
    tr = terminalreporter
    tr.write_sep("=", "seconds per test file")
    for path, seconds in sorted(_seconds.items(), key=lambda kv: -kv[1]):
        tr.write_line(f"{seconds:8.1f} s  {_tests[path]:4d} tests  {path}")
    tr.write_line(f"{sum(_seconds.values()):8.1f} s  {sum(_tests.values()):4d} tests  in all")
