"""The operations behind `lbc validate|compile|plan|apply|rollback`, shared by
the CLI and the admin API, so every change takes the same path:

    load + check -> compile -> lock -> diff against live -> install -> record
    (the admin API: lock -> edit the live table (lbc.mutate) -> the same)
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import getpass
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import psutil

from lbc import keepalived, mutate, nodecheck, shm
from lbc import table as tablemod
from lbc.compiler import compile_config
from lbc.config import Config, load
from lbc.errors import Conflict, FileMismatch, LbcError, Rejected, StalePlan, StateError
from lbc.hastore import NotSigned, SharedTable, Stored, StoreUnavailable
from lbc.plan import Plan, diff
from lbc.state import HistoryRecord, StateDir, now_iso, slot_key
from lbc.supervise import (
    Ack,
    Node,
    enable_listener_migration,
    held_sockets,
    probe_binds,
    stop_processes,
    stop_wait_seconds,
)
from lbc.table import RoutingTable, worker_count

SAVED_PLAN_KEY = "lbc_plan"
SAVED_PLAN_FORMAT = 1


@dataclass(frozen=True, slots=True)
class Compiled:
    """A table ready to install: its bytes, version, and the file bytes it
    names by digest."""

    table: RoutingTable
    data: bytes
    version: str
    secrets: dict[str, bytes]
    files: dict[str, str]  # digest -> path it was read from
    source: str | None
    source_sha256: str | None
    config: Config | None = None  # None when it came from a saved plan

    @classmethod
    def from_config(cls, config: Config) -> Compiled:
        table = compile_config(config)
        data = tablemod.dump(table)
        needed = table.digests()
        blobs = [b for b in config.files.values() if b.sha256 in needed]
        return cls(
            table=table,
            data=data,
            version=tablemod.version_of(data),
            secrets={b.sha256: b.data for b in blobs},
            files={b.sha256: b.path for b in blobs},
            source=str(Path(config.source).resolve()),
            source_sha256=config.source_sha256,
            config=config,
        )


def compile_file(path: str | PathLike[str]) -> Compiled:
    return Compiled.from_config(load(path))


@dataclass(frozen=True, slots=True)
class Delivery:
    """What the running workers did with an installed table."""

    running: bool  # were workers running at all
    waited: bool
    acks: tuple[Ack, ...] = ()

    def describe(self) -> str:
        if not self.running:
            return "no workers running"
        if not self.waited:
            return "workers signalled, not waiting for them (--no-wait)"
        return f"{len(self.acks)} worker{'s' if len(self.acks) != 1 else ''} serving it"


@dataclass(frozen=True, slots=True)
class ApplyResult:
    plan: Plan
    installed: bool
    state: str
    delivery: Delivery | None = None
    shared: str = ""  # what became of it in global.ha.store, in words
    store: str = ""  # the same: "", written, pending (the store did not answer), superseded (another node wrote first)

    def render_text(self) -> str:
        text = self.plan.render_text()
        if self.installed and self.delivery is not None:
            text += f"\nInstalled table {self.plan.version[:12]} as current in {self.state}; {self.delivery.describe()}.\n"
        if self.shared:
            text += self.shared + "\n"
        return text

    def exit_code(self) -> int:
        return 1 if self.store == "superseded" else 0  # installed here, but the node follows another table


class ApplyFailed(LbcError):
    """Workers did not take the new table; the previous one is current again."""


def plan_file(path: str | PathLike[str], state: StateDir) -> tuple[Plan, Compiled]:
    compiled = compile_file(path)
    base_version = state.current_version()
    # An unchanged table makes an empty plan, which needs no live table: skip
    # reading and decoding it (for a big table, a good share of `lbc plan`),
    # unless the API's backends of dynamic pools are to be kept.
    dynamic = any(p.dynamic_backends for p in compiled.table.pools)
    base = state.read_table(base_version) if base_version not in (None, compiled.version) or (
        dynamic and base_version is not None) else None
    compiled = with_dynamic(compiled, base)
    return diff(base, compiled.table, base_version, compiled.version), compiled


def with_dynamic(compiled: Compiled, live: RoutingTable | None) -> Compiled:
    """`compiled` keeping the live API backends of its dynamic pools."""
    table = mutate.keep_dynamic(compiled.table, live)
    if table is compiled.table:
        return compiled
    data = tablemod.dump(table)
    return dataclasses.replace(compiled, table=table, data=data, version=tablemod.version_of(data))


def save_plan(plan: Plan, compiled: Compiled) -> bytes:
    """A plan file for `lbc apply plan.json`. It carries the whole table and
    where each referenced file was read from, never the files' bytes."""
    doc = {
        SAVED_PLAN_KEY: SAVED_PLAN_FORMAT,
        "plan": plan.to_plain(),
        "table": tablemod.to_plain(compiled.table),
        "files": compiled.files,
        "source": compiled.source,
        "source_sha256": compiled.source_sha256,
    }
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def read_saved_plan(path: str | PathLike[str]) -> tuple[str | None, Compiled] | None:
    """(base version, compiled) if the file is a saved plan, else None."""
    try:
        with open(path, "rb") as f:
            head = f.read(1)
            if head != b"{":
                return None
            raw = head + f.read()
        doc = json.loads(raw)
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or SAVED_PLAN_KEY not in doc:
        return None
    if doc[SAVED_PLAN_KEY] != SAVED_PLAN_FORMAT:
        raise LbcError(f"{path}: plan file format {doc[SAVED_PLAN_KEY]} is not supported")
    try:
        version, files = doc["plan"]["version"], dict(doc["files"])
    except (KeyError, TypeError) as e:
        raise LbcError(f"{path}: not a usable plan file: {e}") from None
    table, data = table_from_plain(doc.get("table"), version, f"{path}: not a usable plan file")
    secrets = read_files(table, files, path)
    compiled = Compiled(table, data, version, secrets, files, doc.get("source"), doc.get("source_sha256"))
    return doc["plan"]["base_version"], compiled


