"""Scorecard row 6: request framing. Each case of tests/cases/framing.yaml
goes on a connection of its own through lbc to a backend that parses what
it gets strictly (h11), so a case checks what actually reached the backend:
an ambiguous request is rejected before any of it is sent, or re-framed so
that there is one way to read it."""

from __future__ import annotations

import time

import pytest
from lb import config
from ruamel.yaml import YAML
from support.client import Client
from support.node import LbcNode, fresh_ip, wait_until
from support.strict_backend import StrictBackend

pytestmark = pytest.mark.timeout(60)

CASES = YAML(typ="safe").load((__import__("conftest").CASES / "framing.yaml").read_text())


@pytest.fixture(scope="module")
def front(tmp_path_factory):
    ip = fresh_ip()
    backend = StrictBackend(ip, 9101)
    node = LbcNode(tmp_path_factory.mktemp("framing"))
    try:
        node.up(config(ip, backends=1))
        yield ip, backend
    finally:
        node.cleanup()
        backend.close()


def _exchange(ip: str, data: bytes, responses: int) -> tuple[list, bool]:
    """Send `data`; read up to `responses` responses, stopping early at a
    close; (responses, whether the connection was closed after them)."""
    got = []
    with Client(ip, timeout=5) as c:
        c.send(data)
        for _ in range(responses):
            try:
                got.append(c.response())
            except (EOFError, ConnectionResetError):
                return got, True
            if got[-1].one("connection") == "close":
                break
        return got, c.closed_within(1)


@pytest.mark.row("6")
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_framing_case(front, case):
    ip, backend = front
    seen = len(backend.log)
    data = case["send"].encode("latin-1")
    if case["expect"] == "reject":
        responses, closed = _exchange(ip, data, 1)
        time.sleep(0.2)  # anything forwarded would have reached the backend by now
        assert [r.status for r in responses] == [case.get("status", 400)], responses
        assert responses[0].one("connection") == "close" and closed
        assert backend.log[seen:] == [], "forwarded although rejected"
        return
    wanted = case["backend"]
    responses, _ = _exchange(ip, data, len(wanted))
    assert [r.status for r in responses] == [200] * len(wanted), responses
    assert wait_until(lambda: len(backend.log) >= seen + len(wanted), 2)
    time.sleep(0.1)
    log = backend.log[seen:]
    assert len(log) == len(wanted), log
    for want, got in zip(wanted, log, strict=True):
        assert not isinstance(got, str), got  # the backend could not parse what it got
        assert (got.method, got.target, got.body) == (want["method"], want["target"], want["body"].encode())
        for name, value in want.get("headers", {}).items():
            assert got.get(name) == [value], (name, got)
        for name in want.get("absent", ()):
            assert got.get(name) == [], (name, got)
