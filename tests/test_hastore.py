"""global.ha.store against a real Redis, one state directory (no workers):
signed entries, the compare-and-set that keeps two concurrent admin API
changes, the store put back when an install fails, and the follower's
refusals. (tests/test_ha_config.py runs it across two live nodes.)"""

from __future__ import annotations

import signal

import pytest

from lbc import mutate, service
from lbc import table as tablemod
from lbc.errors import StalePlan, StateError
from lbc.hastore import Follower, NotSigned, SharedTable, Stored
from lbc.state import StateDir


@pytest.fixture
def group(tmp_path, redis_server, ip):
    token = tmp_path / "admin.token"
    token.write_text("group-token-0123456789\n")
    text = f"""\
version: 1
global:
  admin: {{bind: "{ip}:9900", token_file: {token}}}
  ha:
    virtual_ips: [10.0.0.100/24]
    interface: eth0
    router_id: 42
    keepalived: false
    store: {redis_server.url}
    nodes:
      - {{name: a, address: 10.0.0.1, priority: 150}}
      - {{name: b, address: 10.0.0.2, priority: 100}}
listeners:
  - {{name: web, bind: "{ip}:8080", routes: [{{pool: web}}]}}
pools:
  - name: web
    backends: [{{id: w, address: 127.0.0.1, port: 9101}}]
"""
    config = tmp_path / "pool.yaml"
    config.write_text(text)
    state = StateDir(tmp_path / "state")
    result = service.apply(service.compile_file(config), state, argv="test", lock_timeout=5)
    assert "Written to the ha store" in result.shared, result.shared
    store = service.open_store(state.current_table()[1], state)
    yield state, store, token
    store.close()


def follower_of(state, install=None, clock=None) -> Follower:
    def default_install(store, stored, expect):
        return service.install_stored(state, store, stored, expect, lock_timeout=5)

    return Follower(lambda t: service.store_config(t, state),
                    lambda store, version, table: service.write_pending(state, store, version, table, lock_timeout=5),
                    install or default_install, **({"clock": clock} if clock else {}))


def compiled_with(tmp_path, text: str):
    path = tmp_path / "other.yaml"
    path.write_text(text)
    return service.compile_file(path)


def add(port: int):
    return lambda t: mutate.add_backend(t, address="127.0.0.1", port=port, pool="web", now="2026-11-30T00:00:00Z")[0]


def backends(table) -> set[int]:
    return {b.port for b in table.pool("web").backends}


def test_entries_are_signed_and_swaps_compare_versions(group):
    state, store, _ = group
    live = state.current_version()
    assert store.version() == live and store.read().version == live
    other = SharedTable(store.url, store.group, b"another token")
    with pytest.raises(NotSigned, match="not signed with this node's admin token"):
        other.read()
    other.close()
    stored = store.read()
    assert store.swap("0" * 64, Stored("1" * 64, stored.data, {})) is False  # not what is stored: refused
    assert store.swap("0" * 64, stored) is True  # already stored: nothing to do
    assert store.version() == live


def test_two_changes_at_once_both_land(group):
    state, store, _ = group
    calls = []

    def edit(table):
        calls.append(backends(table))
        if len(calls) == 1:  # another node's change lands while this one is being made
            stored = store.read()
            theirs = add(9102)(tablemod.load(stored.data))
            data = tablemod.dump(theirs)
            assert store.swap(stored.version, Stored(tablemod.version_of(data), data, stored.files))
        return add(9103)(table)

    result = service.change(state, edit, command="api: POST /backends", argv="test", lock_timeout=5)
    assert calls == [{9101}, {9101, 9102}]  # made again on the other's result
    live = state.current_table()[1]
    assert backends(live) == {9101, 9102, 9103} and result.installed
    assert store.version() == state.current_version()


def test_a_failed_install_puts_the_store_back(group):
    state, store, _ = group
    before = store.version()
    state.slots_file.unlink()
    state.slots_file.mkdir()  # the install cannot record slots: it fails after the store took the change
    with pytest.raises(StateError):
        service.change(state, add(9104), command="api: POST /backends", argv="test", lock_timeout=5)
    assert store.version() == before == state.current_version()


def test_the_follower_gives_up_on_what_it_cannot_install_and_says_so(group, tmp_path):
    state, store, token = group
    installs = []

    def install(s, stored, expect):
        installs.append(stored.version)
        return service.install_stored(state, s, stored, expect, lock_timeout=5)

    follower = follower_of(state, install)
    live_version, live = state.current_table()
    assert follower.step(live_version, live) is None  # the store holds the live table

    # A table naming a secret this node lacks, at a path where this node has another file.
    secret = tmp_path / "cookie.keys"
    secret.write_text("the other node's secret, long enough\n")
    sticky = tmp_path / "sticky.yaml"
    sticky.write_text((tmp_path / "pool.yaml").read_text().replace(
        "    backends:", f"    sticky: {{mode: cookie, secret_file: {secret}}}\n    backends:"))
    theirs = service.compile_file(sticky)
    secret.write_text("this node's different secret, as long\n")
    assert store.swap(live_version, Stored(theirs.version, theirs.data, theirs.files))
    done = follower.step(live_version, live)
    assert done.startswith(f"failed {theirs.version[:12]}") and "is not the file it was compiled with" in done
    assert follower.step(live_version, live) is None and installs == [theirs.version]  # not tried again
    assert state.current_version() == live_version

    # The file fixed, the next table stored is installed.
    secret.write_text("the other node's secret, long enough\n")
    sticky.write_text(sticky.read_text().replace("version: 1\nglobal:\n", "version: 1\nglobal:\n  drain_timeout: 2s\n"))
    next_one = service.compile_file(sticky)
    assert store.swap(theirs.version, Stored(next_one.version, next_one.data, next_one.files))
    assert follower.step(live_version, live) == f"installed {next_one.version[:12]}"
    assert state.current_version() == next_one.version and state.history()[-1].origin == "store"


