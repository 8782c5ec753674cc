"""A real node: lbc up / status / down under supervisord, worker restarts,
worker count changes, failed applies, and hot swaps under load."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time

import psutil
import pytest
from support.load import Load
from support.node import get, wait_until

from lbc.state import StateDir

pytestmark = pytest.mark.timeout(180)


def config(ip: str, *, workers: int = 1, weights=(1, 1), extra_backend: bool = False, extra_listener: bool = False,
           algorithm: str = "round_robin", drain: str = "30s") -> str:
    backends = [f"      - {{id: web-1, address: {ip}, port: 9101, weight: {weights[0]}}}",
                f"      - {{id: web-2, address: {ip}, port: 9102, weight: {weights[1]}}}"]
    if extra_backend:
        backends.append(f"      - {{id: web-3, address: {ip}, port: 9103}}")
    listeners = [f"  - {{name: web, bind: \"{ip}:8080\", routes: [{{pool: web}}]}}"]
    if extra_listener:
        listeners.append(f"  - {{name: extra, bind: \"{ip}:8081\", routes: [{{pool: web}}]}}")
    return "\n".join([
        "version: 1",
        f"global: {{workers: {workers}, drain_timeout: {drain}}}",
        "listeners:", *listeners,
        "pools:",
        "  - name: web",
        f"    algorithm: {algorithm}",
        "    backends:", *backends,
    ]) + "\n"


@pytest.fixture
def web(origins, ip):
    """Three origins: web-1, web-2, web-3 on ports 9101-9103 of this test's address."""
    return [origins(f"web-{i}", http=[f"{ip}:{9100 + i}"]) for i in (1, 2, 3)]


def test_up_status_down(node, web, ip):
    result = node.up(config(ip, workers=2))
    assert f"http://{ip}:8080" in result.stdout and "2 workers" in result.stdout
    bodies = [get(ip, 8080)[2] for _ in range(6)]
    assert {b"web-1\n", b"web-2\n"} == set(bodies)
    status = json.loads(node.lbc("status", "--json").stdout)
    live = StateDir(node.state).current_version()
    assert status["running"] and status["live_version"] == live
    workers = [p for p in status["processes"] if p["name"].startswith("worker-")]
    assert len(workers) == 2 and all(p["state"] == "RUNNING" and p["serving"] == live for p in workers)
    assert all(p["rss_bytes"] > 0 for p in workers)
    # counters reach shared memory within a publication period
    counted = wait_until(lambda: sum(b["requests"] for b in json.loads(node.lbc("status", "--json").stdout)["backends"]) >= 6, 3)
    assert counted
    text = node.lbc("status").stdout
    assert "worker-1" in text and "web-2" in text
    pids = [node.supervisord_pid(), *node.worker_pids().values()]
    down = node.lbc("down")
    assert down.returncode == 0, down.stderr
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not json.loads(node.lbc("status", "--json").stdout)["running"]
    again = node.lbc("down")
    assert again.returncode == 1 and "not running" in again.stderr


def test_up_without_file_resumes_the_live_table(node, web, ip):
    assert node.lbc("apply", str(node.write(config(ip, weights=(2, 1))))).returncode == 0
    result = node.lbc("up")
    assert result.returncode == 0, result.stderr
    assert get(ip, 8080)[0] == 200
    assert node.lbc("down").returncode == 0
    from conftest import lbc

    empty = lbc("up", "--state", str(node.dir / "empty"))
    assert empty.returncode == 1 and "nothing to serve" in empty.stderr


def test_bind_in_use_fails_before_anything_starts(node, web, ip):
    squatter = socket.socket()
    squatter.bind((ip, 8080))
    squatter.listen()
    try:
        result = node.lbc("up", str(node.write(config(ip))))
    finally:
        squatter.close()
    assert result.returncode == 1
    assert f"{ip}:8080/tcp is already in use (by pid {os.getpid()}" in result.stderr
    assert node.supervisord_pid() is None and not node.worker_pids()
    assert StateDir(node.state).current_version() is None  # nothing installed either


