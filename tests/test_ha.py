"""Two lbc nodes behind one virtual IP, in network namespaces the test makes
(two nodes and a client on one bridge): keepalived, run by `lbc up` from
global.ha, moves the address when a node's workers stop and when a node
dies, and does not move it back when the node returns (nopreempt)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from support.netns import SUBNET, Lan
from support.node import LbcNode, Origin, wait_until

pytestmark = pytest.mark.timeout(180)
VIP = f"{SUBNET}.100"
CLIENT = Path(__file__).resolve().parent / "support" / "vip_client.py"

CONFIG = f"""\
version: 1
global:
  workers: 1
  drain_timeout: 1s
  ha:
    virtual_ips: [{VIP}/24]
    interface: eth0
    router_id: 77
    advert_interval: 200ms
    nodes:
      - {{name: a, address: {SUBNET}.1, priority: 150}}
      - {{name: b, address: {SUBNET}.2, priority: 100}}
listeners:
  - {{name: web, bind: "0.0.0.0:8080", routes: [{{pool: web}}]}}
pools:
  - name: web
    backends: [{{id: local, address: 127.0.0.1, port: 9101}}]
"""


@pytest.fixture
def keepalived_installed() -> None:
    if shutil.which("keepalived") is None and not os.path.exists("/usr/sbin/keepalived"):
        pytest.fail("keepalived is not installed (`make test` installs Debian's keepalived)")


class Watch:
    """The client in its namespace, its lines collected as (time, outcome)."""

    def __init__(self, lan: Lan, argv: tuple[str, ...] = (str(CLIENT), VIP, "8080", "0.05")) -> None:
        self.lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen([*lan.exec("c"), sys.executable, *argv], stdout=subprocess.PIPE, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            t, outcome = line.rstrip("\n").split(" ", 1)
            self.lines.append((float(t), outcome))

    def since(self, t: float) -> list[tuple[float, str]]:
        return [x for x in self.lines if x[0] >= t]

    def first(self, t: float, outcome: str) -> float | None:
        return next((x for x, o in self.since(t) if o == outcome), None)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        self._thread.join(5)


def holds_vip(lan: Lan, name: str) -> bool:
    return f"{VIP}/24" in lan.addresses(name)


def kill_node(node: LbcNode) -> None:
    """SIGKILL supervisord and everything under it (workers, keepalived, ...)."""
    pids = []
    pid = node.supervisord_pid()
    if pid:
        pids = [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    node.seen_pids.update(pids)
    for p in pids:
        os.kill(p, signal.SIGKILL)


def keepalived_parents(conf: str) -> list[int]:
    """keepalived processes (not their VRRP children) running `conf`."""
    found = []
    for p in psutil.process_iter(["cmdline", "ppid"]):
        cmd = p.info["cmdline"] or []
        if cmd and cmd[0].endswith("keepalived") and conf in cmd:
            with contextlib.suppress(psutil.Error):
                if not psutil.Process(p.info["ppid"]).cmdline()[0].endswith("keepalived"):
                    found.append(p.pid)
    return found


def supervisorctl(node: LbcNode, *args: str) -> None:
    conf = node.state / "run" / "supervisord.conf"
    subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", str(conf), *args],
                   capture_output=True, timeout=60, check=True)


def test_virtual_ip_fails_over_and_does_not_flap(lan, keepalived_installed, tmp_path):
    origins = [Origin(f"{n}-web", http=["127.0.0.1:9101"], prefix=lan.exec(n)) for n in ("a", "b")]
    nodes = {n: LbcNode(tmp_path / n, prefix=lan.exec(n)) for n in ("a", "b")}
    watch = None
    try:
        nodes["a"].up(CONFIG)
        assert wait_until(lambda: holds_vip(lan, "a"), 10), lan.addresses("a")
        nodes["b"].up(CONFIG)
        watch = Watch(lan)
        assert wait_until(lambda: watch.first(0, "200 a-web"), 10), watch.lines[-5:]
        figures = {}

        # Applies on the holder (a table change, a worker count change) do not move the address.
        start = time.monotonic()
        for i in range(6):
            text = CONFIG.replace("drain_timeout: 1s", f"drain_timeout: {i + 2}s")
            if i == 3:
                text = text.replace("workers: 1", "workers: 2")
            assert nodes["a"].apply(text).returncode == 0
        time.sleep(2)
        during = [o for _, o in watch.since(start)]
        assert set(during) == {"200 a-web"} and holds_vip(lan, "a"), sorted(set(during))
        figures["applies"] = len(during)

        # A's workers stop: A's node check fails, it gives the address up.
        start = time.monotonic()
        supervisorctl(nodes["a"], "stop", "worker-0")
        assert wait_until(lambda: watch.first(start, "200 b-web"), 6), watch.since(start)[-10:]
        figures["workers stopped"] = watch.first(start, "200 b-web") - start
        assert "unavailable" in nodes["a"].lbc("status").stdout

        # A's workers back: A is healthy again but does not take the address back.
        supervisorctl(nodes["a"], "start", "worker-0")
        back = time.monotonic()
        time.sleep(4)
        after = [o for _, o in watch.since(back)]
        assert set(after) == {"200 b-web"}, after
        assert not holds_vip(lan, "a")

        # B dies (keepalived and workers SIGKILLed): A takes the address.
        start = time.monotonic()
        kill_node(nodes["b"])
        assert wait_until(lambda: watch.first(start, "200 a-web"), 6), watch.since(start)[-10:]
        figures["node killed"] = watch.first(start, "200 a-web") - start

        # B comes back: no move, no failed request; its keepalived drops the address
        # the killed one left on eth0.
        assert nodes["b"].lbc("up").returncode == 0
        back = time.monotonic()
        time.sleep(4)
        after = [o for _, o in watch.since(back)]
        assert set(after) == {"200 a-web"}, after
        assert not holds_vip(lan, "b") and holds_vip(lan, "a")

        # A's supervisord alone is killed: its workers and keepalived live on; `lbc up`
        # takes over, stopping the leftover keepalived (one failover at most), and
        # exactly one keepalived runs for A afterwards.
        os.kill(nodes["a"].supervisord_pid(), signal.SIGKILL)
        assert nodes["a"].lbc("up").returncode == 0
        conf = str(nodes["a"].state / "run" / "keepalived.conf")
        assert wait_until(lambda: len(keepalived_parents(conf)) == 1, 10), keepalived_parents(conf)
        back = time.monotonic()
        assert wait_until(lambda: watch.first(back, "200 a-web") or watch.first(back, "200 b-web"), 6)
        print(f"failover: {figures}")
        assert figures["workers stopped"] < 3 and figures["node killed"] < 3, figures
    finally:
        if watch is not None:
            watch.stop()
        for n in nodes.values():
            n.cleanup()
        for o in origins:
            o.stop()


def test_export_keepalived_is_valid_for_each_node(tmp_path):
    exe = shutil.which("keepalived") or "/usr/sbin/keepalived"
    if not os.path.exists(exe):
        pytest.fail("keepalived is not installed (`make test` installs Debian's keepalived)")
    config = tmp_path / "pool.yaml"
    config.write_text(CONFIG)
    state = tmp_path / "state"
    for name, peer in (("a", f"{SUBNET}.2"), ("b", f"{SUBNET}.1")):
        result = subprocess.run([sys.executable, "-m", "lbc", "export", "keepalived", str(config), "--node", name,
                                 "--state", str(state)], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        text = result.stdout
        assert f"router_id lbc-{name}" in text and f"        {peer}\n" in text and "nopreempt" in text
        assert f"--state {state.resolve()} --quiet" in text and "lbc_node_check weight 0" in text
        conf = tmp_path / f"{name}.conf"
        conf.write_text(text)
        check = subprocess.run([exe, "--config-test", "-f", str(conf)], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
    result = subprocess.run([sys.executable, "-m", "lbc", "export", "keepalived", str(config), "--node", "z"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "global.ha has no node 'z' (nodes: a, b)" in result.stderr


def test_status_shows_the_other_nodes(tmp_path, origins):
    """Each node's health checker probes the others' /healthz (their `admin`)."""
    from support.node import fresh_ip

    ips = {"a": fresh_ip(), "b": fresh_ip()}
    nodes_yaml = "".join(f"      - {{name: {n}, address: {ip}, priority: {150 - i}, admin: \"{ip}:9900\"}}\n"
                         for i, (n, ip) in enumerate(ips.items()))

    def config(n: str) -> str:  # the same file but for each node's own admin and listener address
        ip = ips[n]
        return (f"version: 1\nglobal:\n  workers: 1\n  admin: {{bind: \"{ip}:9900\"}}\n  ha:\n"
                f"    virtual_ips: [10.99.0.100/24]\n    interface: lo\n    router_id: 99\n    keepalived: false\n"
                f"    nodes:\n{nodes_yaml}listeners:\n  - {{name: web, bind: \"{ip}:8080\", routes: [{{pool: web}}]}}\n"
                f"pools:\n  - name: web\n    backends: [{{id: w, address: {ip}, port: 9101}}]\n")

    nodes = {n: LbcNode(tmp_path / n) for n in ips}
    try:
        for n, ip in ips.items():
            origins(f"{n}-web", http=[f"{ip}:9101"])
            result = nodes[n].lbc("up", str(nodes[n].write(config(n))), "--ha-node", n)
            assert result.returncode == 0, result.stderr

        def peer_line(n: str) -> str:
            return next((line for line in nodes[n].lbc("status").stdout.splitlines() if line.startswith("peer:")), "")

        assert wait_until(lambda: "b (" in peer_line("a") and "takes traffic" in peer_line("a"), 10), peer_line("a")
        assert wait_until(lambda: "a (" in peer_line("b") and "takes traffic" in peer_line("b"), 10), peer_line("b")
        assert "drained" in nodes["b"].lbc("drain-node").stdout
        assert wait_until(lambda: "unavailable (" in peer_line("a"), 5), peer_line("a")

        # An admin API change on one node would not reach the other: refused.
        conn = http.client.HTTPConnection(ips["a"], 9900, timeout=30)
        conn.request("POST", "/backends", body=json.dumps({"address": ips["a"], "port": 9102}),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        answer = json.loads(r.read())
        conn.close()
        assert r.status == 409 and "would not reach the others" in answer["error"], answer
    finally:
        for n in nodes.values():
            n.cleanup()


# One GET / per cookie ("" for none) to the VIP each round, on a new connection, for ROUNDS
# rounds (0: until killed). One line per request, as Watch reads them:
# "<monotonic start> <cookie index> <status> <backend id> <Set-Cookie's name=value or ->".
STICKY_CLIENT = f"""\
import http.client, sys, time
rounds, cookies = int(sys.argv[1]), sys.argv[2:]
n = 0
while rounds == 0 or n < rounds:
    n += 1
    for i, cookie in enumerate(cookies):
        start = time.monotonic()
        try:
            c = http.client.HTTPConnection("{VIP}", 8080, timeout=0.5)
            c.request("GET", "/", headers={{"Cookie": cookie}} if cookie else {{}})
            r = c.getresponse()
            body = r.read().decode(errors="replace").strip()
            c.close()
            outcome = f"{{r.status}} {{body}} {{(r.getheader('Set-Cookie') or '-').split(';')[0]}}"
        except OSError as e:
            outcome = f"error {{type(e).__name__}} -"
        print(f"{{start:.3f}} {{i}} {{outcome}}", flush=True)
    time.sleep(0.05)
