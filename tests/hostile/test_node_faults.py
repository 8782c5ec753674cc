"""Scorecard rows 13 and 14: faults of the node itself, with product
defaults (tests/hostile/lb.py: 2 workers).

Row 13: supervisord is killed (SIGKILL). The workers keep serving; `lbc up`
(no file: the live table) then starts a new supervisord and workers beside
them (they join the listeners' SO_REUSEPORT groups: no port conflict), and
once the new workers serve the live table, the leftovers drain and exit.
Requests are sent all along; afterwards every process of the node is
supervisord's own child.

Row 14: the state directory's file system fails under a running node, made
for real with mount(8) (the tests run as root on a machine of their own; they
skip, saying so, where mounting is not permitted):
  - full: the state directory is a small tmpfs (its run/ directory, with the
    workers' shared memory and logs, on it too), filled up with a file;
  - read-only: the state directory is a bind mount remounted read-only, with
    its run/ on a mount of its own (as /run is: a file system with files open
    for writing cannot be remounted read-only).
`lbc apply` of a changed config must fail with a clear, located message and
exit 1; the live table stays current and served; once the file system is
writable again an apply goes through.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import lb
import psutil
import pytest
from support.node import LbcNode, get, wait_until

pytestmark = pytest.mark.timeout(60)


def status(node) -> dict:
    result = node.lbc("status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def serving(node) -> dict[str, str]:
    """worker program -> the table version it serves."""
    return {p["name"]: p["serving"] for p in status(node)["processes"] if p["name"].startswith("worker-")}


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def node_processes(node) -> set[int]:
    """Every live process started for this node's state directory."""
    state = str(node.state.resolve())
    found = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmdline = p.info["cmdline"] or []
        if state in " ".join(cmdline) and alive(p.info["pid"]):
            found.add(p.info["pid"])
    return found


