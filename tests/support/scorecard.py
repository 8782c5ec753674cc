"""The hostile-client scorecard, as a pytest plugin.

A test checks one row of ROWS below (`@pytest.mark.row("N")`) and records its
measured figure with the `figure` fixture; most rows live in tests/hostile/,
a few are older tests that already measured them. `make scorecard` runs every
test with a row mark (`-m row --scorecard`); rows marked `slow` run only
then, the rest in `make test` too. At the end each row is printed on one line
(pass/fail, figures, bar), and under --scorecard bench/SCORECARD.md is
written."""

from __future__ import annotations

import datetime
import platform
from pathlib import Path

import pytest

# The bar: HAProxy 2.6's figures, measured on this kind of machine.
ROWS: dict[str, tuple[str, str]] = {
    "1": ("header size/count limits", "95 headers and a 15 KiB header pass; 105 headers, a 20 KiB header, a 20 KiB "
          "URL get 431/400/414 (HAProxy: same split; lbc answers the 20 KiB header with RFC 6585's 431)"),
    "2": ("unfinished header", "408 and closed within client_header + 1 s; default <= 10 s (HAProxy: 408 at 10.2 s)"),
    "3": ("slowloris", "available in every sample; all attack connections closed before the end (HAProxy: by 15 s)"),
    "4": ("slow body", "available throughout; bonus: a body timeout closes them (HAProxy holds all 1,000)"),
    "5": ("slow read", "available throughout; lbc RSS grows under 200 MB"),
    "6": ("framing (RFC 9112)", "each case rejected (400, closed) or normalized; never forwarded ambiguous"),
    "7": ("pipelining", "10 pipelined requests -> 10 responses in order"),
    "8": ("L4 integrity", "10 MB random both ways over 20 connections byte-exact; half-close honoured"),
    "9": ("UDP", "1,000/1,000 datagrams echoed (<= 32 in flight); sessions time out idle"),
    "10": ("reload under load", "20 applies in 20 s: 0 errors, 0 non-2xx (HAProxy: 0 over 15 reloads)"),
    "11": ("backend killed", "0 failed idempotent requests with retries (HAProxy redispatch 0/5,283); back within "
           "rise x inter + 1 s"),
    "12": ("worker killed", "restarted within 2 s; errors only that worker's in-flight; the other keeps serving"),
    "12b": ("health checker killed", "no state change; back within 2 s; 0 failed requests"),
    "13": ("supervisord killed", "workers keep serving or stop cleanly; `lbc up` recovers, no port conflict, no lost "
           "table"),
    "14": ("state dir full / read-only", "apply fails with a clear error; live table unchanged and served"),
    "15": ("connection flood", "20,000 held connections from 2 processes: no crash, legitimate requests served, "
           "excess over max_client_connections refused cleanly"),
    "16": ("TLS scan (sslyze)", "only the self-signed path validation fails (HAProxy also offers secp521r1/X448)"),
    "fuzz": ("fuzzing (hypothesis)", "request parser path and config loader: no crash, hang or unhandled error"),
}

OUT = Path(__file__).resolve().parents[2] / "bench" / "SCORECARD.md"
_results: dict[str, dict] = {}  # row -> {"outcomes": [...], "figures": [...]}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "row(id): the scorecard row a test checks")
    config.addinivalue_line("markers", "slow: a scorecard row that runs only with --scorecard")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--scorecard"):
        return
    skip = pytest.mark.skip(reason="a long scorecard row: `make scorecard` runs it")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


def _row(item: pytest.Item) -> str | None:
    marker = item.get_closest_marker("row")
    return None if marker is None else str(marker.args[0])


@pytest.fixture
def figure(request: pytest.FixtureRequest):
    """figure(text): this row's measured figure, as the scorecard shows it."""
    row = _row(request.node)
    assert row in ROWS, f"{request.node.nodeid}: mark it with a row of ROWS"

    def add(text: str) -> None:
        _results.setdefault(row, {"outcomes": [], "figures": []})["figures"].append(text)

    return add


@pytest.fixture
def slack(request: pytest.FixtureRequest) -> float:
    """What a time bar is multiplied by in an assertion: 1 under
    --scorecard (a run of its own), 2 in `make test`, where the suite's
    other processes share the two cores."""
    return 1.0 if request.config.getoption("--scorecard") else 2.0


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    row = _row(item)
    if row is not None and (report.when == "call" or report.outcome != "passed"):
        outcome = "skipped" if report.skipped else report.outcome
        _results.setdefault(row, {"outcomes": [], "figures": []})["outcomes"].append(outcome)
    return report


def _lines() -> list[tuple[str, str, str, str, str]]:
    out = []
    for row, (check, bar) in ROWS.items():
        got = _results.get(row)
        if got is None or not got["outcomes"]:
            continue
        outcomes = got["outcomes"]
        if "failed" in outcomes:
            verdict = "FAIL"
        elif all(o == "skipped" for o in outcomes):
            verdict = "skip"
        else:
            verdict = "pass"
        figures = "; ".join(got["figures"])
        if len(outcomes) > 1:
            figures = f"{outcomes.count('passed')}/{len(outcomes)} checks passed" + (f"; {figures}" if figures else "")
        out.append((row, check, verdict, figures or "-", bar))
    return out


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    lines = _lines()
    if not lines:
        return
    tr = terminalreporter
    tr.section("scorecard")
    for row, check, verdict, figures, bar in lines:
        tr.write_line(f"{row:>4}  {verdict:4}  {check}: {figures}")
        tr.write_line(f"      bar: {bar}")
    counted = [verdict for _, _, verdict, _, _ in lines]
    tr.write_line(f"rows: {counted.count('pass')} pass, {counted.count('FAIL')} fail, {counted.count('skip')} skipped")
    if config.getoption("--scorecard"):
        _write(lines)


def _write(lines) -> None:
    rows = "\n".join(f"| {r} | {c} | {v} | {f} | {b} |" for r, c, v, f, b in lines)
    OUT.write_text(f"""# Hostile clients and faults: scorecard

Written by `make scorecard` on {datetime.date.today().isoformat()} ({platform.node()}, {platform.machine()}).
Each row is one or more tests (`-m row`); the bar is HAProxy 2.6's figure on this kind of machine.

| # | check | result | measured | bar |
|---|---|---|---|---|
{rows}
""")