def table_from_plain(plain: Any, version: str, where: str) -> tuple[RoutingTable, bytes]:
    """A table sent as JSON (a saved plan, a push), checked against the
    version it claims; (table, canonical bytes)."""
    try:
        table = tablemod.from_plain(RoutingTable, plain)
        data = tablemod.dump(table)
        if tablemod.version_of(data) != version:
            raise tablemod.TableError("its table does not hash to its version")
    except (tablemod.TableError, KeyError, TypeError) as e:
        raise Rejected(f"{where}: {e}") from None
    return table, data


def read_files(table: RoutingTable, files: dict[str, str], where: Any,
               have: Callable[[str], bool] = lambda digest: False, *, remote: bool = False) -> dict[str, bytes]:
    """The bytes of every file `table` names by digest (but those `have`
    holds), read from where `files` says they were read when it was compiled,
    and refused if they changed since. Secrets never travel in a plan, a push
    or the ha store: each machine reads its own copy. `remote`: the paths
    come from another machine, so only regular files of a sane size are
    read, and a refusal does not tell a missing file from a different one."""
    out = {}
    for digest in sorted(table.digests()):
        if have(digest):
            continue
        file = files.get(digest)
        if file is None:
            raise LbcError(f"{where}: names file {digest[:12]} but not where it was read from")
        elsewhere = FileMismatch(f"{where}: {file} on this node is not the file it was compiled with "
                                 f"(sha256 {digest[:12]}): give every node the same file at that path")
        try:
            data = _read_regular(file) if remote else Path(file).read_bytes()
        except (OSError, ValueError) as e:  # ValueError: a NUL in the path
            if remote:
                raise elsewhere from None
            raise LbcError(f"{where}: cannot read {file}, which the table uses: {getattr(e, 'strerror', e)}") from None
        if hashlib.sha256(data).hexdigest() != digest:
            if remote:
                raise elsewhere
            raise FileMismatch(f"{where}: {file} changed since the table was compiled (its sha256 is no longer "
                               f"{digest[:12]}); run lbc plan again, or give this machine the same file")
        out[digest] = data
    return out


MAX_FILE = 16 * 1024 * 1024  # certificates, keys, CA bundles, secrets: far smaller


