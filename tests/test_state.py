"""The state directory: apply, history, rollback, the lock, and crash safety
(a real SIGKILL at every named fault point, and at random moments)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import https_config, lbc

from lbc import service
from lbc.state import FAULT_POINTS, StateDir
from lbc.table import version_of

BASE = """\
version: 1
listeners:
  - name: web
    bind: 127.0.0.1:8080
    routes:
      - pool: web
pools:
  - name: web
    backends:
      - {{id: web-1, address: 127.0.0.1, port: 9101, weight: {weight}}}
      - {{id: web-2, address: 127.0.0.1, port: 9102}}
"""

def assert_consistent(root: Path) -> str | None:
    """What every crash must leave: `current` names a complete table whose
    secrets are present, and the history parses. Returns the live version."""
    st = StateDir(root)
    version = st.current_version()
    if version is None:
        assert not (root / "current").exists() or (root / "current").read_text().strip() == ""
    else:
        table = st.read_table(version)  # checks the bytes hash to the version
        for digest in table.digests():
            data = (st.secrets / digest).read_bytes()
            assert hashlib.sha256(data).hexdigest() == digest
    lines = st.history_file.read_text().splitlines() if st.history_file.exists() else []
    for line in lines[:-1]:
        json.loads(line)  # only the last line may be torn
    st.history()
    return version


def test_apply_installs_and_second_apply_changes_nothing(write, state):
    cfg = write("pool.yaml", BASE.format(weight=1))
    first = lbc("apply", str(cfg), "--state", str(state))
    assert first.returncode == 0, first.stderr
    assert "Installed table" in first.stdout and "no workers running" in first.stdout
    version = (state / "current").read_text().strip()
    assert (state / "tables" / f"{version}.json").is_file()
    assert version_of((state / "tables" / f"{version}.json").read_bytes()) == version
    [record] = StateDir(state).history()
    assert record.version == version and record.previous is None
    assert record.source == str(cfg.resolve()) and record.source_sha256 == hashlib.sha256(cfg.read_bytes()).hexdigest()
    assert record.command == "apply" and record.origin == "cli" and "@" in record.who

    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in state.rglob("*") if p.name != "lock"}
    again = lbc("apply", str(cfg), "--state", str(state))
    assert again.returncode == 0
    assert again.stdout.strip() == "No changes."
    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in state.rglob("*") if p.name != "lock"}
    assert after == before


def test_plan_right_after_apply_is_empty(write, state):
    cfg = write("pool.yaml", BASE.format(weight=2))
    assert lbc("apply", str(cfg), "--state", str(state)).returncode == 0
    plan = lbc("plan", str(cfg), "--state", str(state), "--detailed-exitcode")
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert plan.stdout.strip() == "No changes."


def test_invalid_config_changes_nothing(write, state):
    good = write("good.yaml", BASE.format(weight=1))
    assert lbc("apply", str(good), "--state", str(state)).returncode == 0
    live = (state / "current").read_text()
    bad = write("bad.yaml", BASE.format(weight=1).replace("port: 9102", "port: 99999"))
    result = lbc("apply", str(bad), "--state", str(state))
    assert result.returncode == 1
    assert "bad.yaml:11:" in result.stderr and "at most 65535" in result.stderr
    assert (state / "current").read_text() == live
    assert len(StateDir(state).history()) == 1


def test_history_show_and_rollback(write, state):
    v = []
    for weight in (1, 2, 3):
        cfg = write(f"w{weight}.yaml", BASE.format(weight=weight))
        assert lbc("apply", str(cfg), "--state", str(state)).returncode == 0
        v.append((state / "current").read_text().strip())
    hist = lbc("history", "--state", str(state))
    lines = hist.stdout.splitlines()
    assert [line[2:14] for line in lines] == [x[:12] for x in v]
    assert lines[-1].startswith("*") and not lines[0].startswith("*")

    back = lbc("rollback", "--state", str(state))
    assert back.returncode == 0, back.stderr
    assert "~ weight: 3 -> 2" in back.stdout
    assert (state / "current").read_text().strip() == v[1]
    assert StateDir(state).history()[-1].command == "rollback"
    # rolling back again undoes the rollback, as `cd -` does
    assert lbc("rollback", "--state", str(state)).returncode == 0
    assert (state / "current").read_text().strip() == v[2]

    to_first = lbc("rollback", v[0][:8], "--state", str(state))
    assert to_first.returncode == 0
    assert (state / "current").read_text().strip() == v[0]

    shown = lbc("show", v[1][:10], "--state", str(state))
    assert json.loads(shown.stdout)["pools"][0]["backends"][0]["weight"] == 2
    live = lbc("show", "--state", str(state))
    assert json.loads(live.stdout)["pools"][0]["backends"][0]["weight"] == 1

    unknown = lbc("show", "ffffffff", "--state", str(state))
    assert unknown.returncode == 1 and "no table version starts with 'ffffffff'" in unknown.stderr


def test_rollback_with_nothing_before(write, state):
    assert lbc("apply", str(write("a.yaml", BASE.format(weight=1))), "--state", str(state)).returncode == 0
    result = lbc("rollback", "--state", str(state))
    assert result.returncode == 1 and "no version before" in result.stderr
    empty = lbc("rollback", "--state", str(state / "nothing"))
    assert empty.returncode == 1 and "nothing is installed" in empty.stderr


def test_lock_timeout_names_the_holder(write, state):
    cfg = write("pool.yaml", BASE.format(weight=1))
    st = StateDir(state)
    with st.lock("lbc apply held-by-test", timeout=1):
        result = lbc("apply", str(cfg), "--state", str(state), "--lock-timeout", "0.3")
    assert result.returncode == 1
    assert f"locked by pid {os.getpid()} (lbc apply held-by-test, since " in result.stderr
    assert "--lock-timeout" in result.stderr
    assert st.current_version() is None


def test_waiting_apply_gets_the_lock_when_released(write, state):
    cfg = write("pool.yaml", BASE.format(weight=1))
    st = StateDir(state)
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with st.lock("holder", timeout=1):
            entered.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    entered.wait(5)
    proc = subprocess.Popen([sys.executable, "-m", "lbc", "apply", str(cfg), "--state", str(state), "--lock-timeout", "20"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.8)
        assert proc.poll() is None, "apply must wait for the lock"
        release.set()
        out, err = proc.communicate(timeout=30)
    finally:
        release.set()
        t.join()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert st.current_version() is not None


def test_concurrent_applies_are_serialized(write, state):
    configs = [write(f"c{i}.yaml", BASE.format(weight=i + 1)) for i in range(5)]
    procs = [subprocess.Popen([sys.executable, "-m", "lbc", "apply", str(c), "--state", str(state)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for c in configs]
    try:
        codes = [p.wait(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for p in procs:
            p.stdout.close()
            p.stderr.close()
    assert codes == [0] * 5
    records = StateDir(state).history()
    assert len(records) == 5
    # each install saw the one before it: none raced past another
    assert records[0].previous is None
    for earlier, later in zip(records, records[1:], strict=False):
        assert later.previous == earlier.version
    assert StateDir(state).current_version() == records[-1].version


def test_torn_history_line_is_tolerated_and_not_glued(write, state):
    assert lbc("apply", str(write("a.yaml", BASE.format(weight=1))), "--state", str(state)).returncode == 0
    with open(state / "history.jsonl", "a") as f:
        f.write('{"version": "abc", "prev')  # what a crash mid-write leaves
    assert len(StateDir(state).history()) == 1
    assert lbc("history", "--state", str(state)).returncode == 0
    assert lbc("apply", str(write("b.yaml", BASE.format(weight=2))), "--state", str(state)).returncode == 0
    records = StateDir(state).history()
    assert len(records) == 2 and records[-1].version == StateDir(state).current_version()


# -- crash safety -----------------------------------------------------------------


@pytest.fixture
def crash_setup(tmp_path, tls_files):
    """A state with v1 live, and v2 with another certificate and a new
    backend, so an install of v2 writes secrets, a table, slots, history and
    current."""
    v1 = tmp_path / "v1.yaml"
    v1.write_text(https_config(tls_files["www_cert"], tls_files["www_key"]))
    v2 = tmp_path / "v2.yaml"
    v2.write_text(https_config(tls_files["api_cert"], tls_files["api_key"], weight=2,
                               extra_backends="      - {id: web-2, address: 127.0.0.1, port: 9102}\n"))
    template = tmp_path / "template"
    assert lbc("apply", str(v1), "--state", str(template)).returncode == 0
    return template, v1, v2


def test_fault_points_cover_every_write_step():
    assert len(FAULT_POINTS) == 18
    assert {p.split(".")[0] for p in FAULT_POINTS} == {"secret", "table", "slots", "history", "current"}


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_crash_at_each_fault_point(crash_setup, tmp_path, point):
    template, v1, v2 = crash_setup
    state = tmp_path / "state"
    shutil.copytree(template, state)
    v1_version = StateDir(state).current_version()
    result = lbc("apply", str(v2), "--state", str(state), env={"LBC_FAULT": point})
    assert result.returncode == -signal.SIGKILL, (point, result.stdout, result.stderr)
    live = assert_consistent(state)
    v2_version = service.compile_file(v2).version
    flipped = point in ("current.rename", "current.dirsync")
    assert live == (v2_version if flipped else v1_version), point
    # the next apply, without a fault, completes and leaves no temp files behind
    again = lbc("apply", str(v2), "--state", str(state))
    assert again.returncode == 0, again.stderr
    assert assert_consistent(state) == v2_version
    assert not [p for p in state.rglob(".*.tmp.*")]


def test_crash_at_random_moments(crash_setup, tmp_path):
    """SIGKILL an apply after a random delay, 200 times. The apply runs in a
    forked child (already imported and compiled) so the kills land inside the
    install rather than in interpreter start-up."""
    template, _, v2 = crash_setup
    compiled = service.compile_file(v2)
    # how long one install takes here, to spread the kills across it
    durations = []
    for i in range(5):
        probe = tmp_path / f"probe{i}"
        shutil.copytree(template, probe)
        start = time.perf_counter()
        service.apply(compiled, StateDir(probe), argv="probe", lock_timeout=5)
        durations.append(time.perf_counter() - start)
    duration = sorted(durations)[2]

    rng = random.Random(20261129)
    outcomes = {"old": 0, "new": 0, "finished": 0}
    for i in range(200):
        state = tmp_path / f"s{i}"
        shutil.copytree(template, state)
        old = StateDir(state).current_version()
        ready_r, ready_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            try:
                os.write(ready_w, b"x")  # the clock starts here, not at fork
                service.apply(compiled, StateDir(state), argv="crash-test", lock_timeout=5)
            finally:
                os._exit(0)
        os.read(ready_r, 1)
        os.close(ready_r)
        os.close(ready_w)
        time.sleep(rng.uniform(0, duration * 1.5))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status):
            outcomes["finished"] += 1
        live = assert_consistent(state)
        assert live in (old, compiled.version)
        outcomes["old" if live == old else "new"] += 1
        shutil.rmtree(state)
    # the kills must actually have landed on both sides of the flip
    assert outcomes["old"] > 0 and outcomes["new"] > 0, outcomes
