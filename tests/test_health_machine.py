"""The health state machine and eligibility, pure."""

from __future__ import annotations

import pytest
from lbc_workers.health.machine import HEALTHY, UNHEALTHY, UNKNOWN, Health, Thresholds, eligible, observe

T = Thresholds(healthy=2, unhealthy=3)


FRESH = Health()


def run(results: str, start: Health = FRESH, t: Thresholds = T) -> list[int]:
    h, states = start, []
    for r in results:
        h = observe(h, r == "+", t)
        states.append(h.state)
    return states


def test_first_pass_makes_an_unknown_backend_healthy():
    assert run("+") == [HEALTHY]
    assert run("-+") == [UNKNOWN, HEALTHY]


def test_unknown_goes_unhealthy_after_the_threshold():
    assert run("---") == [UNKNOWN, UNKNOWN, UNHEALTHY]


def test_healthy_needs_consecutive_failures_and_unhealthy_consecutive_successes():
    assert run("+--+---")[-1] == UNHEALTHY
    assert run("+--+---")[:6] == [HEALTHY] * 6
    down = Health(UNHEALTHY, 0, 3)
    assert run("+-++", start=down) == [UNHEALTHY, UNHEALTHY, UNHEALTHY, HEALTHY]


@pytest.mark.parametrize("start", [Health(HEALTHY, 5, 0), Health(UNHEALTHY, 0, 5)])
def test_a_flapping_backend_never_changes_state(start):
    states = run("+-" * 50, start=start)
    assert set(states) == {start.state}


def test_counters_reset_on_the_other_outcome():
    h = observe(observe(Health(HEALTHY, 3, 0), False, T), False, T)
    assert (h.successes, h.failures) == (0, 2)
    with pytest.raises(ValueError):
        Health(HEALTHY, 1, 1)


def test_eligible():
    ms = ["a", "b", "c", "d"]
    assert eligible(ms, [HEALTHY, UNHEALTHY, UNKNOWN, HEALTHY], checked=True, trusted=True) == ("a", "d")
    # no healthy: the unknown ones
    assert eligible(ms, [UNHEALTHY, UNKNOWN, UNKNOWN, UNHEALTHY], checked=True, trusted=True) == ("b", "c")
    assert eligible(ms, [UNHEALTHY] * 4, checked=True, trusted=True) == ()
    # no check, or a stale checker: everyone
    assert eligible(ms, [UNHEALTHY] * 4, checked=False, trusted=True) == tuple(ms)
    assert eligible(ms, [UNHEALTHY] * 4, checked=True, trusted=False) == tuple(ms)
    # panic: 1 of 4 healthy is below 50%: route across all
    assert eligible(ms, [HEALTHY, UNHEALTHY, UNHEALTHY, UNHEALTHY], checked=True, trusted=True,
                    panic_threshold=50) == tuple(ms)
    assert eligible(ms, [HEALTHY, HEALTHY, UNHEALTHY, UNHEALTHY], checked=True, trusted=True,
                    panic_threshold=50) == ("a", "b")