def _read_regular(path: str) -> bytes:
    """A regular file's bytes, without blocking on a FIFO or reading a device."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_FILE:
            raise OSError(errno.EINVAL, "not a regular file of at most 16 MiB")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(MAX_FILE + 1)
    finally:
        os.close(fd)


def apply(
    compiled: Compiled,
    state: StateDir,
    *,
    argv: str,
    lock_timeout: float,
    origin: str = "cli",
    saved_plan_base: tuple[str | None] | None = None,
    wait: bool = True,
    ack_timeout: float = 10.0,
    from_admin: bool = False,
    from_store: SharedTable | None = None,
) -> ApplyResult:
    """Install `compiled` as the live table and, when workers run, hand it to
    them. From a saved plan or a push (`saved_plan_base` holds the version it
    was made against), refuse unless that version is still the live one.
    With global.ha.store, the dynamic pools keep the stored table's backends
    and the table is written there (lbc.hastore rule 2); `from_store`: it
    came from that store, is installed exactly, and only if still stored.
    `from_admin`: the admin API process installs it, so it cannot change
    global.admin."""
    with state.lock(argv, lock_timeout):
        base_version, base = state.current_table()
        with _opened_store(compiled.table if from_store is None else None, state, compiled.secrets) as store:
            seen = _read_store(store)
            if from_store is None:
                ahead = seen.stored is not None and seen.stored.version != base_version
                compiled = with_dynamic(compiled, _stored_table(seen.stored) if ahead else base)
            elif from_store.version() != compiled.version:
                raise StalePlan(f"the ha store no longer holds {compiled.version[:12]}")
            # A push finding its table live already (another node's store write got here first) is done;
            # a saved plan made against another table is stale, as terraform's.
            if saved_plan_base is not None and saved_plan_base[0] != base_version and not (
                    from_admin and base_version == compiled.version):
                planned = saved_plan_base[0][:12] if saved_plan_base[0] else "an empty state"
                raise StalePlan(f"the plan was made against {planned}, but the live table is now "
                                f"{_short(base_version)}; run lbc plan again")
            plan = diff(base, compiled.table, base_version, compiled.version)
            if plan.empty:
                return ApplyResult(plan, installed=False, state=str(state.root))
            record = _record(compiled.version, base_version, "apply", origin, compiled.source, compiled.source_sha256,
                             argv)
            delivery = _install_and_deliver(state, compiled.table, compiled.data, compiled.secrets, record, base,
                                            wait=wait, ack_timeout=ack_timeout, admin_may_change=not from_admin,
                                            paths=compiled.files)
            outcome = _write_store(state, store, seen, base_version,
                                   Stored(compiled.version, compiled.data, state.file_paths(compiled.table)))
            return ApplyResult(plan, installed=True, state=str(state.root), delivery=delivery, shared=outcome[1],
                               store=outcome[0])


def install_pushed(state: StateDir, plain: Any, version: str, *, files: dict[str, str], expect: str | None,
                   source: str | None, source_sha256: str | None, argv: str, lock_timeout: float,
                   ack_timeout: float = 10.0) -> ApplyResult:
    """A table compiled elsewhere (`lbc apply FILE --node URL`), installed as
    an apply is if the live table is still `expect` (or already is it). The
    files it names that this node lacks are read here, from the paths they
    were compiled from."""
    table, data = table_from_plain(plain, version, "the pushed table")
    secrets = read_files(table, files, "the pushed table", state.has_secret, remote=True)
    compiled = Compiled(table, data, version, secrets, files, source, source_sha256)
    return apply(compiled, state, argv=argv, lock_timeout=lock_timeout, origin="push", saved_plan_base=(expect,),
                 ack_timeout=ack_timeout, from_admin=True)


def install_stored(state: StateDir, store: SharedTable, stored: Stored, expect: str | None, *,
                   lock_timeout: float) -> ApplyResult:
    """A table another node of the group wrote to global.ha.store (the
    follower, lbc.hastore rule 3), installed if the live table is still
    `expect` and the store still holds it."""
    table = _stored_table(stored)
    secrets = read_files(table, stored.files, f"the stored table {stored.version[:12]}", state.has_secret,
                         remote=True)
    compiled = Compiled(table, stored.data, stored.version, secrets, stored.files, None, None)
    return apply(compiled, state, argv="ha store", lock_timeout=lock_timeout, origin="store",
                 saved_plan_base=(expect,), from_admin=True, from_store=store)


def change(state: StateDir, edit: Callable[[RoutingTable], RoutingTable], *, command: str, argv: str,
           lock_timeout: float, origin: str = "api", wait: bool = True, ack_timeout: float = 10.0) -> ApplyResult:
    """An imperative change (the admin API): `edit` makes the new table from
    the live one (lbc.mutate; it raises Rejected to refuse), then it is
    installed and delivered as an apply is, and recorded with its origin.
    With global.ha.store, it is made on the stored table and written there
    first, by compare-and-set (lbc.hastore rule 1)."""
    with state.lock(argv, lock_timeout):
        live_version, live = state.current_table()
        if live is None:
            raise LbcError(f"nothing is installed in {state.root}: apply a file first")
        with _opened_store(live, state) as store:
            base, table = _edit_stored(store, state, live_version, live, edit)
            data = tablemod.dump(table)
            version = tablemod.version_of(data)
            plan = diff(live, table, live_version, version)
            if plan.empty:
                return ApplyResult(plan, installed=False, state=str(state.root))
            record = _record(version, live_version, command, origin, None, None, argv)
            try:
                delivery = _install_and_deliver(state, table, data, {}, record, live, wait=wait,
                                                ack_timeout=ack_timeout, admin_may_change=False)
            except Exception as e:
                if store is None or base.version == version:
                    raise
                put_back = False  # the store too, unless another node changed it meanwhile
                with contextlib.suppress(LbcError):
                    put_back = store.swap(version, base)
                if isinstance(e, ApplyFailed) and not put_back:
                    raise ApplyFailed(f"{e}; the ha store could not be put back: other nodes may serve the "
                                      "change") from None
                raise
            if store is None:
                return ApplyResult(plan, installed=True, state=str(state.root), delivery=delivery)
            return ApplyResult(plan, installed=True, state=str(state.root), delivery=delivery, shared=_written(store),
                               store="written")


def rollback(state: StateDir, target: str | None, *, argv: str, lock_timeout: float, origin: str = "cli",
             wait: bool = True, ack_timeout: float = 10.0, expect: str | None = None,
             from_admin: bool = False) -> ApplyResult:
    """Make an earlier table live again (default: the one before the live
    one); with `expect`, only if that version is still the live one. With
    global.ha.store, written there as an apply is."""
    with state.lock(argv, lock_timeout):
        base_version, base = state.current_table()
        if expect is not None and base_version != expect:
            raise StalePlan(f"the live table is {_short(base_version)}, no longer {expect[:12]}: not rolled back")
        if target is not None:
            version = state.resolve_version(target)
        else:
            version = _previous(state, base_version)
        table = state.read_table(version)
        missing = [d[:12] for d in sorted(table.digests()) if not state.has_secret(d)]
        if missing:
            raise StateError(f"table {version[:12]} needs files missing from {state.secrets}: {', '.join(missing)}")
        plan = diff(base, table, base_version, version)
        if plan.empty:
            return ApplyResult(plan, installed=False, state=str(state.root))
        with _opened_store(table, state) as store:
            seen = _read_store(store)
            if seen.stored is not None and seen.stored.version not in (base_version, version):
                # Rolling back from a table this node has not caught up with would drop the group's newer changes.
                raise StalePlan(f"the ha store holds {_short(seen.stored.version)}, which this node has not "
                                f"installed yet (it serves {_short(base_version)}): roll back once it has")
            record = _record(version, base_version, "rollback", origin, None, None, argv)
            data = tablemod.dump(table)
            delivery = _install_and_deliver(state, table, data, {}, record, base, wait=wait, ack_timeout=ack_timeout,
                                            admin_may_change=not from_admin)
            outcome = _write_store(state, store, seen, base_version, Stored(version, data, state.file_paths(table)))
            return ApplyResult(plan, installed=True, state=str(state.root), delivery=delivery, shared=outcome[1],
                               store=outcome[0])


# -- global.ha.store (the rules are lbc.hastore's) -----------------------------------------


def store_config(table: RoutingTable | None, state: StateDir,
                 secrets: dict[str, bytes] | None = None) -> tuple[str, int, bytes] | None:
    """(url, group, signing key) of the table's ha store; None without one.
    The key is the admin token file every node of the group reads."""
    ha = table.settings.ha if table is not None else None
    if ha is None or not ha.store:
        return None
    admin = table.settings.admin
    if admin is None or admin.token_sha256 is None:  # the config check requires it
        raise LbcError("global.ha.store needs global.admin.token_file (the nodes sign what they store with it)")
    key = (secrets or {}).get(admin.token_sha256)
    return ha.store, ha.router_id, key if key is not None else state.secret(admin.token_sha256)


def open_store(table: RoutingTable | None, state: StateDir,
               secrets: dict[str, bytes] | None = None) -> SharedTable | None:
    config = store_config(table, state, secrets)
    return SharedTable(*config) if config is not None else None


@contextlib.contextmanager
def _opened_store(table: RoutingTable | None, state: StateDir,
                  secrets: dict[str, bytes] | None = None) -> Iterator[SharedTable | None]:
    store = open_store(table, state, secrets)
    try:
        yield store
    finally:
        if store is not None:
            store.close()


@dataclass(frozen=True, slots=True)
class _Seen:
    """What an install found in the ha store when it took the node's lock."""

    stored: Stored | None = None  # the stored table, when it could be read and verified
    version: str | None = None  # the stored version, verified or not: what a write must replace
    down: str = ""  # why the store could not be read