def test_second_up_and_orphaned_workers(node, web, ip):
    node.up(config(ip))
    second = node.lbc("up", str(node.config))
    assert second.returncode == 1 and "already runs" in second.stderr
    supervisord = node.supervisord_pid()
    os.kill(supervisord, signal.SIGKILL)
    wait_until(lambda: not psutil.pid_exists(supervisord) or psutil.Process(supervisord).status() == "zombie", 5)
    orphans = node.worker_pids()
    assert orphans  # workers outlive a killed supervisord and keep serving
    assert get(ip, 8080)[0] == 200
    # `lbc up` would take over from them (tests/hostile/test_node_faults.py); `lbc down` stops them
    stopped = node.lbc("down")
    assert stopped.returncode == 0 and "leftover workers" in stopped.stdout
    assert wait_until(lambda: not node.worker_pids(), 10)
    assert node.lbc("up", str(node.config)).returncode == 0


def test_killed_worker_is_back_within_two_seconds(node, web, ip):
    node.up(config(ip, workers=2))
    before = node.worker_pids()
    os.kill(before[0], signal.SIGKILL)
    start = time.monotonic()
    live = StateDir(node.state).current_version()

    def serving_again():
        status = json.loads(node.lbc("status", "--json").stdout)
        w0 = next(p for p in status["processes"] if p["name"] == "worker-0")
        return w0["pid"] not in (0, before[0]) and w0["serving"] == live

    assert wait_until(serving_again, 4)  # 2 s in the issue; twice that under test load
    elapsed = time.monotonic() - start
    assert node.worker_pids()[1] == before[1]  # the other was not touched
    assert get(ip, 8080)[0] == 200
    print(f"worker back and serving after {elapsed:.2f}s")


def test_worker_count_changes_leave_other_workers_alone(node, web, ip):
    node.up(config(ip, workers=1))
    first = node.worker_pids()[0]
    grown = node.apply(config(ip, workers=3))
    assert grown.returncode == 0, grown.stderr
    assert "3 workers serving it" in grown.stdout
    pids = node.worker_pids()
    assert sorted(pids) == [0, 1, 2] and pids[0] == first
    shrunk = node.apply(config(ip, workers=2))
    assert shrunk.returncode == 0, shrunk.stderr
    assert wait_until(lambda: sorted(node.worker_pids()) == [0, 1], 10)
    assert node.worker_pids()[0] == first and node.worker_pids()[1] == pids[1]
    conf = (node.state / "run" / "supervisord.conf").read_text()
    assert "[program:worker-1]" in conf and "[program:worker-2]" not in conf
    assert "stopwaitsecs=35" in conf  # drain_timeout 30s + 5


def test_failed_apply_puts_the_previous_table_back(node, web, ip):
    from lbc import service

    v2_text = config(ip, weights=(5, 1))
    v2 = service.compile_file(node.write(v2_text, "v2.yaml")).version
    node.up(config(ip), env={"LBC_WORKER_FAULT": f"reject:{v2[:16]}"})
    v1 = StateDir(node.state).current_version()
    result = node.apply(v2_text, name="v2.yaml")
    assert result.returncode == 1
    assert "worker-0" in result.stderr and "refused by LBC_WORKER_FAULT" in result.stderr
    assert f"table {v1[:12]} is current again" in result.stderr
    assert StateDir(node.state).current_version() == v1
    records = StateDir(node.state).history()
    assert [(r.command, r.version) for r in records[-2:]] == [("apply", v2), ("revert", v1)]
    assert get(ip, 8080)[0] == 200
    # a restarted worker loads the restored table, never the rejected one
    os.kill(node.worker_pids()[0], signal.SIGKILL)
    assert wait_until(lambda: node.worker_pids().get(0), 5)
    status = wait_until(lambda: [p for p in json.loads(node.lbc("status", "--json").stdout)["processes"]
                                 if p["serving"] == v1], 5)
    assert status


def test_apply_refuses_a_taken_address_while_running(node, web, ip):
    node.up(config(ip))
    squatter = socket.socket()
    squatter.bind((ip, 8081))
    squatter.listen()
    try:
        result = node.apply(config(ip, extra_listener=True))
    finally:
        squatter.close()
    assert result.returncode == 1 and f"{ip}:8081/tcp is already in use" in result.stderr
    assert len(StateDir(node.state).history()) == 1


