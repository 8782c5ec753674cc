"""One config across two nodes. `lbc plan|apply FILE --node ...`: one
file, compiled once, pushed through the nodes' admin APIs; global.ha.store:
admin API changes made on either node reach both. Each node lives in a
network namespace of its own (so both bind 0.0.0.0:8080 from the same
table); commands, API calls and Redis run in a third, the client's."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time

import pytest
from support.netns import SUBNET
from support.node import LbcNode, Origin, wait_until

from lbc.state import StateDir

pytestmark = pytest.mark.timeout(240)
REDIS = f"redis://{SUBNET}.10:6390/0"


def config(token: str, drain: str = "1s", extra_listener: str = "", store: str = "") -> str:
    return f"""\
version: 1
global:
  workers: 1
  drain_timeout: {drain}
  admin: {{bind: "0.0.0.0:9900", token_file: {token}}}
  ha:
    virtual_ips: [{SUBNET}.100/24]
    interface: eth0
    router_id: 79
    keepalived: false
{f"    store: {store}{chr(10)}" if store else ""}    nodes:
      - {{name: a, address: {SUBNET}.1, priority: 150, admin: "{SUBNET}.1:9900"}}
      - {{name: b, address: {SUBNET}.2, priority: 100, admin: "{SUBNET}.2:9900"}}
listeners:
  - {{name: web, bind: "0.0.0.0:8080", routes: [{{pool: web}}]}}
{extra_listener}pools:
  - name: web
    backends: [{{id: local, address: 127.0.0.1, port: 9101}}]
