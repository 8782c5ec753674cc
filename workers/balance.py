"""Load-balancing algorithms. Pure: no sockets, no clock; randomness comes from
an injected random.Random so tests can seed it.

A Balancer picks one member from the eligible members of a pool (enabled and
healthy: the caller filters those). A member is any object with the fields of
`Member` below; the worker's backend runtime objects are members, and they
carry per-backend algorithm state (the smooth weighted round robin counter),
so that state survives a table swap along with the object.

A member whose `limit` is reached (max_connections, divided among workers)
is skipped; when every member is full, pick() returns None and the caller
waits for a slot or answers 503.

Rules, per algorithm:
- round_robin: members in order, one after the other; weights ignored.
- weighted_round_robin: NGINX's smooth weighted round robin: each pick adds
  every member's weight to its counter, takes the highest counter and
  subtracts the total from it. Weights 5,1,1 give a a b a c a a: spread, never
  a burst of five a's.
- least_connections: fewest active requests; ties go to the next member after
  the last pick.
- weighted_least_connections: lowest active/weight; ties go round robin.
- ip_hash: map-based hash of the key (the client address) over the members
  repeated by weight (lbc.hashing.weighted_list).
- consistent_hash: weighted Maglev table over the members
  (lbc.hashing.maglev_table); a request without its key (no such header or
  cookie) goes round robin.
- random: weighted random choice.
- power_of_two: two distinct random members, the less loaded wins.
Hash-based picks that land on a full member walk on through the lookup table.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate
from typing import Protocol

from lbc.hashing import hash64, lookup_table


class Member(Protocol):
    id: str
    weight: int
    active: int  # requests or connections in flight through this worker
    limit: int  # most concurrent in this worker; 0: unlimited
    swrr: int  # smooth weighted round robin counter


def is_full(m: Member) -> bool:
    return bool(m.limit) and m.active >= m.limit


class Balancer:
    """Base: round robin. Subclasses override pick()."""

    hashing = False

    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()
        self.next = 0

    def pick(self, members: Sequence[Member], key: bytes | None = None) -> Member | None:
        n = len(members)
        i = self.next
        for _ in range(n):
            m = members[i % n]
            i += 1
            if not m.limit or m.active < m.limit:  # is_full, inline: this runs per request
                self.next = i
                return m
        self.next = i
        return None


class RoundRobin(Balancer):
    pass


class WeightedRoundRobin(Balancer):
    def pick(self, members: Sequence[Member], key: bytes | None = None) -> Member | None:
        total = 0
        best = None
        for m in members:
            if is_full(m):
                continue
            m.swrr += m.weight
            total += m.weight
            if best is None or m.swrr > best.swrr:
                best = m
        if best is not None:
            best.swrr -= total
        return best


class LeastConnections(Balancer):
    weighted = False

    def pick(self, members: Sequence[Member], key: bytes | None = None) -> Member | None:
        # Scan from just after the last pick so that ties rotate.
        n = len(members)
        best, at = None, 0
        for i in range(self.next, self.next + n):
            m = members[i % n]
            if is_full(m):
                continue
            if (
                best is None
                or (self.weighted and m.active * best.weight < best.active * m.weight)
                or (not self.weighted and m.active < best.active)
            ):
                best, at = m, i
        self.next = (at + 1) % n if n else 0
        return best


class WeightedLeastConnections(LeastConnections):
    weighted = True


class _Hashed(Balancer):
    """Looks keys up in a table built for the current member set; rebuilt
    only when that set changes (health changes, table swaps)."""

    hashing = True
    algorithm = ""

    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__(rng)
        self._for: tuple[tuple[str, int], ...] = ()
        self._table: tuple[int, ...] = ()

    def pick(self, members: Sequence[Member], key: bytes | None = None) -> Member | None:
        if key is None or not members:
            return super().pick(members)
        shape = tuple((m.id, m.weight) for m in members)
        if shape != self._for:
            self._table = lookup_table(self.algorithm, [m.id for m in members], [m.weight for m in members])
            self._for = shape
        table = self._table
        size = len(table)
        start = hash64(key) % size
        for step in range(size):
            m = members[table[(start + step) % size]]
            if not is_full(m):
                return m
        return None


class IpHash(_Hashed):
    algorithm = "ip_hash"


class ConsistentHash(_Hashed):
    algorithm = "consistent_hash"


class Random(Balancer):
    def pick(self, members: Sequence[Member], key: bytes | None = None) -> Member | None:
        free = [m for m in members if not is_full(m)]
        if not free:
            return None
        cum = list(accumulate(m.weight for m in free))
        return free[bisect_right(cum, self.rng.random() * cum[-1])]


class PowerOfTwo(Balancer):
    def pick(self, members: Sequence[Member], key: bytes | None = None) -> Member | None:
        free = [m for m in members if not is_full(m)]
        if len(free) < 2:
            return free[0] if free else None
        a, b = self.rng.sample(free, 2)
        return b if b.active < a.active else a


ALGORITHMS: dict[str, type[Balancer]] = {
    "round_robin": RoundRobin,
    "weighted_round_robin": WeightedRoundRobin,
    "least_connections": LeastConnections,
    "weighted_least_connections": WeightedLeastConnections,
    "ip_hash": IpHash,
    "consistent_hash": ConsistentHash,
    "random": Random,
    "power_of_two": PowerOfTwo,
}


def make(algorithm: str, rng: random.Random | None = None) -> Balancer:
    return ALGORITHMS[algorithm](rng)
