"""Scorecard row 15: a connection flood. max_client_connections bounds what
a node holds; at the bound idle connections make room for new ones, and when
none is idle new connections are closed at once."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lb import HTTP_PORT, config, web_origins
from support.client import Client
from support.node import get, wait_until

FLOOD = Path(__file__).resolve().parents[1] / "support" / "flood.py"


def _silent(ip: str, n: int) -> list[socket.socket]:
    return [socket.create_connection((ip, HTTP_PORT), timeout=5, source_address=(ip, 0)) for _ in range(n)]


def _closed(socks: list[socket.socket]) -> int:
    """How many the server has closed (EOF or reset), looking without
    waiting; what it sent first (a 408) is read and dropped."""
    closed = 0
    for s in socks:
        s.setblocking(False)
        try:
            while s.recv(65536):
                pass
            closed += 1
        except BlockingIOError:
            pass
        except ConnectionResetError:
            closed += 1
    return closed


@pytest.mark.row("15")
@pytest.mark.timeout(60)
def test_idle_connections_make_room_and_busy_ones_refuse(node, origins, ip, figure):
    web_origins(origins, ip, backends=1)
    node.up(config(ip, backends=1, workers=1, glob="max_client_connections: 20",
                   listener="timeouts: {client_header: 3s}"))
    idle = _silent(ip, 40)
    time.sleep(0.3)
    assert get(ip, HTTP_PORT)[0] == 200  # room made by closing idle ones
    assert wait_until(lambda: _closed(idle) >= 20, 3)  # the limit holds: 20 made room for the rest
    closed_idle = _closed(idle)
    busy = _silent(ip, 20)
    for s in busy:
        s.sendall(b"GET / HTTP/1.1\r\nHost: ")  # a head under way: not idle
    time.sleep(0.3)
    with Client(ip) as c:  # no idle connection left to close: refused at once
        start = time.monotonic()
        assert c.closed_within(2)
        refused_after = time.monotonic() - start
    assert wait_until(lambda: _closed(busy) == 20, 6)  # their head timeout frees the slots
    assert get(ip, HTTP_PORT)[0] == 200
    for s in idle + busy:
        s.close()
    figure(f"limit 20: 40 idle -> {closed_idle} closed to make room, request served; 20 busy -> new connection "
           f"closed in {refused_after * 1000:.0f} ms; served again after their header timeout")
    assert refused_after < 1


@pytest.mark.row("15")
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_twenty_thousand_connections(node, origins, ip, figure):
    web_origins(origins, ip)
    node.up(config(ip, glob="max_client_connections: 10000"))
    workers = node.worker_pids()
    flooders = [subprocess.Popen([sys.executable, str(FLOOD), ip, ip, str(HTTP_PORT), "10000", "6"],
                                 stdout=subprocess.PIPE, text=True) for _ in range(2)]
    served, failed, worst = 0, [], 0.0
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(f.poll() is None for f in flooders):
            start = time.monotonic()
            try:
                status = get(ip, HTTP_PORT, timeout=5)[0]
                served += status == 200
                if status != 200:
                    failed.append(status)
            except OSError as e:
                failed.append(repr(e))
            worst = max(worst, time.monotonic() - start)
            time.sleep(0.2)
        results = [json.loads(f.communicate(timeout=60)[0]) for f in flooders]
    finally:
        for f in flooders:
            if f.poll() is None:
                f.kill()
                f.wait(10)
    opened = sum(r["opened"] for r in results)
    closed = sum(r["closed"] for r in results)
    reset = sum(r["reset"] for r in results)
    took = max(r["open_seconds"] for r in results)
    figure(f"{opened:,} of 20,000 opened in {took:.1f} s (limit 10,000), {closed:,} closed cleanly by lbc, {reset} reset; "
           f"{served} requests served during the flood, {len(failed)} failed, slowest {worst * 1000:.0f} ms; "
           f"workers unchanged: {node.worker_pids() == workers}")
    assert node.worker_pids() == workers
    assert failed == [] and served > 20
    assert opened == 20000 and reset == 0 and closed >= 10000