def _read_store(store: SharedTable | None) -> _Seen:
    if store is None:
        return _Seen()
    try:
        stored = store.read()
        return _Seen(stored, stored.version if stored is not None else None)
    except NotSigned:
        # Signed with another token (the token file was rotated): this install replaces it.
        try:
            return _Seen(None, store.version())
        except StoreUnavailable as e:
            return _Seen(down=str(e))
    except StoreUnavailable as e:
        return _Seen(down=str(e))


def _write_store(state: StateDir, store: SharedTable | None, seen: _Seen, replaced: str | None,
                 new: Stored) -> tuple[str, str]:
    """Write an installed table to the group's store (lbc.hastore rule 2);
    (outcome, words). `replaced`: the live version it replaced here."""
    if store is None:
        return "", ""
    down = seen.down
    if not down:
        try:
            if store.swap(seen.version, new):
                state.set_store_pending(None)
                return "written", _written(store)
            other = store.version()
        except StoreUnavailable as e:
            down = str(e)
        else:
            return "superseded", (f"warning: another node wrote {_short(other)} to the ha store {store.name} "
                                  "meanwhile; the nodes follow the store, this one too: apply again for this "
                                  "table to win")
    # Kept here and written once the store answers, unless another node writes first (lbc.hastore rule 2).
    state.set_store_pending(new.version, seen.version if seen.version is not None else replaced)
    return "pending", (f"warning: {down}; this node keeps the table and writes it there once it answers, unless "
                       "another node writes first (then this node follows that)")