def test_an_apply_while_the_store_is_down_is_written_once_it_answers(group, redis_server, tmp_path):
    state, store, _ = group
    before = state.current_version()
    text = (tmp_path / "pool.yaml").read_text()
    redis_server.proc.send_signal(signal.SIGSTOP)  # up, but silent: every call times out
    try:
        result = service.apply(compiled_with(tmp_path, text.replace("router_id: 42", "router_id: 42\n    preempt: true")),
                               state, argv="test", lock_timeout=5)
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    assert result.store == "pending" and "writes it there once it answers" in result.shared, result.shared
    mine = state.current_version()
    assert store.version() == before and state.store_pending() == (mine, before)
    # the follower writes it instead of going back to what the store holds
    follower = follower_of(state)
    assert follower.step(mine, state.current_table()[1]).startswith(f"wrote {mine[:12]}")
    assert store.version() == mine and state.store_pending() is None and state.current_version() == mine


def test_a_pending_table_another_node_overtook_is_dropped_and_the_store_followed(group, redis_server, tmp_path):
    state, store, _ = group
    before = state.current_version()
    text = (tmp_path / "pool.yaml").read_text()
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        service.apply(compiled_with(tmp_path, text.replace("router_id: 42", "router_id: 42\n    preempt: true")),
                      state, argv="test", lock_timeout=5)
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    theirs = compiled_with(tmp_path, text.replace("port: 9101", "port: 9109"))
    assert store.swap(before, Stored(theirs.version, theirs.data, {}))  # another node, once the store was back
    follower = follower_of(state)
    live = state.current_table()
    assert follower.step(*live).startswith("lost")
    assert follower.step(*live) == f"installed {theirs.version[:12]}"
    assert state.current_version() == theirs.version and state.store_pending() is None


def test_a_rotated_token_is_replaced_by_the_next_install(group, tmp_path):
    state, store, token = group
    other = SharedTable(store.url, store.group, b"the old token")
    stored = store.read()
    assert other.swap(stored.version, Stored("e" * 64, stored.data, {}))  # signed otherwise
    other.close()
    with pytest.raises(NotSigned):
        store.read()
    text = (tmp_path / "pool.yaml").read_text()
    result = service.apply(compiled_with(tmp_path, text.replace("router_id: 42", "router_id: 42\n    preempt: true")),
                           state, argv="test", lock_timeout=5)
    assert result.store == "written" and store.read().version == state.current_version()


def test_installs_keep_the_stored_dynamic_backends_and_rollbacks_wait_for_the_node(group, tmp_path):
    state, store, _ = group
    text = (tmp_path / "pool.yaml").read_text().replace("  - name: web\n", "  - name: web\n    dynamic_backends: true\n")
    first = service.apply(compiled_with(tmp_path, text), state, argv="test", lock_timeout=5)
    assert first.store == "written"
    v1 = state.current_version()
    # another node adds a backend through its API; this node has not followed yet
    stored = store.read()
    theirs = add(9105)(tablemod.load(stored.data))
    data = tablemod.dump(theirs)
    assert store.swap(stored.version, Stored(tablemod.version_of(data), data, stored.files))
    ahead = store.version()
    with pytest.raises(StalePlan, match="which this node has not installed yet"):
        service.rollback(state, None, argv="test", lock_timeout=5)
    # a file applied here keeps the group's API backend
    result = service.apply(compiled_with(tmp_path, text.replace("router_id: 42", "router_id: 42\n    preempt: true")),
                           state, argv="test", lock_timeout=5)
    assert result.store == "written" and 9105 in backends(state.current_table()[1])
    assert store.version() == state.current_version() != ahead
    # a rollback is written as any install
    back = service.rollback(state, v1, argv="test", lock_timeout=5)
    assert back.store == "written" and store.version() == v1 == state.current_version()


def test_the_follower_checks_the_store_under_the_lock_and_retries_passing_failures(group, tmp_path):
    state, store, _ = group
    live_version, live = state.current_table()
    theirs = compiled_with(tmp_path, (tmp_path / "pool.yaml").read_text().replace("port: 9101", "port: 9108"))
    newer = Stored(theirs.version, theirs.data, {})
    assert store.swap(live_version, newer)
    stale = Stored(live_version, tablemod.dump(live), {})
    with pytest.raises(StalePlan, match="no longer holds"):  # what the store held when the follower looked
        service.install_stored(state, store, stale, None, lock_timeout=5)
    now = [0.0]
    attempts = []

    def flaky(s, stored, expect):
        attempts.append(now[0])
        if len(attempts) == 1:
            raise service.ApplyFailed("a worker did not ack")
        return service.install_stored(state, s, stored, expect, lock_timeout=5)

    follower = follower_of(state, flaky, clock=lambda: now[0])
    assert follower.step(live_version, live).startswith("not yet")
    assert follower.step(live_version, live) is None  # pausing
    now[0] = 1.5
    assert follower.step(live_version, live) == f"installed {theirs.version[:12]}"
    assert attempts == [0.0, 1.5] and state.current_version() == theirs.version
