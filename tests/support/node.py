"""Real processes for data-plane tests: origin servers and an lbc node
(supervisord + workers), each stopped by PID when the test ends."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
ORIGIN = Path(__file__).resolve().parent / "origin.py"


_next_ip = [0]


def fresh_ip() -> str:
    """A loopback address (127.a.b.1) no other test of this run uses."""
    _next_ip[0] += 1
    n = (os.getpid() % 200) * 256 + _next_ip[0]
    return f"127.{(n // 256) % 250 + 2}.{n % 256}.1"


class Origin:
    """One origin server process (tests/support/origin.py)."""

    def __init__(self, ident: str, *, http=(), tcp=(), udp=(), hang=(), https=(), tcps=(),
                 cert: Path | None = None, key: Path | None = None, log: Path | None = None,
                 status: int = 0, prefix: tuple[str, ...] = ()) -> None:
        """`https`/`tcps` serve HTTP and the TCP echo over TLS with `cert`
        (PEM chain) and `key`. `prefix` runs it through a command
        (`ip netns exec NS`)."""
        cmd = [*prefix, sys.executable, str(ORIGIN), "--id", ident] + (["--status", str(status)] if status else [])
        for flag, addrs in (("--http", http), ("--tcp", tcp), ("--udp", udp), ("--hang", hang), ("--https", https),
                            ("--tcps", tcps)):
            for a in addrs:
                cmd += [flag, a]
        if cert is not None:
            cmd += ["--cert", str(cert), "--key", str(key)]
        if log is not None:
            cmd += ["--log", str(log)]
        self.ident = ident
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.stop()
            raise RuntimeError(f"origin {ident} did not start: {line}{self.proc.stdout.read()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()

    @property
    def pid(self) -> int:
        return self.proc.pid


class LbcNode:
    """An lbc state directory and the processes `lbc up` starts for it."""

    def __init__(self, directory: Path, prefix: tuple[str, ...] = ()) -> None:
        """`prefix` runs every lbc command through a command (`ip netns exec
        NS`: the node then lives in that network namespace)."""
        directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.dir = directory
        self.state = directory / "state"
        self.config = directory / "pool.yaml"
        self.seen_pids: set[int] = set()

    def lbc(self, *args: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*self.prefix, sys.executable, "-m", "lbc", *args, "--state", str(self.state)],
                                capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
        self._remember()
        return result

    def write(self, text: str, name: str = "pool.yaml") -> Path:
        path = self.dir / name
        path.write_text(text)
        return path

    def up(self, text: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
        result = self.lbc("up", str(self.write(text)), env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    def apply(self, text: str, *extra: str, name: str = "pool.yaml") -> subprocess.CompletedProcess[str]:
        return self.lbc("apply", str(self.write(text, name)), *extra)

    def supervisord_pid(self) -> int | None:
        try:
            pid = int((self.state / "run" / "supervisord.pid").read_text())
            return pid if psutil.pid_exists(pid) else None
        except (OSError, ValueError):
            return None

    def worker_pids(self) -> dict[int, int]:
        """slot -> pid of live workers, from their pid files."""
        out = {}
        for f in (self.state / "run").glob("worker-*.pid"):
            with contextlib.suppress(OSError, ValueError):
                pid = int(f.read_text())
                if psutil.pid_exists(pid):
                    out[int(f.stem.split("-")[1])] = pid
        return out

    def _remember(self) -> None:
        pid = self.supervisord_pid()
        if pid:
            self.seen_pids.add(pid)
            with contextlib.suppress(psutil.Error):
                self.seen_pids.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        self.seen_pids.update(self.worker_pids().values())

    def cleanup(self) -> None:
        """lbc down, then SIGKILL whatever this node ever started that lives on."""
        self._remember()
        if self.supervisord_pid():
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.lbc("down", "--drain-timeout", "1", timeout=30)
        for pid in self.seen_pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(psutil.pid_exists(p) and _alive(p) for p in self.seen_pids):
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def get(host: str, port: int, path: str = "/", headers: dict | None = None, timeout: float = 10,
        conn: http.client.HTTPConnection | None = None) -> tuple[int, dict, bytes]:
    """One request (on `conn` when given, keeping it alive)."""
    c = conn or http.client.HTTPConnection(host, port, timeout=timeout)
    c.request("GET", path, headers=headers or {})
    r = c.getresponse()
    body = r.read()
    if conn is None:
        c.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, body


def wait_until(predicate, timeout: float, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()