def write_pending(state: StateDir, store: SharedTable, live_version: str | None, live: RoutingTable | None,
                  lock_timeout: float = 30.0) -> str | None:
    """The follower's first duty (lbc.hastore rule 2): a table this node
    installed while the store did not answer is written there now, if the
    store still holds what it replaced. What was done, or None."""
    pending = state.store_pending()
    if pending is None:
        return None
    version, expect = pending
    if version != live_version or live is None:
        state.set_store_pending(None)  # this node has moved on since
        return None
    with state.lock("ha store: write pending", lock_timeout):
        if state.current_version() != version:
            return None  # the next look decides
        data = tablemod.dump(live)
        if store.swap(expect, Stored(version, data, state.file_paths(live))):
            state.set_store_pending(None)
            return f"wrote {version[:12]}, installed while the store did not answer"
        state.set_store_pending(None)
        return f"lost {version[:12]}: another node wrote {_short(store.version())} first; following it"


def _written(store: SharedTable) -> str:
    return f"Written to the ha store {store.name}: the other nodes follow."


def _stored_table(stored: Stored) -> RoutingTable:
    try:
        return tablemod.load(stored.data, expected_version=stored.version)
    except tablemod.TableError as e:
        raise Rejected(f"the ha store's table {stored.version[:12]} cannot be read here: {e}") from None


CAS_TRIES = 5


def _edit_stored(store: SharedTable | None, state: StateDir, live_version: str, live: RoutingTable,
                 edit: Callable[[RoutingTable], RoutingTable]) -> tuple[Stored, RoutingTable]:
    """change()'s edit: on the stored table when the group is ahead of this
    node, written there by compare-and-set, made again when another writer
    came first. (what the edit started from, the new table)."""
    if store is None:
        return Stored(live_version, b"", {}), edit(live)
    for _ in range(CAS_TRIES):
        stored = store.read()
        base = Stored(live_version, tablemod.dump(live), state.file_paths(live)) if stored is None else stored
        table = edit(live if base.version == live_version else _stored_table(base))
        if table.settings.admin != live.settings.admin:  # the store is ahead with a table this API cannot install
            raise Conflict("the ha store holds a table that changes global.admin, which the admin API cannot "
                           "install on itself: apply it on this node (lbc apply FILE) first")
        data = tablemod.dump(table)
        new = Stored(tablemod.version_of(data), data, base.files)
        if new.version == base.version or store.swap(stored.version if stored is not None else None, new):
            return base, table
    raise Conflict(f"the ha store {store.name} changed {CAS_TRIES} times while this change was made; try again")


def _short(version: str | None) -> str:
    return version[:12] if version else "nothing"


def _install_and_deliver(state: StateDir, table: RoutingTable, data: bytes, secrets: dict[str, bytes],
                         record: HistoryRecord, base: RoutingTable | None, *, wait: bool, ack_timeout: float,
                         admin_may_change: bool = True, paths: dict[str, str] | None = None) -> Delivery:
    """Install under the caller's lock; if workers run, signal them and wait
    for each to serve the table. If any cannot, put the previous table back as
    current (and signal again), so no worker, now or after a restart, serves
    a table this apply reported as failed."""
    node = Node(state)
    running = node.running()
    admin_changed = base is None or base.settings.admin != table.settings.admin
    if admin_changed and base is not None and not admin_may_change:
        # Made by the admin API process, which would be restarted in the middle of it.
        raise Conflict("the table changes global.admin, which the admin API cannot install on itself: "
                       "apply it on the node (lbc apply FILE)")
    if running:
        served = {x.socket_key for x in (base.listeners if base else ())}
        if base is not None and base.settings.admin is not None:  # ours: it restarts with the new settings
            served.add(("tcp", base.settings.admin.host, base.settings.admin.port))
        problems = probe_binds(table, skip=served)
        if problems:
            raise LbcError("cannot listen; nothing was changed:\n  " + "\n  ".join(problems))
    state.install(table, data, secrets, record, paths)
    if not running:
        return Delivery(running=False, waited=False)
    try:
        if base is None or worker_count(base) != worker_count(table) or base.settings.ha != table.settings.ha:
            node.reconcile(table)
        node.signal_workers()
        if admin_changed:
            node.restart_admin()
        if not wait:
            return Delivery(running=True, waited=False)
        acks = tuple(node.wait_for(record.version, ack_timeout))
    except LbcError as e:
        why = str(e)
    else:
        failed = [a for a in acks if not a.ok]
        if not failed:
            return Delivery(running=True, waited=True, acks=acks)
        why = "; ".join(f"{a.process} (pid {a.pid}) {a.detail}" for a in failed)
    if base is None or record.previous is None:
        raise ApplyFailed(f"table {record.version[:12]} is installed, but not every worker serves it: {why}")
    revert = _record(record.previous, record.version, "revert", record.origin, None, None, record.argv)
    state.install(base, tablemod.dump(base), {}, revert)
    with contextlib.suppress(LbcError):  # best effort: the error above is what the user needs
        if worker_count(base) != worker_count(table) or base.settings.ha != table.settings.ha:
            node.reconcile(base)
        node.signal_workers()
        if admin_changed:
            node.restart_admin()
        node.wait_for(record.previous, ack_timeout)
    raise ApplyFailed(f"not every worker could serve table {record.version[:12]}: {why}; "
                      f"table {record.previous[:12]} is current again")


