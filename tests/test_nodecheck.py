"""The node check's rules (lbc/nodecheck.py), on made-up readings."""

from __future__ import annotations

from lbc.nodecheck import APPLY_GRACE_S, CHECKER_STALE_S, WORKER_STALE_S, judge
from lbc.shm import WorkerInfo

NOW = 1_000_000.0
LIVE = "a" * 64
OLD = "b" * 64


def worker(slot: int, version: str = LIVE, pid: int | None = None, beat_age: float = 0.1,
           started: float = 1.0) -> WorkerInfo:
    return WorkerInfo(slot, 100 + slot if pid is None else pid, started, NOW - beat_age, 2, 0, version, version, "",
                      0, 0)


def verdict(workers, *, wanted: int = 2, alive=lambda pid: True, beat_age: float = 0.5, drained=None,
            installed_age: float = 3600.0) -> str:
    return judge(LIVE, wanted, workers, alive, NOW - beat_age, drained, NOW, NOW - installed_age).reason


def test_rules_in_order():
    ok = [worker(0), worker(1)]
    assert verdict(ok) == ""
    assert verdict(ok, drained=NOW - 5) == "drained by lbc drain-node"
    assert judge(None, 0, [], lambda pid: True, 0.0, None, NOW).reason == "no table is installed"
    assert verdict([worker(0)]) == f"1 of 2 workers do not serve {LIVE[:12]}"
    assert verdict([worker(0), worker(1, OLD)]) == f"1 of 2 workers do not serve {LIVE[:12]}"
    assert verdict(ok, alive=lambda pid: pid != 101) == f"1 of 2 workers do not serve {LIVE[:12]}"
    assert verdict([worker(0), worker(1, beat_age=WORKER_STALE_S + 1)]).startswith("1 of 2")  # wedged
    assert "health checker" in verdict(ok, beat_age=CHECKER_STALE_S + 1)
    assert judge(LIVE, 2, ok, lambda pid: True, 0.0, None, NOW).reason == ""  # checker not started yet


def test_an_apply_being_delivered_is_not_a_failure():
    during = APPLY_GRACE_S / 2
    # workers still on the old table, reloading
    assert verdict([worker(0, OLD), worker(1, OLD)], installed_age=during) == ""
    # a worker count going 1 -> 2: the new slot has not started yet
    assert verdict([worker(0, OLD), worker(1, "", pid=0, started=0.0)], installed_age=during) == ""
    # but a worker that stopped or wedged is missed, grace or not
    assert verdict([worker(0), worker(1, pid=0)], installed_age=during).startswith("1 of 2")
    assert verdict([worker(0), worker(1, beat_age=WORKER_STALE_S + 1)], installed_age=during).startswith("1 of 2")
    # after the grace, an old table is a failure
    assert verdict([worker(0, OLD), worker(1, OLD)], installed_age=APPLY_GRACE_S + 1).startswith("2 of 2")
