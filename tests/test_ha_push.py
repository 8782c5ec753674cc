"""`lbc plan|apply FILE --node ...`: one file, compiled once, pushed to two
nodes through their admin APIs. Each node lives in a network namespace of
its own (so both bind 0.0.0.0:8080 from the same table); the command runs
in a third, as from an operator's machine or a pipeline."""

from __future__ import annotations

import pytest
from support.netns import SUBNET, Lan, can_make
from support.node import LbcNode, Origin

from lbc.state import StateDir

pytestmark = pytest.mark.timeout(240)


def config(token: str, drain: str = "1s", extra_listener: str = "") -> str:
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
    nodes:
      - {{name: a, address: {SUBNET}.1, priority: 150, admin: "{SUBNET}.1:9900"}}
      - {{name: b, address: {SUBNET}.2, priority: 100, admin: "{SUBNET}.2:9900"}}
listeners:
  - {{name: web, bind: "0.0.0.0:8080", routes: [{{pool: web}}]}}
{extra_listener}pools:
  - name: web
    backends: [{{id: local, address: 127.0.0.1, port: 9101}}]
"""


@pytest.fixture
def lan():
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