def _previous(state: StateDir, live: str | None) -> str:
    if live is None:
        raise StateError(f"nothing is installed in {state.root}: there is nothing to roll back")
    for record in reversed(state.history()):
        if record.version == live and record.previous:
            return record.previous
    raise StateError(f"no version before {live[:12]} in the history of {state.root}")


def _record(version: str, previous: str | None, command: str, origin: str, source: str | None, source_sha: str | None, argv: str) -> HistoryRecord:
    return HistoryRecord(
        version=version,
        previous=previous,
        time=now_iso(),
        command=command,
        origin=origin,
        source=source,
        source_sha256=source_sha,
        who=f"{getpass.getuser()}@{socket.gethostname()}",
        argv=argv,
    )


# -- running a node -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UpResult:
    version: str
    table: RoutingTable
    acks: tuple[Ack, ...]
    supervisord: subprocess.Popen | None  # in the foreground, the child to wait on
    replaced: tuple[int, ...] = ()  # leftover workers of an earlier run, now stopped

    def render_text(self) -> str:
        lines = [f"lbc is up: table {self.version[:12]}, {len(self.acks)} worker{'s' if len(self.acks) != 1 else ''}."]
        if self.replaced:
            lines.append(f"  (took over from the workers of an earlier run, pid {', '.join(map(str, self.replaced))}, "
                         "which drained and exited)")
        for x in self.table.listeners:
            scheme = {"http": "http://", "https": "https://"}.get(x.protocol, "")
            lines.append(f"  {x.name:<16} {x.protocol:<16} {scheme}{x.bind}")
        return "\n".join(lines) + "\n"


def up(state: StateDir, file: str | PathLike[str] | None, *, foreground: bool, argv: str, lock_timeout: float,
       ack_timeout: float = 15.0, watch: Path | None = None, ha_node: str | None = None) -> UpResult:
    """Start supervisord and the workers on FILE (applied first) or, without
    FILE, on the state's current table; return once every worker serves it.
    With global.ha, keepalived too, for the node `ha_node` names or whose
    address is on this machine."""
    node = Node(state)
    pid = node.supervisord_pid()
    if pid is not None:
        raise LbcError(f"lbc already runs for {state.root} (supervisord pid {pid}): "
                       "change its table with lbc apply, stop it with lbc down")
    # Workers of an earlier run whose supervisord was killed serve on. The new
    # workers join their listeners (SO_REUSEPORT) and, once they serve, the
    # leftovers drain and exit: no port conflict, no gap.
    leftovers = node.orphans()
    compiled = compile_file(file) if file is not None else None
    if compiled is not None:
        table = compiled.table
    else:
        _, table = state.current_table()
        if table is None:
            raise LbcError(f"nothing to serve: {state.root} has no table yet; run lbc up FILE")
    helpers = node.orphaned_helpers()
    problems = probe_binds(table, skip=held_sockets(table, leftovers + helpers))
    if problems:
        raise LbcError("cannot listen; nothing was started:\n  " + "\n  ".join(problems))
    if table.settings.ha is not None:  # which node this is, before anything starts; kept in run/ha-node
        try:
            ha_node = keepalived.this_node(table.settings.ha, ha_node).name
        except LbcError:
            if ha_node is not None or table.settings.ha.keepalived:
                raise  # without keepalived, a node that cannot tell only skips probing its peers
    # The leftover health checker, admin API and keepalived serve no traffic:
    # stopped before the new ones start, so the admin port is free and
    # keepalived's pid file too. (A leftover keepalived holding the virtual
    # IPs gives them up: one failover, as for any restart of keepalived.)
    stop_processes(helpers, timeout=10)
    if compiled is not None:
        apply(compiled, state, argv=argv, lock_timeout=lock_timeout)
    version, table = state.current_table()
    enable_listener_migration()
    proc = node.start(table, foreground, watch=watch, ha_node=ha_node)
    acks = tuple(node.wait_for(version, ack_timeout))
    failed = [a for a in acks if not a.ok]
    if failed:
        why = "; ".join(f"{a.process} {a.detail}" for a in failed)
        with contextlib.suppress(LbcError):
            node.shutdown(timeout=30)
        raise LbcError(f"workers did not start serving {version[:12]}: {why}; stopped again "
                       f"(see the logs in {node.run})")
    if leftovers:
        stop_processes(leftovers, timeout=stop_wait_seconds(table))
    return UpResult(version, table, acks, proc, tuple(leftovers))


def wait_foreground(state: StateDir, result: UpResult) -> int:
    """Stay attached to a foreground supervisord until it exits; SIGINT or
    SIGTERM to lbc drains the workers and stops it."""
    node = Node(state)
    proc = result.supervisord
    stopping = False

    def stop(signum, frame) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            with contextlib.suppress(LbcError):
                node.shutdown(timeout=stop_wait_seconds(result.table) + 10)

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def reopen_logs(state: StateDir) -> str:
    node = Node(state)
    if not node.running():
        raise LbcError(f"lbc is not running for {state.root}")
    node.signal_workers("USR1", checker=False)
    return "workers reopen their access logs"


