"""The table the nodes of a global.ha group share through Redis
(global.ha.store), and the follower that keeps a node on it.

Three keys per group (its router_id), always written together in one
MULTI: `lbc:ha:<id>:version` (what followers poll), `...:table` (the
canonical JSON) and `...:files` (digest -> the path each certificate, key or
secret was read from, so a follower reads its own copy there).

The rules:

1. An admin API change is made on the stored table (when there is one) and
   written with a compare-and-set on the version it was made from (WATCH,
   then MULTI): of two changes made at once on two nodes, one is made again
   on the other's result, and neither is lost. The store is written before
   the node installs it; if the node then cannot serve it, the store is put
   back, again by compare-and-set.
2. Every other table a node installs (apply, a push, a rollback) is written
   as is, once its workers serve it: the last one written wins, as when a
   file is applied on each node by hand.
3. Each node's admin API process follows: when the stored version is not
   the live one, it installs the stored table (never writing back), unless
   that version already failed here; a node that was down catches up when
   it comes back.

Redis being unreachable never stops a node from serving or from applying
locally: writes report it, the follower retries.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass

import redis
from redis.exceptions import RedisError, WatchError

from lbc.errors import LbcError, StalePlan
from lbc.table import RoutingTable

log = logging.getLogger("lbc.hastore")
POLL_S = 0.5
TIMEOUT_S = 2.0


class StoreUnavailable(LbcError):
    """Redis could not be reached or answered with an error."""


@dataclass(frozen=True, slots=True)
class Stored:
    version: str
    data: bytes
    files: dict[str, str]


class SharedTable:
    def __init__(self, url: str, group: int) -> None:
        self.url, self.group = url, group
        self.prefix = f"lbc:ha:{group}:"
        self.client = redis.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)

    @classmethod
    def of(cls, table: RoutingTable | None) -> SharedTable | None:
        ha = table.settings.ha if table is not None else None
        return cls(ha.store, ha.router_id) if ha is not None and ha.store else None

    def version(self) -> str | None:
        try:
            raw = self.client.get(self.prefix + "version")
        except RedisError as e:
            raise self._unavailable(e) from None
        return raw.decode() if raw else None

    def read(self) -> Stored | None:
        try:
            version, data, files = self.client.mget(self.prefix + k for k in ("version", "table", "files"))
        except RedisError as e:
            raise self._unavailable(e) from None
        if not version or data is None:
            return None
        return Stored(version.decode(), data, json.loads(files) if files else {})

    def swap(self, expect: str | None, new: Stored) -> bool:
        """Write `new` if the stored version is still `expect` (None: nothing
        stored); False when another writer came first."""
        key = self.prefix + "version"
        try:
            with self.client.pipeline() as pipe:
                pipe.watch(key)
                current = pipe.get(key)
                if (current.decode() if current else None) != expect:
                    return False
                pipe.multi()
                self._set(pipe, new)
                pipe.execute()
                return True
        except WatchError:
            return False
        except RedisError as e:
            raise self._unavailable(e) from None

    def publish(self, new: Stored) -> None:
        """Write `new` whatever is stored (rule 2)."""
        try:
            with self.client.pipeline(transaction=True) as pipe:
                self._set(pipe, new)
                pipe.execute()
        except RedisError as e:
            raise self._unavailable(e) from None

    def _set(self, pipe: redis.client.Pipeline, new: Stored) -> None:
        pipe.set(self.prefix + "table", new.data)
        pipe.set(self.prefix + "files", json.dumps(new.files, sort_keys=True))
        pipe.set(self.prefix + "version", new.version)

    def _unavailable(self, e: RedisError) -> StoreUnavailable:
        return StoreUnavailable(f"the ha store {self.url} did not answer: {e}")

    def close(self) -> None:
        self.client.close()


class Follower:
    """Rule 3, in the admin API process: `step` looks once, `run` loops."""

    def __init__(self, install) -> None:  # install(stored, expect) -> None, raising LbcError
        self.install = install
        self.failed: str | None = None  # a stored version that could not be installed here
        self.store: SharedTable | None = None

    def step(self, live_version: str | None, live: RoutingTable | None) -> str | None:
        """Install the stored table if it is not the live one; what was done."""
        ha = live.settings.ha if live is not None else None
        if ha is None or not ha.store:
            return None
        if self.store is None or (self.store.url, self.store.group) != (ha.store, ha.router_id):
            if self.store is not None:
                self.store.close()
            self.store = SharedTable(ha.store, ha.router_id)
        version = self.store.version()
        if version is None or version == live_version or version == self.failed:
            return None
        stored = self.store.read()
        if stored is None or stored.version == live_version:
            return None
        try:
            self.install(stored, live_version)
        except StalePlan:
            return None  # the live table changed meanwhile: look again next time
        except LbcError as e:
            self.failed = stored.version
            log.error("cannot install table %s from the ha store: %s", stored.version[:12], e)
            return f"failed {stored.version[:12]}: {e}"
        log.info("installed table %s from the ha store", stored.version[:12])
        return f"installed {stored.version[:12]}"

    def run(self, current, stop: threading.Event) -> None:  # current() -> (version, table)
        trouble = ""
        while not stop.wait(POLL_S):
            try:
                self.step(*current())
                trouble = ""
            except LbcError as e:
                if str(e) != trouble:  # once per outage, not twice a second
                    log.warning("%s", e)
                    trouble = str(e)
            except Exception:  # noqa: BLE001 - the thread's edge: log it, keep following
                log.exception("the ha store follower failed; going on")