"""


def test_apply_to_every_node_rolls_back_or_keeps_partial(lan, tmp_path):
    token = tmp_path / "admin.token"
    token.write_text("fleet-token-0123456789abcdef\n")
    origins = [Origin(f"{n}-web", http=["127.0.0.1:9101"], prefix=lan.exec(n)) for n in ("a", "b")]
    nodes = {n: LbcNode(tmp_path / n, prefix=lan.exec(n)) for n in ("a", "b")}
    operator = LbcNode(tmp_path / "c", prefix=lan.exec("c"))  # only runs commands: no state of its own is used
    blocker = None

    def live(n: str) -> str | None:
        return StateDir(nodes[n].state).current_version()

    def run(*args: str, text: str) -> tuple[int, str]:
        result = operator.lbc(*args, str(operator.write(text)), timeout=120)
        return result.returncode, result.stdout + result.stderr

    try:
        for n in nodes.values():
            n.up(config(token))
        v0 = live("a")
        assert live("b") == v0

        # Plan on both: the same change; then apply it to both.
        code, out = run("plan", "--all-nodes", "--detailed-exitcode", text=config(token, drain="2s"))
        assert code == 2 and out.count("Plan: 0 to add, 2 to change, 0 to remove.") == 2, out
        assert "2 of 2 nodes would change." in out and "different tables" not in out
        code, out = run("apply", "--all-nodes", text=config(token, drain="2s"))
        assert code == 0, out
        v1 = live("a")
        assert v1 != v0 and live("b") == v1 and "is live on all 2 nodes." in out, out
        for n in nodes:
            assert StateDir(nodes[n].state).history()[-1].origin == "push"

        # Drift between nodes: b changed on its own; plan shows it per node.
        assert nodes["b"].apply(config(token, drain="3s")).returncode == 0
        code, out = run("plan", "--node", "a", "--node", f"{SUBNET}.2:9900", text=config(token, drain="2s"))
        assert code == 0 and "The nodes serve 2 different tables now" in out, out
        node_a, node_b = out.split("== node ")[1:3]
        assert node_a.startswith("a (") and "No changes." in node_a
        assert node_b.startswith("b (") and "~ drain_timeout: 3s -> 2s" in node_b, out
        v_b = live("b")

        # b cannot listen on the new port (something in its namespace holds it):
        # b refuses, a is put back; nothing serves the new table.
        blocker = Origin("blocker", http=["0.0.0.0:8081"], prefix=lan.exec("b"))
        web2 = '  - {name: web2, bind: "0.0.0.0:8081", routes: [{pool: web}]}\n'
        code, out = run("apply", "--all-nodes", text=config(token, drain="2s", extra_listener=web2))
        assert code == 1, out
        assert "node b (" in out and "FAILED" in out and "cannot listen" in out, out
        assert f"rolled back to {v1[:12]}" in out and "put back on their previous table" in out, out
        assert (live("a"), live("b")) == (v1, v_b)
        assert [r.command for r in StateDir(nodes["a"].state).history()[-2:]] == ["apply", "rollback"]

        # The same with --partial: a keeps it.
        code, out = run("apply", "--all-nodes", "--partial", text=config(token, drain="2s", extra_listener=web2))
        assert code == 1 and "kept: --partial" in out and "1 of 2 nodes serve table" in out, out
        assert live("a") not in (v1, v0) and live("b") == v_b

        # A node that cannot be reached: nothing is pushed anywhere.
        before = live("a")
        code, out = run("apply", "--node", "a", "--node", f"{SUBNET}.2:9999", text=config(token, drain="4s"))
        assert code == 1 and "not changed" in out and "Connection refused" in out, out
        assert live("a") == before

        # Without the token: refused, and said how to give it.
        wrong = tmp_path / "wrong.token"
        wrong.write_text("not-the-token\n")
        code, out = run("plan", "--all-nodes", "--token-file", str(wrong), text=config(token))
        assert code == 1 and "401" in out and "--token-file" in out, out
    finally:
        if blocker is not None:
            blocker.stop()
        for n in nodes.values():
            n.cleanup()
        for o in origins:
            o.stop()


CALL = """\
import http.client, json, sys
host, method, path, token, body = sys.argv[1:6]
c = http.client.HTTPConnection(host, 9900, timeout=60)
c.request(method, path, body=body or None, headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
r = c.getresponse()
print(json.dumps([r.status, json.loads(r.read())]))
"""


def test_admin_api_changes_reach_every_node_through_the_store(lan, tmp_path):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (`make test` installs Debian's redis-server)")
    token = tmp_path / "admin.token"
    token.write_text("store-token-0123456789abcdef\n")
    secret = token.read_text().strip()
    redis = subprocess.Popen([*lan.exec("c"), exe, "--bind", f"{SUBNET}.10", "--port", "6390", "--save", "",
                              "--appendonly", "no", "--protected-mode", "no"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    origins = [Origin(f"{n}-{port}", http=[f"127.0.0.1:{port}"], prefix=lan.exec(n))
               for n in ("a", "b") for port in (9101, 9102, 9103)]
    nodes = {n: LbcNode(tmp_path / n, prefix=lan.exec(n)) for n in ("a", "b")}
    ip = {"a": f"{SUBNET}.1", "b": f"{SUBNET}.2"}

    def call(n: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        out = subprocess.run([*lan.exec("c"), sys.executable, "-c", CALL, ip[n], method, path, secret,
                              json.dumps(body) if body is not None else ""],
                             capture_output=True, text=True, timeout=90)
        assert out.returncode == 0, out.stderr
        return tuple(json.loads(out.stdout))

    def live(n: str) -> str | None:
        return StateDir(nodes[n].state).current_version()

    def backends(n: str) -> set[str]:
        return {f"{b['address']}:{b['port']}" for b in call(n, "GET", "/backends")[1]["backends"]}

    try:
        text = config(token, store=REDIS)
        for n in nodes.values():
            n.up(text)
        assert live("a") == live("b")

        # A change on a: b installs it from the store and serves it.
        code, answer = call("a", "POST", "/backends", {"address": "127.0.0.1", "port": 9102})
        answered = time.monotonic()
        assert code == 201, answer
        assert wait_until(lambda: live("b") == live("a"), 5), (live("a"), live("b"))
        print(f"a's answer -> b's live table: {time.monotonic() - answered:.2f} s")
        assert backends("b") == {"127.0.0.1:9101", "127.0.0.1:9102"}
        record = StateDir(nodes["b"].state).history()[-1]
        assert (record.origin, record.command) == ("store", "apply")

        # Two changes at once, one on each node: neither is lost, both nodes end on one table.
        answers = {}
        threads = [threading.Thread(target=lambda n=n, body=body: answers.update({n: call(n, *body)})) for n, body in (
            ("a", ("POST", "/backends", {"address": "127.0.0.1", "port": 9103})),
            ("b", ("PUT", "/config/algorithm", {"algorithm": "least_connections"})))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert answers["a"][0] == 201 and answers["b"][0] == 200, answers
        assert wait_until(lambda: live("a") == live("b"), 5), (live("a"), live("b"))
        for n in nodes:
            assert backends(n) == {"127.0.0.1:9101", "127.0.0.1:9102", "127.0.0.1:9103"}
            assert call(n, "GET", "/config")[1]["pools"][0]["algorithm"] == "least_connections"

        # A file applied on one node reaches the other too (the file wins over the API's drift).
        applied = nodes["b"].apply(config(token, drain="2s", store=REDIS))
        assert applied.returncode == 0 and "Written to the ha store" in applied.stdout, applied.stdout
        assert wait_until(lambda: live("a") == live("b"), 5), (live("a"), live("b"))
        assert backends("a") == {"127.0.0.1:9101"}
        assert f"store:     {REDIS}: holds {live('a')[:12]}, which this node serves" in nodes["a"].lbc("status").stdout

        # Redis gone: the API refuses the change (nothing changes anywhere); the nodes serve on.
        before = live("a")
        redis.kill()
        redis.wait(10)
        code, answer = call("a", "POST", "/backends", {"address": "127.0.0.1", "port": 9102})
        assert code == 503 and "the ha store" in answer["error"], answer
        assert live("a") == live("b") == before
        assert f"store:     the ha store {REDIS} did not answer" in nodes["b"].lbc("status").stdout
    finally:
        if redis.poll() is None:
            redis.kill()
            redis.wait(10)
        for n in nodes.values():
            n.cleanup()
        for o in origins:
            o.stop()
