"""The sticky store adapter: Redis, shared by every worker and node.

    lbc:sticky:<pool>:<key> -> backend id, EX ttl, refreshed on use

One client per Redis URL per worker (a small connection pool). Every call is
bounded by TIMEOUT_S and never retried: stickiness is a preference, and a
request must not wait on a slow or dead Redis. After a failure the store is
left alone for RETRY_AFTER_S, so while Redis is down requests cost nothing
extra and fall back to the hash ring (workers/sticky.py), which every node
computes alike; the failures are counted and logged once per outage.

Each worker keeps what Redis answered for CACHE_S: a busy key costs one
GETEX (which also restarts its ttl) per worker per CACHE_S instead of one
per request, and the request does not wait at all on a hit. A mapping
another node changes (only when its backend stopped taking traffic) is
seen here within CACHE_S.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

if TYPE_CHECKING:
    from lbc_workers.proxy.router import BackendRuntime, PoolRuntime
    from lbc_workers.sticky import Affinity

log = logging.getLogger("lbc.worker")
TIMEOUT_S = 0.1
RETRY_AFTER_S = 1.0
CACHE_S = 1.0
CACHE_MAX = 100_000  # keys remembered per worker; dropped whole when full


class RedisStore:
    def __init__(self, url: str) -> None:
        self.url = url
        # A blocking pool: a burst beyond its size waits (within the timeout) for a connection
        # instead of failing at once.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S, retry=Retry(NoBackoff(), 0),
            max_connections=32, timeout=TIMEOUT_S, health_check_interval=0)
        self.client = aioredis.Redis(connection_pool=pool)
        self.cache: dict[bytes, tuple[str, float]] = {}
        self.down_until = 0.0
        self.failed_at = 0.0
        self.errors = 0  # failed calls (published as lbc_sticky_store_errors_total)
        self._writes: set[asyncio.Task] = set()

    def available(self) -> bool:
        return not (self.down_until and time.monotonic() < self.down_until)

    def cached(self, key: bytes) -> str | None:
        hit = self.cache.get(key)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        return None

    def _keep(self, key: bytes, backend_id: str) -> None:
        if len(self.cache) >= CACHE_MAX:
            self.cache.clear()
        self.cache[key] = (backend_id, time.monotonic() + CACHE_S)

    async def lookup(self, key: bytes, ttl_s: int) -> str | None:
        """The backend id remembered for `key` (its ttl restarted), None when
        there is none; raises StoreDown when Redis did not answer in time."""
        started = time.monotonic()
        try:
            value = await self.client.getex(key, ex=ttl_s)
        except (RedisError, OSError) as e:
            self._failed(e)
            raise StoreDown from e
        if self.down_until and started > self.failed_at:  # not an answer to a call sent before the failure
            log.warning("sticky store %s answers again", self.url)
            self.down_until = 0.0
        if value is None:
            return None
        backend_id = value.decode(errors="replace")
        self._keep(key, backend_id)
        return backend_id

    def remember(self, key: bytes, backend_id: str, ttl_s: int) -> None:
        """Record a mapping in the background: the request does not wait."""
        self._keep(key, backend_id)
        task = asyncio.get_running_loop().create_task(self._set(key, backend_id, ttl_s))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _set(self, key: bytes, backend_id: str, ttl_s: int) -> None:
        try:
            await self.client.set(key, backend_id, ex=ttl_s)
        except (RedisError, OSError) as e:
            self._failed(e)

    def _failed(self, e: BaseException) -> None:
        self.errors += 1
        self.failed_at = time.monotonic()
        if not self.down_until:
            log.warning("sticky store %s: %s; using the hash ring until it answers", self.url, e or type(e).__name__)
        self.down_until = time.monotonic() + RETRY_AFTER_S

    async def close(self) -> None:
        await self.client.aclose()


class StoreDown(Exception):
    """Redis failed or timed out: fall back to hashing."""


def remembered_here(store: RedisStore, affinity: Affinity, pool: PoolRuntime, key: bytes) -> BackendRuntime | None:
    """The backend this worker saw remembered for `key` within CACHE_S, if it
    takes traffic and has room; None: ask Redis (pick_remembered)."""
    backend_id = store.cached(affinity.store_key(key))
    return affinity.usable(pool.members, backend_id) if backend_id is not None else None


async def pick_remembered(store: RedisStore, affinity: Affinity, pool: PoolRuntime, key: bytes) -> BackendRuntime | None:
    """The backend for `key`: the remembered one while it takes traffic, else
    the ring's pick, remembered from now on (not while Redis is down, nor
    when the remembered one is only full for the moment)."""
    skey = affinity.store_key(key)
    try:
        remembered = await store.lookup(skey, affinity.ttl_s)
    except StoreDown:
        return affinity.hashed(pool.members, key)
    if remembered is not None:
        backend = affinity.member(pool.members, remembered)
        if backend is not None:
            return backend if not backend.limit or backend.active < backend.limit else affinity.hashed(pool.members, key)
    backend = affinity.hashed(pool.members, key)
    if backend is not None:
        store.remember(skey, backend.id, affinity.ttl_s)
    return backend
