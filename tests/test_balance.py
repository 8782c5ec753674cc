"""The algorithms, pure: exact sequences for the deterministic ones, 5-sigma
distributions over 10,000+ picks for the random ones."""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass

import pytest
from lbc_workers import balance


@dataclass(eq=False)
class M:
    id: str
    weight: int = 1
    active: int = 0
    limit: int = 0
    swrr: int = 0


def seq(b: balance.Balancer, members, n, key=None):
    return "".join(b.pick(members, key).id for _ in range(n))


def test_round_robin_ignores_weights_and_skips_full():
    ms = [M("a", 5), M("b"), M("c")]
    assert seq(balance.make("round_robin"), ms, 7) == "abcabca"
    ms[1].limit, ms[1].active = 1, 1
    assert seq(balance.make("round_robin"), ms, 4) == "acac"


def test_smooth_weighted_round_robin_as_nginx():
    ms = [M("a", 5), M("b", 1), M("c", 1)]
    assert seq(balance.make("weighted_round_robin"), ms, 14) == "aabacaa" * 2


def test_least_connections_and_weighted():
    ms = [M("a", 1, active=3), M("b", 1, active=1), M("c", 1, active=1)]
    lc = balance.make("least_connections")
    picks = []
    for _ in range(4):
        m = lc.pick(ms)
        picks.append(m.id)
        m.active += 1
    assert picks == ["b", "c", "b", "c"]
    ms = [M("a", 3, active=5), M("b", 1, active=2)]  # 5/3 < 2/1
    assert balance.make("weighted_least_connections").pick(ms).id == "a"
    ms[0].active = 7  # 7/3 > 2/1
    assert balance.make("weighted_least_connections").pick(ms).id == "b"


def test_hashing_is_stable_and_falls_back_without_a_key():
    ms = [M(f"b{i}") for i in range(5)]
    for algorithm in ("ip_hash", "consistent_hash"):
        b1, b2 = balance.make(algorithm), balance.make(algorithm)
        keys = [f"10.0.0.{i}".encode() for i in range(200)]
        assert [b1.pick(ms, k).id for k in keys] == [b2.pick(list(ms), k).id for k in keys]
        assert len({b1.pick(ms, k).id for k in keys}) == 5
        assert seq(b1, ms, 5, key=None) == "b0b1b2b3b4"


def test_hash_pick_walks_past_a_full_member():
    ms = [M(f"b{i}") for i in range(3)]
    ch = balance.make("consistent_hash")
    first = ch.pick(ms, b"client")
    first.limit, first.active = 1, 1
    assert ch.pick(ms, b"client") is not first
    for m in ms:
        m.limit, m.active = 1, 1
    assert ch.pick(ms, b"client") is None


def _within_5_sigma(counts: Counter, expected: dict[str, float], n: int) -> None:
    for key, p in expected.items():
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(counts[key] - n * p) <= 5 * sigma, (key, counts[key], n * p)


@pytest.mark.parametrize("seed", [1, 2])
def test_random_is_weighted(seed):
    ms = [M("a", 3), M("b", 1), M("c", 1)]
    r = balance.make("random", random.Random(seed))
    n = 20000
    counts = Counter(r.pick(ms).id for _ in range(n))
    _within_5_sigma(counts, {"a": 0.6, "b": 0.2, "c": 0.2}, n)


def test_power_of_two_prefers_the_less_loaded():
    ms = [M("a", active=10), M("b", active=0), M("c", active=5)]
    p2c = balance.make("power_of_two", random.Random(7))
    n = 12000
    counts = Counter(p2c.pick(ms).id for _ in range(n))
    # pairs {a,b},{a,c},{b,c} equally likely: b wins 2 of 3, c 1 of 3, a never
    assert counts["a"] == 0
    _within_5_sigma(counts, {"b": 2 / 3, "c": 1 / 3}, n)
    even = [M("a"), M("b"), M("c")]
    counts = Counter(p2c.pick(even).id for _ in range(n))
    _within_5_sigma(counts, {"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, n)


def test_all_full_gives_none():
    for name in balance.ALGORITHMS:
        ms = [M("a", limit=1, active=1), M("b", limit=2, active=2)]
        assert balance.make(name, random.Random(1)).pick(ms, b"k") is None