class Poller(threading.Thread):
    """One GET on a new connection every 20 ms, each outcome kept with its time."""

    def __init__(self, ip: str) -> None:
        super().__init__(daemon=True)
        self.ip = ip
        self.outcomes: list[tuple[float, str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                code, _, body = get(self.ip, lb.HTTP_PORT, timeout=5)
                outcome = body.decode().strip() if code == 200 else str(code)
            except (OSError, http.client.HTTPException) as e:
                outcome = f"{type(e).__name__}: {e}"
            self.outcomes.append((time.monotonic(), outcome))
            self.stop.wait(0.02)

    def failures(self, since: float = 0.0) -> list[str]:
        return [o for t, o in self.outcomes if t >= since and not o.startswith("web-")]

    def served(self, since: float = 0.0) -> int:
        return sum(1 for t, o in self.outcomes if t >= since and o.startswith("web-"))

    def __enter__(self) -> Poller:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.join(10)


# -- row 13 ------------------------------------------------------------------------------


@pytest.mark.row("13")
def test_supervisord_killed_workers_keep_serving_and_up_recovers(node, origins, ip, figure):
    lb.web_origins(origins, ip)
    # and a udp listener: its socket is taken over too
    node.up(lb.config(ip, listeners=f'  - {{name: dgram, bind: "{ip}:7000", protocol: udp, pool: web}}'))
    live = status(node)["live_version"]
    supervisord = node.supervisord_pid()
    children = {p.pid: p.cmdline()[2] for p in psutil.Process(supervisord).children()}  # python -m MODULE
    workers = set(node.worker_pids().values())
    assert len(workers) == 2 and workers <= set(children)

    with Poller(ip) as poller:
        time.sleep(0.3)
        os.kill(supervisord, signal.SIGKILL)
        killed = time.monotonic()
        assert wait_until(lambda: not alive(supervisord), 5)
        time.sleep(2)
        # the workers outlive it and keep serving
        assert all(alive(pid) for pid in workers), "a worker died with supervisord"
        after_kill = poller.served(killed)
        assert after_kill > 20 and not poller.failures(killed), poller.failures(killed)
        left = sorted(children[pid] for pid in children if alive(pid))

        start = time.monotonic()
        up = node.lbc("up")
        took = time.monotonic() - start
        assert up.returncode == 0, up.stdout + up.stderr
        assert "in use" not in up.stderr
        new_supervisord = node.supervisord_pid()
        assert new_supervisord and new_supervisord != supervisord
        # the leftovers have drained and gone: nothing of the node is outside the new supervisord
        assert not any(alive(pid) for pid in children), [children[pid] for pid in children if alive(pid)]
        assert "took over from the workers of an earlier run" in up.stdout
        time.sleep(0.5)
    failures = poller.failures(killed)
    assert not failures, failures[:5]
    assert poller.served(killed) > 50

    # the same live table, served by the new workers; no stray processes
    now = status(node)
    assert now["running"] and now["live_version"] == live
    assert set(serving(node).values()) == {live}
    new_workers = {p["pid"] for p in now["processes"] if p["name"].startswith("worker-")}
    assert len(new_workers) == 2 and not new_workers & workers
    assert set(node.worker_pids().values()) == new_workers  # pid files name the new workers
    family = {new_supervisord, *(p.pid for p in psutil.Process(new_supervisord).children(recursive=True))}
    assert node_processes(node) <= family, {pid: " ".join(psutil.Process(pid).cmdline())
                                            for pid in node_processes(node) - family}
    assert {get(ip, lb.HTTP_PORT)[2].strip() for _ in range(10)} == {b"web-1", b"web-2"}
    figure(f"after SIGKILL of supervisord both workers kept serving ({after_kill} requests in 2 s, 0 failed; "
           f"alive 2 s later: {', '.join(left)}); `lbc up` took {took:.1f}s: no port conflict, same live table "
           f"{live[:12]}, the leftovers drained and exited, no stray process; "
           f"{len(poller.outcomes)} requests from the kill on, 0 failed")


# -- row 14 ------------------------------------------------------------------------------


class Mounts:
    """Mounts made by a test, unmounted (innermost first) when it ends."""

    def __init__(self) -> None:
        self.points: list[Path] = []

    def mount(self, *args: str, target: Path) -> None:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("row 14 makes the fault with mount(8): needs root")
        target.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            if not self.points:
                pytest.skip(f"mounting is not permitted here ({result.stderr.strip()}): row 14 needs it")
            raise AssertionError(f"mount {' '.join(args)} {target}: {result.stderr}")
        if target not in self.points:
            self.points.append(target)

    def remount(self, options: str, target: Path) -> None:
        result = subprocess.run(["mount", "-o", options, str(target)], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, f"remount {options} {target}: {result.stderr}"

    def unmount_all(self) -> None:
        for point in reversed(self.points):
            if subprocess.run(["umount", str(point)], capture_output=True, timeout=30).returncode != 0:
                subprocess.run(["umount", "-l", str(point)], capture_output=True, timeout=30)


@pytest.fixture
def mounts():
    m = Mounts()
    try:
        yield m
    finally:
        m.unmount_all()


@pytest.fixture
def mnode(mounts, tmp_path):
    """A node whose state directory the test mounts; stopped before the mounts go."""
    n = LbcNode(tmp_path / "node")
    try:
        yield n
    finally:
        n.cleanup()


def fill(path: Path) -> int:
    """Write zeros to `path` until the file system is full; bytes written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    written = 0
    block = 1 << 20
    try:
        while block:
            try:
                written += os.write(fd, bytes(block))
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                block //= 2  # down to the last pages
    finally:
        os.close(fd)
    return written


def backends_serving(ip: str, n: int = 20) -> set[str]:
    bodies = set()
    for _ in range(n):
        code, _, body = get(ip, lb.HTTP_PORT)
        assert code == 200
        bodies.add(body.decode().strip())
    return bodies


def check_refused_apply(node, ip: str, live: str, expected: str) -> str:
    """An apply of a changed config (web-2 removed) fails with `expected` in
    its message; the live table stays current and served. The message, with
    the state directory written <state>."""
    result = node.apply(lb.config(ip, backends=1))
    message = result.stderr.strip()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in message and message.startswith("lbc: "), message
    assert expected in message and str(node.state) in message, message
    assert (node.state / "current").read_text().strip() == live
    assert status(node)["live_version"] == live
    assert set(serving(node).values()) == {live}
    assert backends_serving(ip) == {"web-1", "web-2"}  # the old table: both backends
    assert [p.stem for p in (node.state / "tables").iterdir()] == [live]  # nothing half-written left
    return message.replace(str(node.state), "<state>")


def check_apply_goes_through(node, ip: str, live: str) -> None:
    result = node.apply(lb.config(ip, backends=1))
    assert result.returncode == 0, result.stdout + result.stderr
    assert status(node)["live_version"] != live
    assert backends_serving(ip) == {"web-1"}


@pytest.mark.row("14")
def test_apply_on_a_full_state_dir_fails_clearly_and_the_live_table_serves_on(mounts, mnode, origins, ip, figure):
    # small, yet room for run/ too: the workers' shared memory is sparse, but
    # each worker's region is touched at start (about 7 MB each)
    mounts.mount("-t", "tmpfs", "-o", "size=48m,mode=0755", "lbc-test-state", target=mnode.state)
    lb.web_origins(origins, ip)
    mnode.up(lb.config(ip))
    live = status(mnode)["live_version"]
    filled = fill(mnode.state / "filler")
    assert shutil.disk_usage(mnode.state).free == 0
    message = check_refused_apply(mnode, ip, live, "no space left on the device")
    # a worker restarted on the full disk serves too
    pid = mnode.worker_pids()[0]
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: (s := serving(mnode)) and s.get("worker-0") == live and mnode.worker_pids().get(0) not in
                      (None, pid), 10)
    assert backends_serving(ip) == {"web-1", "web-2"}
    (mnode.state / "filler").unlink()
    check_apply_goes_through(mnode, ip, live)
    figure(f"full 48 MB tmpfs state dir ({filled / 1e6:.0f} MB filler): apply exit 1, \"{message}\"; "
           f"live table unchanged and served (a killed worker came back on it); apply OK once space returned")


@pytest.mark.row("14")
def test_apply_on_a_read_only_state_dir_fails_clearly_and_the_live_table_serves_on(mounts, mnode, origins, ip,
                                                                                   figure, tmp_path):
    disk, run = tmp_path / "state-disk", tmp_path / "run-disk"
    disk.mkdir()
    run.mkdir()
    mounts.mount("--bind", str(disk), target=mnode.state)
    mounts.mount("--bind", str(run), target=mnode.state / "run")
    lb.web_origins(origins, ip)
    mnode.up(lb.config(ip))
    live = status(mnode)["live_version"]
    mounts.remount("remount,ro,bind", mnode.state)
    with pytest.raises(OSError):
        (mnode.state / "probe").write_text("x")
    message = check_refused_apply(mnode, ip, live, "read-only")
    mounts.remount("remount,rw,bind", mnode.state)
    check_apply_goes_through(mnode, ip, live)
    figure(f"read-only bind as state dir: apply exit 1, \"{message}\"; live table unchanged and served; "
           f"apply OK once writable again")