def down(state: StateDir, drain_timeout: float | None) -> str:
    """Stop accepting, let in-flight requests finish (up to the drain
    timeout), stop the workers and supervisord."""
    node = Node(state)
    _, table = state.current_table()
    wait = stop_wait_seconds(table) if table is not None else 35
    if node.supervisord_pid() is None:
        orphans, helpers = node.orphans(), node.orphaned_helpers()
        if not orphans and not helpers:
            raise LbcError(f"lbc is not running for {state.root}")
        stop_processes(orphans + helpers, timeout=drain_timeout if drain_timeout is not None else wait)
        if orphans:
            return f"supervisord was gone; leftover workers {', '.join(map(str, orphans))} drained and stopped"
        return f"supervisord was gone; its leftover processes {', '.join(map(str, helpers))} stopped"
    if drain_timeout is not None:
        memory = shm.Shm(node.shm_file, writable=True)
        try:
            memory.set_drain_override_ms(int(drain_timeout * 1000))
        finally:
            memory.close()
        wait = drain_timeout + 5
    node.shutdown(timeout=wait + 10)
    return f"lbc stopped for {state.root}"


@dataclass(frozen=True, slots=True)
class ProcessStatus:
    name: str
    state: str
    pid: int
    uptime_s: float
    serving: str  # table version the worker reports ("" for others)
    error: str
    rss_bytes: int
    cpu_percent: float


@dataclass(frozen=True, slots=True)
class BackendStatus:
    pool: str
    id: str
    address: str
    port: int
    enabled: bool
    active: int
    requests: int
    failures: int
    health: str  # unknown, healthy, unhealthy; "-" for pools without a health check
    successes: int  # consecutive, from the checker
    check_failures: int  # consecutive, from the checker
    last_check: float  # time.time(); 0: never
    latency_ms: float
    error: str
    resolved: str  # what a host name resolved to
    avg_response_ms: float | None  # mean time to the response head of the requests proxied; None before any


@dataclass(frozen=True, slots=True)
class NodeStatus:
    state: str
    running: bool
    supervisord_pid: int | None
    live_version: str | None
    processes: tuple[ProcessStatus, ...]
    backends: tuple[BackendStatus, ...]
    checker_age_s: float | None  # since the health checker's last heartbeat; None: never seen
    checker_trusted: bool  # fresh enough (three intervals) for workers to use its verdicts
    watch: dict | None  # what `lbc watch` last did (state, message, version, time), if it ran
    node: nodecheck.NodeHealth  # should the node take traffic (/healthz, keepalived's check)
    peers: dict  # the other ha nodes as this node's health checker last probed them
    store: str  # global.ha.store and where it stands against this node; "" without one

    def render_text(self) -> str:
        out = [f"state:     {self.state}",
               f"running:   {f'yes (supervisord pid {self.supervisord_pid})' if self.running else 'no'}",
               f"live:      {self.live_version[:12] if self.live_version else '(nothing installed)'}",
               f"node:      {'takes traffic' if self.node.ok else 'unavailable: ' + self.node.reason}"]
        now = time.time()
        for name, p in sorted(self.peers.items()):
            verdict = "takes traffic" if p.get("ok") else f"unavailable ({p.get('error') or '?'})"
            out.append(f"peer:      {name} ({p.get('admin')}): {verdict}, checked {now - p.get('checked', 0):.1f}s ago")
        if self.store:
            out.append(f"store:     {self.store}")
        if self.processes:
            out += ["", f"{'PROCESS':<12} {'STATE':<9} {'PID':>7} {'UPTIME':>8} {'SERVES':<12} {'RSS':>9} {'CPU%':>5}"]
            for p in self.processes:
                out.append(f"{p.name:<12} {p.state:<9} {p.pid:>7} {p.uptime_s:>7.0f}s {p.serving[:12]:<12} "
                           f"{p.rss_bytes / 2**20:>7.1f}MB {p.cpu_percent:>5.1f}" + (f"  error: {p.error}" if p.error else ""))
        if self.running:
            if self.checker_age_s is None:
                checker = "not seen yet"
            else:
                checker = f"heartbeat {self.checker_age_s:.1f}s ago" + (
                    "" if self.checker_trusted else "; STALE: workers ignore its verdicts and use passive health only")
            out.append(f"\nhealth checker: {checker}")
        if self.watch:
            w = self.watch
            out.append(f"watcher:   {w['state']} at {w['time']} ({w['file']}): {w['message'].splitlines()[0]}")
            out += [f"           {line}" for line in w["message"].splitlines()[1:]]
        if self.backends:
            out += ["", f"{'POOL':<16} {'BACKEND':<16} {'ADDRESS':<24} {'HEALTH':<10} {'OK/FAIL':>7} {'CHECKED':>8} "
                        f"{'LATENCY':>8} {'ACTIVE':>6} {'REQUESTS':>10} {'FAILURES':>8}"]
            now = time.time()
            for b in self.backends:
                address = f"[{b.address}]:{b.port}" if ":" in b.address else f"{b.address}:{b.port}"
                checked = f"{now - b.last_check:.0f}s ago" if b.last_check else "-"
                latency = f"{b.latency_ms:.1f}ms" if b.last_check else "-"
                notes = [] if b.enabled else ["disabled"]
                if b.resolved:
                    notes.append(f"resolves to {b.resolved}")
                if b.error:
                    notes.append(f"last error: {b.error}")
                out.append(f"{b.pool:<16} {b.id:<16} {address:<24} {b.health:<10} {b.successes:>3}/{b.check_failures:<3} "
                           f"{checked:>8} {latency:>8} {b.active:>6} {b.requests:>10} {b.failures:>8}"
                           + (f"  ({'; '.join(notes)})" if notes else ""))
        return "\n".join(out) + "\n"

    def to_plain(self) -> dict[str, Any]:
        return tablemod.to_plain(self)


