"""The table the nodes of a global.ha group share through Redis
(global.ha.store), and the follower that keeps a node on it.

Four keys per group (its router_id), always written together in one MULTI:
`lbc:ha:<id>:version` (what followers poll), `...:table` (the canonical
JSON, which hashes to the version), `...:files` (digest -> the path each
certificate, key or secret was read from, so a follower reads its own copy
there) and `...:mac` (HMAC-SHA256 of version and files, keyed by the
group's admin token file: a node installs only what a holder of that token
wrote, whoever else can write to Redis).

The rules:

1. Every write is a compare-and-set on the version the writer read when it
   took its node's lock (WATCH, then MULTI). An admin API change is made on
   the stored table and written before the node installs it; a lost race
   is made again on the winner's result, so of two changes made at once on
   two nodes neither is lost. If the node then cannot install it, the store
   is put back, again by compare-and-set (other nodes may have installed it
   meanwhile: they follow the store back).
2. Any other install (a file, a push, a rollback) keeps the dynamic pools'
   backends of the stored table, and is written once installed. If another
   node wrote meanwhile, this write loses: the result says so (exit 1), and
   this node follows the winner (rule 3). If the store did not answer, the
   node keeps the table and notes it (state/store-pending.json); its
   follower writes it once the store answers, if the store still holds what
   it replaced, and otherwise follows the store. A rollback from a table
   this node has not caught up with is refused. An entry signed with
   another token (a rotated token file) is replaced by the next install.
3. Each node's admin API process follows: when the stored version is not
   the live one, it installs the stored table exactly (never writing back),
   after checking, under the lock, that the store still holds it. A version
   that cannot be installed here (a file that differs, a bad signature, a
   table that would move the admin API) is logged once and not tried again;
   other failures (workers that did not ack, a busy lock) are tried again
   after a pause that doubles up to a minute. A node that was down catches
   up when it comes back.

Redis being unreachable never stops a node from serving or from applying
locally: writes report it, the follower retries. Admin API changes need it
(they would not reach the other nodes) and answer 503.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

import redis
from redis.exceptions import RedisError, WatchError

from lbc.errors import LbcError, Rejected, StalePlan
from lbc.table import RoutingTable

log = logging.getLogger("lbc.hastore")
POLL_S = 0.5
TIMEOUT_S = 2.0


class StoreUnavailable(LbcError):
    """Redis could not be reached or answered with an error."""


class NotSigned(LbcError):
    """The stored table is not signed with this node's admin token."""


@dataclass(frozen=True, slots=True)
class Stored:
    version: str
    data: bytes
    files: dict[str, str]  # digest -> path, for the digests the table names


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:" if parts.username else ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}***@{parts.netloc.rpartition('@')[2]}"))


class SharedTable:
    def __init__(self, url: str, group: int, key: bytes) -> None:
        self.url, self.group, self.key = url, group, key
        self.name = redacted(url)
        self.prefix = f"lbc:ha:{group}:"
        try:
            self.client = redis.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        except ValueError as e:  # the config check refuses such URLs; a table from elsewhere may not have been
            raise StoreUnavailable(f"the ha store {self.name} is not a usable URL: {e}") from None

    def version(self) -> str | None:
        try:
            raw = self.client.get(self.prefix + "version")
        except RedisError as e:
            raise self._unavailable(e) from None
        return raw.decode() if raw else None

    def read(self) -> Stored | None:
        try:
            version, data, files, mac = self.client.mget(self.prefix + k for k in ("version", "table", "files", "mac"))
        except RedisError as e:
            raise self._unavailable(e) from None
        if not version or data is None:
            return None
        version = version.decode(errors="replace")
        if mac is None or files is None or not hmac.compare_digest(mac, self._mac(version, files)):
            raise NotSigned(f"the table {version[:12]} in the ha store {self.name} is not signed with this node's "
                            "admin token (global.admin.token_file must be the same file on every node)")
        try:
            paths = json.loads(files)
        except ValueError:
            raise NotSigned(f"the ha store {self.name} holds unreadable file paths") from None
        return Stored(version, data, paths)

    def swap(self, expect: str | None, new: Stored) -> bool:
        """Write `new` if the stored version is still `expect` (None: nothing
        stored), or already is `new`'s; False when another writer came first."""
        key = self.prefix + "version"
        files = json.dumps(new.files, sort_keys=True).encode()
        try:
            with self.client.pipeline() as pipe:
                pipe.watch(key)
                raw = pipe.get(key)
                current = raw.decode(errors="replace") if raw else None
                if current == new.version:
                    return True
                if current != expect:
                    return False
                pipe.multi()
                pipe.set(self.prefix + "table", new.data)
                pipe.set(self.prefix + "files", files)
                pipe.set(self.prefix + "mac", self._mac(new.version, files))
                pipe.set(key, new.version)
                pipe.execute()
                return True
        except WatchError:
            return False
        except RedisError as e:
            raise self._unavailable(e) from None

    def _mac(self, version: str, files: bytes) -> bytes:
        return hmac.new(self.key, version.encode() + b"\n" + files, hashlib.sha256).hexdigest().encode()

    def _unavailable(self, e: RedisError) -> StoreUnavailable:
        return StoreUnavailable(f"the ha store {self.name} did not answer: {e}")

    def close(self) -> None:
        self.client.close()


