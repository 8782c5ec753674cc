"""The per-backend health state machine, and which backends get traffic. Pure.

Rules:
- A backend starts `unknown` and is probed at once.
- unknown -> healthy: its first passing probe.
- unknown -> unhealthy: `unhealthy_threshold` consecutive failures.
- healthy -> unhealthy: `unhealthy_threshold` consecutive failures.
- unhealthy -> healthy: `healthy_threshold` consecutive successes.
- Any other probe only moves the counters: a pass resets the failure count and
  a failure the success count, so a backend that alternates pass and fail
  never changes state (with thresholds above 1).

Which members of a pool get traffic (`eligible`):
- a pool without a health check: every enabled backend (as in HAProxy);
- otherwise the healthy ones; when none is healthy, the unknown ones (a pool
  that was just added, or whose checker has not reported yet, still serves);
- panic mode (Envoy's): when fewer than `panic_threshold` percent of the
  enabled backends are healthy, all enabled backends, whatever their state;
- when the checker's heartbeat is stale (older than three intervals), its
  verdicts are not trusted and every enabled backend counts as up; passive
  health (outlier ejection in the workers) still applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

UNKNOWN, HEALTHY, UNHEALTHY = 0, 1, 2
NAMES = {UNKNOWN: "unknown", HEALTHY: "healthy", UNHEALTHY: "unhealthy"}


@dataclass(frozen=True, slots=True)
class Thresholds:
    healthy: int
    unhealthy: int

    def __post_init__(self) -> None:
        if self.healthy < 1 or self.unhealthy < 1:
            raise ValueError("thresholds are at least 1")


@dataclass(frozen=True, slots=True)
class Health:
    state: int = UNKNOWN
    successes: int = 0  # consecutive
    failures: int = 0  # consecutive

    def __post_init__(self) -> None:
        if self.state not in NAMES:
            raise ValueError(f"bad state {self.state}")
        if self.successes and self.failures:
            raise ValueError("a run of successes and a run of failures cannot both be current")


def observe(h: Health, passed: bool, t: Thresholds) -> Health:
    """The state after one probe."""
    if passed:
        successes = h.successes + 1
        if h.state == UNKNOWN or (h.state == UNHEALTHY and successes >= t.healthy):
            return Health(HEALTHY, successes, 0)
        return Health(h.state, successes, 0)
    failures = h.failures + 1
    if h.state != UNHEALTHY and failures >= t.unhealthy:
        return Health(UNHEALTHY, 0, failures)
    return Health(h.state, 0, failures)


M = TypeVar("M")


def eligible(members: Sequence[M], states: Sequence[int], *, checked: bool, trusted: bool,
             panic_threshold: int = 0) -> tuple[M, ...]:
    """The members that get traffic, given each member's state (same order).
    `checked`: the pool has a health check; `trusted`: the checker's heartbeat
    is fresh."""
    if not checked or not trusted:
        return tuple(members)
    healthy = tuple(m for m, s in zip(members, states, strict=True) if s == HEALTHY)
    if panic_threshold and members and len(healthy) * 100 < panic_threshold * len(members):
        return tuple(members)
    if healthy:
        return healthy
    return tuple(m for m, s in zip(members, states, strict=True) if s == UNKNOWN)