# -- hot swap ----------------------------------------------------------------------


def test_twenty_applies_under_load_drop_nothing(node, web, ip):
    """50 keep-alive clients on the unchanged listener while 20 applies
    alternate between two tables (weights, a backend and a listener added
    and removed): zero failed requests, zero connection errors."""
    a = config(ip, workers=2)
    b = config(ip, workers=2, weights=(3, 1), extra_backend=True, extra_listener=True)
    node.up(a)
    with Load(ip, 8080, clients=50) as load:
        time.sleep(0.5)
        for i in range(20):
            result = node.apply(b if i % 2 == 0 else a)
            assert result.returncode == 0, result.stderr
            if i % 2 == 0:
                assert get(ip, 8081)[0] == 200  # the added listener serves at once
            time.sleep(0.1)
        time.sleep(0.5)
    assert load.errors == []
    assert load.ok > 500
    assert load.backends.get("web-3", 0) > 0  # the added backend took traffic
    print(f"{load.ok} requests, 0 errors, across 20 applies: {load.backends}")


def test_inflight_request_finishes_when_its_backend_is_removed(node, origins, ip):
    origins("slow", http=[f"{ip}:9101"])
    origins("other", http=[f"{ip}:9102"])
    one = "\n".join([
        "version: 1", "global: {workers: 1}",
        f"listeners: [{{name: web, bind: \"{ip}:8080\", routes: [{{pool: web}}]}}]",
        "pools:", "  - name: web", "    backends:",
        f"      - {{id: slow, address: {ip}, port: 9101}}",
    ]) + "\n"
    node.up(one)
    result: dict = {}

    def slow_request() -> None:
        result["status"], _, result["body"] = get(ip, 8080, "/slow?s=5&n=100000", timeout=30)

    t = threading.Thread(target=slow_request)
    t.start()
    time.sleep(1)
    moved = node.apply(one.replace("id: slow", "id: other").replace("port: 9101", "port: 9102"))
    assert moved.returncode == 0, moved.stderr
    assert get(ip, 8080)[2] == b"other\n"  # new requests go to the new backend at once
    t.join(30)
    assert result["status"] == 200 and result["body"] == b"x" * 100000


def test_kept_alive_connection_switches_table_between_requests(node, web, ip):
    node.up(config(ip).replace(f"      - {{id: web-2, address: {ip}, port: 9102, weight: 1}}\n", ""))
    conn = http.client.HTTPConnection(ip, 8080, timeout=10)
    assert get(ip, 8080, conn=conn)[2] == b"web-1\n"
    swapped = config(ip).replace(f"      - {{id: web-1, address: {ip}, port: 9101, weight: 1}}\n", "")
    assert node.apply(swapped).returncode == 0
    sock = conn.sock
    assert get(ip, 8080, conn=conn)[2] == b"web-2\n"
    assert conn.sock is sock  # the same connection: a reload closes nothing
    conn.close()


def test_down_lets_inflight_requests_finish(node, web, ip):
    node.up(config(ip))
    result: dict = {}

    def slow_request() -> None:
        result["status"], _, result["body"] = get(ip, 8080, "/slow?s=2&n=5000", timeout=30)

    t = threading.Thread(target=slow_request)
    t.start()
    time.sleep(0.5)
    down = node.lbc("down")
    t.join(30)
    assert down.returncode == 0, down.stderr
    assert result == {"status": 200, "body": b"x" * 5000}
    with pytest.raises(OSError):
        socket.create_connection((ip, 8080), timeout=2)


def test_removed_listener_stops_accepting_and_drains(node, web, ip):
    node.up(config(ip, extra_listener=True))
    result: dict = {}

    def slow_request() -> None:
        result["status"], _, result["body"] = get(ip, 8081, "/slow?s=2&n=777", timeout=30)

    t = threading.Thread(target=slow_request)
    t.start()
    time.sleep(0.5)
    assert node.apply(config(ip)).returncode == 0
    with pytest.raises(OSError):
        socket.create_connection((ip, 8081), timeout=2)
    assert get(ip, 8080)[0] == 200
    t.join(30)
    assert result == {"status": 200, "body": b"x" * 777}
