"""lbc.fleet's rules over nodes that answer as the admin API does, in
memory: which nodes get the table, who is rolled back, what is reported.
(tests/test_ha_config.py runs the same through real nodes.)"""

from __future__ import annotations

import pytest

from lbc import fleet
from lbc import table as tablemod
from lbc.errors import LbcError
from lbc.service import Compiled, compile_file

CONFIG = """\
version: 1
global:
  drain_timeout: {drain}
  ha:
    virtual_ips: [10.0.0.100/24]
    interface: eth0
    router_id: 51
    keepalived: false
    nodes:
      - {{name: a, address: 10.0.0.1, priority: 150, admin: "10.0.0.1:9900"}}
      - {{name: b, address: 10.0.0.2, priority: 100, admin: "10.0.0.2:9900"}}
      - {{name: c, address: 10.0.0.3, priority: 50}}
listeners:
  - {{name: web, bind: "0.0.0.0:8080", routes: [{{pool: web}}]}}
pools:
  - name: web
    backends: [{{id: w, address: 127.0.0.1, port: 9101}}]
"""


@pytest.fixture
def tables(tmp_path):
    def make(drain: str) -> Compiled:
        path = tmp_path / f"{drain}.yaml"
        path.write_text(CONFIG.format(drain=drain))
        return compile_file(path)

    return make("1s"), make("2s")


class FakeNode:
    """A node's admin API: a live table, and what its push and rollback do."""

    def __init__(self, live: Compiled, push: str = "ok", rollback: str = "ok") -> None:
        self.live_version, self.live_table = live.version, live.table
        self.installed = {live.version: live.table}
        self.push_does, self.rollback_does = push, rollback  # ok, refuse, lost, unreachable, superseded / ok, store
        self.calls: list[tuple] = []

    def live(self):
        if self.push_does == "unreachable":
            raise fleet.NodeError("GET /table: Connection refused")
        return self.live_version, self.live_table

    def push(self, compiled, expect, argv):
        self.calls.append(("push", compiled.version, expect))
        if self.push_does == "refuse":
            raise fleet.NodeError("503 the workers did not take the table; the previous table is live again", 503)
        self.installed[compiled.version] = compiled.table
        self.live_version, self.live_table = compiled.version, compiled.table
        if self.push_does == "lost":  # it took the table, the answer never came
            raise fleet.NodeError("PUT /table: timed out")
        if self.push_does == "superseded":  # installed, but another node's table won the ha store
            return {"version": compiled.version, "store": "superseded",
                    "shared": "warning: another node wrote 0123 to the ha store meanwhile"}
        return {"version": compiled.version, "store": "", "shared": ""}

    def rollback(self, version, expect, argv):
        self.calls.append(("rollback", version, expect))
        assert self.live_version == expect
        self.live_version, self.live_table = version, self.installed[version]
        if self.rollback_does == "store":
            return {"version": version, "store": "superseded", "shared": "warning: another node wrote 4567 first"}
        return {"version": version, "store": "", "shared": ""}


def run(compiled, nodes, partial=False):
    targets = tuple(fleet.Target(name, f"http://{name}:9900") for name in nodes)
    return fleet.apply(compiled, targets, lambda t: nodes[t.name], argv="lbc apply", partial=partial)


def test_every_node_takes_it(tables):
    old, new = tables
    nodes = {"a": FakeNode(old), "b": FakeNode(new)}
    result = run(new, nodes)
    assert result.exit_code() == 0 and [n.state for n in result.nodes] == ["installed", "unchanged"]
    assert nodes["a"].calls == [("push", new.version, old.version)] and nodes["b"].calls == []
    assert f"Table {new.version[:12]} is live on all 2 nodes." in result.render_text()


