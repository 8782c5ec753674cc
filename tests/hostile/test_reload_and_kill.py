"""Scorecard rows 10 and 12: applies under load (hey: keep-alive, new
connections, HTTPS) and a worker killed under load."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time

import psutil
import pytest
from lb import HTTP_PORT, config, web_origins
from support.load import Load
from support.node import get, wait_until

from lbc.state import StateDir


def _hey(url: str, seconds: int, *flags: str) -> subprocess.Popen:
    exe = shutil.which("hey")
    if exe is None:
        pytest.fail("hey is not installed (`make scorecard` installs Debian's hey)")
    return subprocess.Popen([exe, "-z", f"{seconds}s", "-c", "16", "-t", "10", *flags, url],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _outcome(report: str) -> tuple[dict[int, int], int]:
    """hey's summary: (responses by status, errors)."""
    statuses = {int(code): int(n) for code, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", report)}
    errors_part = report.split("Error distribution:")[1] if "Error distribution:" in report else ""
    errors = sum(int(n) for n in re.findall(r"\[(\d+)\]\t", errors_part))
    return statuses, errors


@pytest.mark.row("10")
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_twenty_applies_under_load(node, origins, ip, tls_files, figure):
    web_origins(origins, ip, backends=3)
    tls = (f"  - name: secure\n    bind: \"{ip}:8443\"\n    protocol: https\n    tls:\n      certificates:\n"
           f"        - {{cert: {tls_files['www_cert']}, key: {tls_files['www_key']}}}\n    routes: [{{pool: web}}]\n")
    a = config(ip, listeners=tls)
    b = config(ip, backends=3, listeners=tls)  # a third backend in, and out again
    node.up(a)
    figures, failures = [], []
    for mode, url, flags in [("keep-alive", f"http://{ip}:{HTTP_PORT}/", ()),
                             ("new connections", f"http://{ip}:{HTTP_PORT}/", ("-disable-keepalive",)),
                             ("HTTPS keep-alive", f"https://{ip}:8443/", ())]:
        load = _hey(url, 22, *flags)
        time.sleep(1)
        applied = 0
        for i in range(20):
            start = time.monotonic()
            result = node.apply(b if i % 2 == 0 else a)
            assert result.returncode == 0, result.stdout + result.stderr
            applied += 1
            time.sleep(max(0.0, 1 - (time.monotonic() - start)))
        report = load.communicate(timeout=60)[0]
        statuses, errors = _outcome(report)
        non_2xx = sum(n for code, n in statuses.items() if not 200 <= code < 300)
        figures.append(f"{mode}: {sum(statuses.values()):,} responses, {errors} errors, {non_2xx} non-2xx")
        if errors or non_2xx or not statuses:
            failures.append(report)
    figure("20 applies in 20 s each; " + "; ".join(figures))
    assert failures == []


@pytest.mark.row("12")
@pytest.mark.timeout(90)
def test_killed_worker_costs_only_its_own_connections(node, origins, ip, figure, slack):
    web_origins(origins, ip)
    node.up(config(ip))
    live = StateDir(node.state).current_version()
    before = node.worker_pids()
    with Load(ip, HTTP_PORT, clients=16) as load:
        time.sleep(1)
        victim = before[0]
        held = sum(1 for c in psutil.Process(victim).net_connections("tcp")
                   if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == HTTP_PORT)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        ok_at_kill = load.ok

        def serving_again() -> bool:
            status = json.loads(node.lbc("status", "--json").stdout)
            w0 = next(p for p in status["processes"] if p["name"] == "worker-0")
            return w0["pid"] not in (0, victim) and w0["serving"] == live

        fresh = [get(ip, HTTP_PORT)[0] for _ in range(5)]  # new connections meanwhile
        assert wait_until(serving_again, 4)
        back = time.monotonic() - killed
        time.sleep(0.5)
        ok_after = load.ok - ok_at_kill
    figure(f"back and serving in {back:.2f} s; {len(load.errors)} failed requests, {held} connections were on the "
           f"killed worker; the other served {ok_after:,} meanwhile; new connections {fresh.count(200)}/5 served")
    assert back < 2 * slack
    assert len(load.errors) <= held  # at most one request in flight per connection of the killed worker
    assert node.worker_pids()[1] == before[1] and ok_after > 100
    assert fresh == [200] * 5
