"""Imperative changes (the admin API) as pure table edits: a table in, a
table out, or a Rejected error. No I/O, no clock: the caller passes the time.
lbc/service.py installs the result through the same path as `lbc apply`.

Rules:
- add_backend: the pool is named, or is the only one; the address is an IP
  address or a host name; address:port is not in the pool yet (Conflict).
  The id is derived from pool, address and port (`api-` and 10 hex digits
  of their sha256), so every node given the same change names it alike.
  The backend is marked `origin: api`, with its creation time.
- remove_backend: by id, in any pool (NotFound otherwise); not the last
  enabled backend of a pool without dynamic_backends (Conflict), as
  validation refuses such a file. Removing a backend the file lists is
  drift, like any API change to a file's pool.
- set_algorithm: the pool's algorithm and stickiness. Hashing algorithms
  keep the pool's hash_key, else key on the client address; stickiness is a
  signed cookie (keeping the pool's cookie name and secret) on pools only
  http/https listeners use, else the client address (source_ip); its ttl is
  1 s to 30 days. The pool records which settings the API changed
  (`set_by_api`), so `lbc plan FILE` can call them drift.
- keep_dynamic: applying a file keeps the API's backends of every pool the
  file marks `dynamic_backends: true` (the file wins on everything else).
"""

from __future__ import annotations

import dataclasses
import hashlib

from lbc.config.addresses import address_kind
from lbc.errors import Conflict, NotFound, Rejected
from lbc.table import ALGORITHMS, HASHING, Backend, Pool, RoutingTable, Sticky

MIN_TTL_S, MAX_TTL_S = 1, 30 * 86400
L7 = frozenset({"http", "https"})


def _pool(table: RoutingTable, name: str | None) -> Pool:
    if name is None:
        if len(table.pools) != 1:
            raise Rejected(f"there are {len(table.pools)} pools: name one with `pool` "
                           f"({', '.join(p.name for p in table.pools)})")
        return table.pools[0]
    for p in table.pools:
        if p.name == name:
            return p
    raise Rejected(f"unknown pool {name!r}; pools: {', '.join(p.name for p in table.pools)}")


def _replace_pool(table: RoutingTable, pool: Pool) -> RoutingTable:
    return dataclasses.replace(table, pools=tuple(pool if p.name == pool.name else p for p in table.pools))


def backend_id(pool: str, address: str, port: int) -> str:
    return "api-" + hashlib.sha256(f"{pool}|{address}|{port}".encode()).hexdigest()[:10]


def add_backend(table: RoutingTable, *, address: str, port: int, weight: int = 1,
                health_check_path: str | None = None, pool: str | None = None,
                now: str) -> tuple[RoutingTable, Pool, Backend]:
    target = _pool(table, pool)
    kind = address_kind(address)
    if kind is None:
        raise Rejected(f"{address!r} is not an IPv4 address, an IPv6 address or a host name")
    if not 1 <= port <= 65535:
        raise Rejected(f"port {port} is out of range (1 to 65535)")
    if not 1 <= weight <= 256:
        raise Rejected(f"weight {weight} is out of range (1 to 256)")
    address = address.lower()  # as the compiler writes addresses: a name is one name whatever its case
    for b in target.backends:
        if (b.address.lower(), b.port) == (address, port):
            raise Conflict(f"{address}:{port} is already in pool {target.name} as backend {b.id}")
    ident = backend_id(target.name, address, port)
    if any(b.id == ident for p in table.pools for b in p.backends):
        raise Conflict(f"backend id {ident} is taken")
    backend = Backend(id=ident, address=address, port=port, weight=weight, max_connections=0, enabled=True,
                      health_check_path=health_check_path, origin="api", created_at=now)
    new_pool = dataclasses.replace(target, backends=(*target.backends, backend))
    return _replace_pool(table, new_pool), new_pool, backend


def find_backend(table: RoutingTable, ident: str) -> tuple[Pool, Backend]:
    for p in table.pools:
        for b in p.backends:
            if b.id == ident:
                return p, b
    raise NotFound(f"no backend {ident!r}")


def remove_backend(table: RoutingTable, ident: str) -> tuple[RoutingTable, Pool, Backend]:
    pool, backend = find_backend(table, ident)
    left = tuple(b for b in pool.backends if b.id != ident)
    if not pool.dynamic_backends and not any(b.enabled for b in left):
        # as validation refuses a file whose pool has no enabled backend
        raise Conflict(f"{ident} is the last enabled backend of pool {pool.name}; a pool needs one "
                       "(unless it has dynamic_backends: true)")
    new_pool = dataclasses.replace(pool, backends=left)
    return _replace_pool(table, new_pool), new_pool, backend


def protocols_of(table: RoutingTable, pool: str) -> frozenset[str]:
    return frozenset(x.protocol for x in table.listeners if pool in x.pools_used())


def set_algorithm(table: RoutingTable, *, algorithm: str, sticky_sessions: bool = False,
                  sticky_ttl_seconds: int = 3600, pool: str | None = None) -> tuple[RoutingTable, Pool]:
    target = _pool(table, pool)
    if algorithm not in ALGORITHMS:
        raise Rejected(f"unknown algorithm {algorithm!r}; one of: {', '.join(sorted(ALGORITHMS))}")
    if not MIN_TTL_S <= sticky_ttl_seconds <= MAX_TTL_S:
        raise Rejected(f"sticky_ttl_seconds must be between {MIN_TTL_S} and {MAX_TTL_S} (30 days)")
    sticky = None
    if sticky_sessions:
        protocols = protocols_of(table, target.name)
        cookie = bool(protocols) and protocols <= L7
        old = target.sticky
        keep = old is not None and old.mode == "cookie" and cookie
        sticky = Sticky(mode="cookie" if cookie else "source_ip",
                        cookie_name=(old.cookie_name if keep else "SERVERID") if cookie else None,
                        header=None, ttl_ms=sticky_ttl_seconds * 1000,
                        secret_sha256=old.secret_sha256 if old and cookie and old.mode == "cookie" else None,
                        store=old.store if old else "none")
    hash_key = None
    if algorithm in HASHING:
        hash_key = target.hash_key if target.hash_key is not None else "source_ip"
    changed = {"algorithm"} if (algorithm, hash_key) != (target.algorithm, target.hash_key) else set()
    if sticky != target.sticky:
        changed.add("sticky")
    new_pool = dataclasses.replace(target, algorithm=algorithm, hash_key=hash_key, sticky=sticky,
                                   set_by_api=tuple(sorted({*target.set_by_api, *changed})))
    return _replace_pool(table, new_pool), new_pool


def keep_dynamic(new: RoutingTable, live: RoutingTable | None) -> RoutingTable:
    """`new` (from a file) with the live API backends of its dynamic pools."""
    if live is None or not any(p.dynamic_backends for p in new.pools):
        return new
    live_pools = {p.name: p for p in live.pools}
    taken = {b.id for p in new.pools for b in p.backends}
    pools = []
    for p in new.pools:
        old = live_pools.get(p.name)
        if p.dynamic_backends and old is not None:
            listed = {(b.address, b.port) for b in p.backends}
            extra = tuple(b for b in old.backends if b.origin == "api" and b.id not in taken
                          and (b.address, b.port) not in listed)
            if extra:
                p = dataclasses.replace(p, backends=(*p.backends, *extra))
        pools.append(p)
    return dataclasses.replace(new, pools=tuple(pools))