"""


def test_sticky_sessions_keep_working_across_node_failover(lan, keepalived_installed, tmp_path):
    """A cookie signed by the node that held the VIP pins the client to the same backend
    on the node that takes the VIP over: the nodes share only the secret_file."""
    lan.host("o", 20)
    secret = tmp_path / "sticky.keys"
    secret.write_text("one-secret-for-both-nodes-0123456789\n")
    config = CONFIG.split("pools:")[0].replace("router_id: 77", "router_id: 78") + (
        f"pools:\n  - name: web\n    sticky: {{mode: cookie, secret_file: {secret}}}\n    backends:\n"
        f"      - {{id: app-1, address: {SUBNET}.20, port: 9201}}\n"
        f"      - {{id: app-2, address: {SUBNET}.20, port: 9202}}\n")
    script = tmp_path / "sticky_client.py"
    script.write_text(STICKY_CLIENT)
    origins = [Origin(f"app-{i}", http=[f"{SUBNET}.20:920{i}"], prefix=lan.exec("o")) for i in (1, 2)]
    nodes = {n: LbcNode(tmp_path / n, prefix=lan.exec(n)) for n in ("a", "b")}
    watch = None
    try:
        nodes["a"].up(config)
        assert wait_until(lambda: holds_vip(lan, "a"), 10), lan.addresses("a")
        nodes["b"].up(config)

        # Cookie-less requests (round robin) until A has issued a cookie for each backend.
        first = subprocess.run([*lan.exec("c"), sys.executable, str(script), "6", ""],
                               capture_output=True, text=True, timeout=30).stdout
        jar = {}
        for line in first.splitlines():
            _, _, status, ident, cookie = line.split(" ")
            if status == "200" and cookie != "-":
                jar.setdefault(ident, cookie)
        assert sorted(jar) == ["app-1", "app-2"], first
        # Three requests a round (app-1's cookie twice): a node ignoring the cookie and
        # going round robin could not give this pattern by luck.
        pinned = ["app-1", "app-1", "app-2"]
        ok = {f"{i} 200 {p} -" for i, p in enumerate(pinned)}  # the pinned backend, no new cookie

        # Through A (the holder) each cookie keeps its backend and is not reissued.
        watch = Watch(lan, (str(script), "0", *(jar[p] for p in pinned)))
        assert wait_until(lambda: len(watch.lines) >= 30, 10), watch.lines
        assert holds_vip(lan, "a") and not holds_vip(lan, "b")
        before = {o for _, o in watch.lines}
        assert before == ok, before

        # A dies whole. Answers to requests started once its processes are gone are B's.
        pids = [nodes["a"].supervisord_pid(), *nodes["a"].worker_pids().values()]
        start = time.monotonic()
        kill_node(nodes["a"])

        def a_alive() -> bool:
            for p in pids:
                with contextlib.suppress(psutil.Error):
                    if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                        return True
            return False

        assert wait_until(lambda: not a_alive(), 5), pids
        gone = time.monotonic()
        assert wait_until(lambda: all(watch.first(gone, o) for o in ok), 10), watch.since(start)[-10:]
        took = {f"cookie {i} ({p})": round(watch.first(gone, f"{i} 200 {p} -") - start, 3)
                for i, p in enumerate(pinned)}
        print(f"kill -> first sticky answer via b: {took}")
        assert holds_vip(lan, "b")

        # For a while after, every answer via B is the pinned backend with no new cookie;
        # besides, only failed connections (before B had the address) are allowed.
        more = time.monotonic()
        assert wait_until(lambda: len(watch.since(more)) >= 30, 10)
        after = {o for _, o in watch.since(gone)}
        assert {o for o in after if o.split(" ")[1] != "error"} == ok, sorted(after)
        assert max(took.values()) < 3, took
    finally:
        if watch is not None:
            watch.stop()
        for n in nodes.values():
            n.cleanup()
        for o in origins:
            o.stop()