def test_a_failed_node_rolls_the_others_back(tables):
    old, new = tables
    nodes = {"a": FakeNode(old), "b": FakeNode(old, push="refuse"), "c": FakeNode(old)}
    result = run(new, nodes)
    assert result.exit_code() == 1
    assert {n.target.name: n.state for n in result.nodes} == {"a": "rolled back", "b": "failed", "c": "rolled back"}
    for name in "ac":
        assert nodes[name].calls == [("push", new.version, old.version), ("rollback", old.version, new.version)]
        assert nodes[name].live_version == old.version
    text = result.render_text()
    assert "node b (http://b:9900): Plan: 0 to add, 2 to change, 0 to remove. FAILED: 503 the workers" in text
    assert "Failed on b; the other nodes were put back on their previous table." in text


def test_partial_keeps_it_where_it_took(tables):
    old, new = tables
    nodes = {"a": FakeNode(old), "b": FakeNode(old, push="refuse")}
    result = run(new, nodes, partial=True)
    assert result.exit_code() == 1 and [n.state for n in result.nodes] == ["kept", "failed"]
    assert nodes["a"].live_version == new.version
    assert "1 of 2 nodes serve table" in result.render_text()


def test_an_unreachable_node_stops_it_before_anything_changes(tables):
    old, new = tables
    nodes = {"a": FakeNode(old), "b": FakeNode(old, push="unreachable")}
    result = run(new, nodes)
    assert [n.state for n in result.nodes] == ["skipped", "failed"] and nodes["a"].calls == []
    assert "Connection refused" in result.render_text()
    # with --partial the reachable ones go on
    result = run(new, nodes, partial=True)
    assert [n.state for n in result.nodes] == ["kept", "failed"] and nodes["a"].live_version == new.version


def test_a_lost_answer_is_asked_about_and_rolled_back_too(tables):
    old, new = tables
    nodes = {"a": FakeNode(old, push="lost"), "b": FakeNode(old, push="refuse")}
    result = run(new, nodes)
    assert [n.state for n in result.nodes] == ["rolled back", "failed"]
    assert nodes["a"].live_version == old.version


def test_a_rollback_the_store_did_not_take_is_reported_failed(tables):
    old, new = tables
    nodes = {"a": FakeNode(old, rollback="store"), "b": FakeNode(old, push="refuse")}
    result = run(new, nodes)
    assert result.nodes[0].state == "rollback failed" and "another node wrote 4567 first" in result.render_text()


def test_a_push_another_node_won_the_store_from_counts_as_failed(tables):
    old, new = tables
    nodes = {"a": FakeNode(old), "b": FakeNode(old, push="superseded")}
    result = run(new, nodes)
    assert [n.state for n in result.nodes] == ["rolled back", "failed"] and result.exit_code() == 1
    assert "another node wrote 0123" in result.render_text()


def test_plan_shows_drift_between_nodes(tables):
    old, new = tables
    nodes = {"a": FakeNode(old), "b": FakeNode(new)}
    targets = tuple(fleet.Target(n, f"http://{n}:9900") for n in nodes)
    result = fleet.plan(new, targets, lambda t: nodes[t.name])
    assert result.exit_code(detailed=True) == 2 and result.exit_code() == 0
    text = result.render_text()
    assert "1 of 2 nodes would change. The nodes serve 2 different tables now" in text


def test_targets(tables):
    table = tables[0].table
    got = fleet.targets(["b", "10.0.0.1:9900", "http://10.9.9.9"], table)
    assert [(t.name, t.url) for t in got] == [("b", "http://10.0.0.2:9900"), ("a", "http://10.0.0.1:9900"),
                                              ("http://10.9.9.9:9900", "http://10.9.9.9:9900")]
    with pytest.raises(LbcError, match="node 'c' has no admin address"):
        fleet.targets([], table, all_nodes=True)
    with pytest.raises(LbcError, match="neither host:port, a URL, nor a global.ha node"):
        fleet.targets(["lb9"], table)
    with pytest.raises(LbcError, match="plain HTTP"):
        fleet.targets(["https://10.0.0.1:9900"], table)
    plain = tablemod.from_plain(tablemod.RoutingTable, {**tablemod.to_plain(table),
                                                        "settings": {**tablemod.to_plain(table.settings), "ha": None}})
    with pytest.raises(LbcError, match="--all-nodes needs a global.ha section"):
        fleet.targets([], plain, all_nodes=True)
