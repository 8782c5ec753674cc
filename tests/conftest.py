"""Shared fixtures. Tests talk only to 127.0.0.1, are bounded in time
(pytest-timeout), and stop every process they start by PID."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "pool.yaml"
CASES = Path(__file__).resolve().parent / "cases"

pytest_plugins = ["support.scorecard"]  # rows marked @pytest.mark.row, `make scorecard`


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--scorecard", action="store_true",
                     help="run the long rows of tests/hostile too and write bench/SCORECARD.md")


def https_config(cert: Path, key: Path, weight: int = 1, extra_backends: str = "") -> str:
    """A one-listener https config on 127.0.0.1:8443 with one certificate."""
    return f"""\
version: 1
listeners:
  - name: web
    bind: 127.0.0.1:8443
    protocol: https
    tls:
      certificates:
        - {{cert: {cert}, key: {key}}}
    routes: [{{pool: web}}]
pools:
  - name: web
    backends:
      - {{id: web-1, address: 127.0.0.1, port: 9101, weight: {weight}}}
{extra_backends}"""


def lbc(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real `lbc` command in a child process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "lbc", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def write(tmp_path: Path):
    """write(name, text) -> Path: a file in this test's directory."""

    def _write(name: str, text: str | bytes) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        return path

    return _write


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA and two server certificates (with keys) made by trustme."""
    import trustme

    d = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    out: dict[str, Path] = {}
    ca.cert_pem.write_to_path(d / "ca.pem")
    out["ca"] = d / "ca.pem"
    for name, hosts in (("www", ["www.example.test", "example.test"]), ("api", ["api.example.test"])):
        cert = ca.issue_cert(*hosts)
        cert.private_key_pem.write_to_path(d / f"{name}.key")
        cert.cert_chain_pems[0].write_to_path(d / f"{name}.pem")
        for extra in cert.cert_chain_pems[1:]:
            extra.write_to_path(d / f"{name}.pem", append=True)
        out[f"{name}_cert"] = d / f"{name}.pem"
        out[f"{name}_key"] = d / f"{name}.key"
    return out


@pytest.fixture
def ip() -> str:
    """A loopback address of this test's own (127.a.b.1), so SO_REUSEPORT
    never joins two tests' listeners."""
    from support.node import fresh_ip

    return fresh_ip()


@pytest.fixture
def node(tmp_path: Path):
    from support.node import LbcNode

    n = LbcNode(tmp_path)
    try:
        yield n
    finally:
        n.cleanup()


@pytest.fixture
def lan():
    """Network namespaces a (10.77.0.1) and b (.2), two nodes, and c (.10), a
    client, on one bridge; skipped where namespaces cannot be made."""
    from support.netns import Lan, can_make

    why = can_make()
    if why is not None:
        pytest.skip(why)
    net = Lan()
    try:
        for name, number in (("a", 1), ("b", 2), ("c", 10)):
            net.host(name, number)
        yield net
    finally:
        net.close()


@pytest.fixture
def origins():
    """origins(ident, http=[...], tcp=[...], udp=[...]) starts one; all are
    killed by PID when the test ends."""
    from support.node import Origin

    started: list[Origin] = []

    def start(ident: str, **kw) -> Origin:
        o = Origin(ident, **kw)
        started.append(o)
        return o

    try:
        yield start
    finally:
        for o in started:
            o.stop()


class RedisServer:
    """A real redis-server on 127.0.0.0/8, stopped by PID."""

    def __init__(self, host: str, port: int) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed (`make test` installs Debian's redis-server)")
        self.host, self.port = host, port
        self.url = f"redis://{host}:{port}/0"
        self.proc = subprocess.Popen([exe, "--bind", host, "--port", str(port), "--save", "", "--appendonly", "no",
                                      "--protected-mode", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        self.client = redis.Redis(host=host, port=port, socket_timeout=2)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.kill()
                    pytest.fail("redis-server did not start")
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def redis_server(ip):
    server = RedisServer(ip, 6390)
    try:
        yield server
    finally:
        server.kill()