def status(state: StateDir, process_figures: bool = True) -> NodeStatus:
    """The node as `lbc status` shows it; without `process_figures`, no
    per-process rows (the admin API's backend views, which must answer
    quickly: psutil's CPU figure waits 50 ms per process)."""
    node = Node(state)
    live, table = state.current_table()
    running = node.running()
    processes: list[ProcessStatus] = []
    backends: list[BackendStatus] = []
    memory = shm.Shm(node.shm_file) if running and node.shm_file.exists() else None
    try:
        if running and process_figures:
            now = time.time()
            for p in node.processes():
                info = memory.read_worker(p.slot) if memory is not None and p.slot is not None else None
                rss, cpu = 0, 0.0
                if p.pid:
                    with contextlib.suppress(psutil.Error):
                        proc = psutil.Process(p.pid)
                        rss, cpu = proc.memory_info().rss, proc.cpu_percent(interval=0.05)
                processes.append(ProcessStatus(
                    p.name, p.state, p.pid, now - p.started if p.pid else 0.0,
                    info.version if info else "", info.error if info and info.attempted != info.version else "",
                    rss, cpu))
        checker_age = None
        trusted = False
        if memory is not None:
            beat, _ = memory.health_heartbeat()
            checker_age = time.time() - beat if beat else None
        if table is not None:
            slots = state.slots()
            workers = [p.slot for p in node.workers()] if running else []
            longest = max((p.health_check.interval_ms for p in table.pools if p.health_check), default=0) / 1000
            trusted = checker_age is not None and checker_age < 3 * longest
            for pool in table.pools:
                for b in pool.backends:
                    slot = slots[slot_key(pool.name, b)]
                    total, health = shm.BackendCounters(), shm.HealthInfo(0, False, 0, 0, 0.0, 0.0, "", "")
                    if memory is not None:
                        total = memory.backend_totals(slot, workers)
                        health = memory.read_health(slot)
                    state_name = HEALTH_NAMES.get(health.state, "?") if pool.health_check else "-"
                    backends.append(BackendStatus(
                        pool.name, b.id, b.address, b.port, b.enabled, total.active, total.requests, total.failures,
                        state_name, health.successes, health.failures, health.last_check, health.latency_ms,
                        health.error, health.address,
                        total.latency_sum_s * 1000 / total.latency_count if total.latency_count else None))
    finally:
        if memory is not None:
            memory.close()
    return NodeStatus(str(state.root), running, node.supervisord_pid(), live, tuple(processes), tuple(backends),
                      checker_age, trusted, state.watch_status(), nodecheck.check(state), nodecheck.read_peers(state),
                      _store_status(state, table, live) if process_figures else "")


def _store_status(state: StateDir, table: RoutingTable | None, live: str | None) -> str:
    try:
        store = open_store(table, state)
    except LbcError as e:
        return str(e)
    if store is None:
        return ""
    try:
        stored = store.version()
    except StoreUnavailable as e:
        return str(e)
    finally:
        store.close()
    if stored == live:
        return f"{store.name}: holds {_short(stored)}, which this node serves"
    return f"{store.name}: holds {_short(stored)}; this node serves {_short(live)} (its admin API follows the store)"


def export_keepalived(file: str | PathLike[str], state: StateDir, node: str | None) -> str:
    """keepalived.conf for one node of FILE's global.ha (run keepalived yourself)."""
    ha = keepalived.ha_of(compile_file(file).table)
    return keepalived.render(ha, keepalived.this_node(ha, node), state.root, exported=True)


def drain_node(state: StateDir, undo: bool) -> str:
    """Make the node check fail (or pass again); traffic is not touched."""
    changed = nodecheck.set_draining(state, not undo)
    if undo:
        return "the node takes traffic again" if changed else "the node was not drained"
    return ("drained: /healthz and the node check fail, so keepalived or an upstream balancer moves traffic "
            "away (a virtual IP that moves resets the connections made to it); this node serves on what still "
            "reaches it" if changed else "the node was already drained")


HEALTH_NAMES = {0: "unknown", 1: "healthy", 2: "unhealthy"}  # as lbc_workers.health.machine