class Follower:
    """Rule 3 (and rule 2's pending writes), in the admin API process:
    `step` looks once, `run` loops. `config_of(table)` gives (url, group,
    key) of the table's store, or None; `catch_up(store, live_version, live)`
    writes a table installed here while the store did not answer (what it
    did, or None); `install(store, stored, expect)` installs, raising
    LbcError: Rejected (a file that differs, a table this node cannot take)
    and NotSigned are final for that version, anything else is tried again
    after a pause that doubles up to a minute."""

    def __init__(self, config_of: Callable[[RoutingTable], tuple[str, int, bytes] | None],
                 catch_up: Callable[[SharedTable, str | None, RoutingTable | None], str | None],
                 install: Callable[[SharedTable, Stored, str | None], object],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config_of, self.catch_up, self.install, self.clock = config_of, catch_up, install, clock
        self.failed: str | None = None  # a stored version that cannot be installed here
        self.retry: tuple[str, float, float] | None = None  # (version, not before, pause) after a passing failure
        self.store: SharedTable | None = None
        self.table: RoutingTable | None = None  # the live table self.store was opened for

    def step(self, live_version: str | None, live: RoutingTable | None) -> str | None:
        """Write what is pending, else install the stored table if it is not
        the live one; what was done."""
        store = self._store(live)
        if store is None:
            return None
        done = self.catch_up(store, live_version, live)
        if done is not None:
            log.warning("ha store: %s", done)
            return done
        version = store.version()
        if version is None or version == live_version or version == self.failed:
            return None
        if self.retry is not None and self.retry[0] == version and self.clock() < self.retry[1]:
            return None
        try:
            stored = store.read()
            if stored is None or stored.version == live_version:
                return None
            self.install(store, stored, live_version)
        except StalePlan:
            return None  # the live table or the store moved meanwhile: look again next time
        except (Rejected, NotSigned) as e:
            self.failed = version
            log.error("cannot install table %s from the ha store: %s", version[:12], e)
            return f"failed {version[:12]}: {e}"
        except LbcError as e:
            pause = min(60.0, self.retry[2] * 2) if self.retry is not None and self.retry[0] == version else 1.0
            self.retry = (version, self.clock() + pause, pause)
            log.warning("cannot install table %s from the ha store now (trying again in %.0f s): %s",
                        version[:12], pause, e)
            return f"not yet {version[:12]}: {e}"
        self.retry = None
        log.info("installed table %s from the ha store", version[:12])
        return f"installed {version[:12]}"

    def _store(self, live: RoutingTable | None) -> SharedTable | None:
        if live is self.table:
            return self.store
        config = self.config_of(live) if live is not None else None
        current = (self.store.url, self.store.group, self.store.key) if self.store is not None else None
        self.table = live
        if config != current:
            if self.store is not None:
                self.store.close()
            self.store = SharedTable(*config) if config is not None else None
            self.failed = None
        return self.store

    def run(self, current: Callable[[], tuple[str | None, RoutingTable | None]], stop: threading.Event) -> None:
        trouble = ""
        try:
            while not stop.wait(POLL_S):
                try:
                    self.step(*current())
                    trouble = ""
                except LbcError as e:
                    if str(e) != trouble:  # once per outage, not twice a second
                        log.warning("ha store: %s", e)
                        trouble = str(e)
                except Exception:  # noqa: BLE001 - the thread's edge: log it, keep following
                    log.exception("the ha store follower failed; going on")
        finally:
            if self.store is not None:
                self.store.close()
