"""Scorecard rows 1, 2 and 7: request head limits, an unfinished head, and
pipelining, against lbc with its default limits and timeouts."""

from __future__ import annotations

import time

import pytest
from lb import config, web_origins
from support.client import Client, build

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def front(node, origins, ip):
    web_origins(origins, ip)
    node.up(config(ip))
    return ip


def _status(ip: str, data: bytes) -> tuple[int, bool]:
    """(status, whether the connection then closed) for one request."""
    with Client(ip) as c:
        c.send(data)
        r = c.response()
        closed = r.one("connection") == "close" and c.closed_within(2)
        return r.status, closed


@pytest.mark.row("1")
def test_default_head_limits(front, figure):
    ip = front
    cases = [
        ("95 headers", build(headers={f"X-H{i}": "v" for i in range(94)}), 200),  # + Host
        ("a 15 KiB header", build(headers={"X-Big": "b" * 15 * 1024}), 200),
        ("105 headers", build(headers={f"X-H{i}": "v" for i in range(104)}), 431),
        ("a 20 KiB header", build(headers={"X-Big": "b" * 20 * 1024}), 431),
        ("a 20 KiB URL", build(path="/" + "a" * 20 * 1024), 414),
    ]
    got = {name: _status(ip, data) for name, data, _ in cases}
    figure(", ".join(f"{name} {status}" for name, (status, _) in got.items()))
    for name, _, status in cases:
        assert got[name][0] == status, (name, got[name])
        if status != 200:
            assert got[name][1], f"{name}: connection not closed after the error"


@pytest.mark.row("2")
def test_unfinished_head_gets_408_within_the_default_timeout(front, figure):
    with Client(front, timeout=15) as c:
        start = time.monotonic()
        c.send(b"GET / HTTP/1.1\r\nHost: example.test\r\nX-Slow: ")
        r = c.response()
        elapsed = time.monotonic() - start
        assert c.closed_within(2)
    figure(f"408 and closed at {elapsed:.1f} s (default client_header 10 s)")
    assert r.status == 408 and r.one("connection") == "close"
    assert 9.9 < elapsed < 11, elapsed  # never early; swept twice a second


@pytest.mark.row("7")
def test_pipelined_requests_are_answered_in_order(front, figure):
    with Client(front) as c:
        c.send(b"".join(build(path=f"/echo?n={i}") for i in range(10)))
        targets = [c.response().echo()["target"] for _ in range(10)]
    figure(f"{len(targets)} responses, in order: {targets == [f'/echo?n={i}' for i in range(10)]}")
    assert targets == [f"/echo?n={i}" for i in range(10)]
