"""The named hash and the hash-based backend maps. Pure.

Every worker and every node must send a key to the same backend, so nothing
here uses Python's per-process `hash()`: keys go through blake2b with a fixed
key, truncated to 64 bits (the table names it, lbc.table.HASH_NAME). The plan
uses these same functions to measure how many keys a change moves, so what
`lbc plan` reports is what the workers will do.

- ip_hash: the key's hash modulo the weighted backend list (each backend
  repeated `weight` times), as HAProxy's map-based hashing: cheap, but most
  keys move when the list changes.
- consistent_hash: a weighted Maglev lookup table (Eisenbud et al., NSDI '16):
  removing one of N backends moves about 1/N of the keys.
- sticky affinity (source_ip, header): a weighted hash ring (Karger et al.,
  as ketama): each backend owns RING_POINTS points per unit of weight, a key
  goes to the owner of the first point at or after its hash. Removing a
  backend moves exactly the keys it had, adding one moves only keys to it:
  a session stays where it is unless its own backend goes. (Maglev evens the
  spread better but also moves a few percent of other keys.)
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Iterable, Sequence

_KEY = b"lbc-hash-v1"
# Maglev table sizes: primes; the table is the smallest of these at least
# 100 entries per backend (the paper's bound for near-even spread).
_PRIMES = (251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131071)


def hash64(data: bytes, salt: bytes = b"") -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, key=_KEY, salt=salt).digest(), "big")


def weighted_list(weights: Sequence[int]) -> tuple[int, ...]:
    """Backend indexes, each repeated by its weight, for map-based hashing."""
    return tuple(i for i, w in enumerate(weights) for _ in range(w))


def maglev_size(backend_count: int) -> int:
    i = bisect_left(_PRIMES, 100 * backend_count)
    return _PRIMES[min(i, len(_PRIMES) - 1)]


def maglev_table(ids: Sequence[str], weights: Sequence[int]) -> tuple[int, ...]:
    """Lookup table of backend indexes. Each backend walks its own permutation
    of the slots (offset and skip from its id's hash) and takes the next free
    slot in turn; a backend of weight w takes a turn in w of every max-weight
    rounds, so slots are shared in proportion to weight."""
    n = len(ids)
    if n == 0:
        return ()
    size = maglev_size(n)
    offsets = [hash64(i.encode(), b"offset") % size for i in ids]
    skips = [hash64(i.encode(), b"skip") % (size - 1) + 1 for i in ids]
    top = max(weights)
    nexts = [0] * n
    table = [-1] * size
    filled = 0
    turn = 0
    while True:
        for b in range(n):
            # Does backend b take a slot this round? (integer share of its weight)
            if (turn + 1) * weights[b] // top == turn * weights[b] // top:
                continue
            slot = (offsets[b] + nexts[b] * skips[b]) % size
            while table[slot] >= 0:
                nexts[b] += 1
                slot = (offsets[b] + nexts[b] * skips[b]) % size
            table[slot] = b
            nexts[b] += 1
            filled += 1
            if filled == size:
                return tuple(table)
        turn += 1


def lookup_table(algorithm: str, ids: Sequence[str], weights: Sequence[int]) -> tuple[int, ...]:
    """The table a hashing algorithm looks keys up in; empty without backends."""
    if not ids:
        return ()
    if algorithm == "ip_hash":
        return weighted_list(weights)
    if algorithm == "consistent_hash":
        return maglev_table(ids, weights)
    raise ValueError(f"{algorithm} is not a hashing algorithm")


def pick_index(table: Sequence[int], key: bytes) -> int:
    """The backend index a key maps to, for either kind of table."""
    return table[hash64(key) % len(table)]


def pick_indexes(table: Sequence[int], key_hashes: Iterable[int]) -> list[int]:
    """pick_index of many keys already hashed with hash64: the planner hashes
    its key sample once and looks it up in many tables."""
    size = len(table)
    return [table[h % size] for h in key_hashes]


RING_POINTS = 100  # per unit of weight: about +-10% spread between equal backends


def ring(ids: Sequence[str], weights: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A weighted hash ring: sorted point hashes and, for each, the index of
    the backend that owns it."""
    points = sorted(
        (hash64(b"%s#%d" % (ident.encode(), n), b"ring"), i)
        for i, (ident, weight) in enumerate(zip(ids, weights, strict=True))
        for n in range(RING_POINTS * weight)
    )
    return tuple(h for h, _ in points), tuple(i for _, i in points)


def ring_start(hashes: Sequence[int], key: bytes) -> int:
    """The position of the first ring point at or after the key's hash;
    callers walk on from there (modulo the ring size) past full backends."""
    if not hashes:
        return 0
    return bisect_left(hashes, hash64(key)) % len(hashes)
