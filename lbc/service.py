"""The operations behind `lbc validate|compile|plan|apply|rollback`, shared by
the CLI and (later) the admin API, so every change takes the same path:

    load + check -> compile -> lock -> diff against live -> install -> record
"""

from __future__ import annotations

import getpass
import hashlib
import json
import socket
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from lbc import table as tablemod
from lbc.compiler import compile_config
from lbc.config import Config, load
from lbc.errors import LbcError, StalePlan, StateError
from lbc.plan import Plan, diff
from lbc.state import HistoryRecord, StateDir, now_iso
from lbc.table import RoutingTable

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
class ApplyResult:
    plan: Plan
    installed: bool
    state: str

    def render_text(self) -> str:
        if not self.installed:
            return self.plan.render_text()
        return (
            self.plan.render_text()
            + f"\nInstalled table {self.plan.version[:12]} as current in {self.state} (no workers running).\n"
        )

    def exit_code(self) -> int:
        return 0


def plan_file(path: str | PathLike[str], state: StateDir) -> tuple[Plan, Compiled]:
    compiled = compile_file(path)
    base_version, base = state.current_table()
    return diff(base, compiled.table, base_version, compiled.version), compiled


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
        table = tablemod.from_plain(RoutingTable, doc["table"])
        data = tablemod.dump(table)
        version = tablemod.version_of(data)
        if version != doc["plan"]["version"]:
            raise tablemod.TableError("its table does not hash to its version")
        files = dict(doc["files"])
    except (tablemod.TableError, KeyError, TypeError) as e:
        raise LbcError(f"{path}: not a usable plan file: {e}") from None
    secrets = {}
    for digest in sorted(table.digests()):
        secrets[digest] = _read_planned_file(files.get(digest), digest, path)
    compiled = Compiled(table, data, version, secrets, files, doc.get("source"), doc.get("source_sha256"))
    return doc["plan"]["base_version"], compiled


def _read_planned_file(file: str | None, digest: str, plan_path: Any) -> bytes:
    if file is None:
        raise LbcError(f"{plan_path}: the plan names file {digest[:12]} but not where it was read from")
    try:
        data = Path(file).read_bytes()
    except OSError as e:
        raise LbcError(f"{plan_path}: cannot read {file}, which the plan uses: {e.strerror}") from None
    if hashlib.sha256(data).hexdigest() != digest:
        raise StalePlan(f"{file} changed since the plan was made; run lbc plan again")
    return data


def apply(
    compiled: Compiled,
    state: StateDir,
    *,
    argv: str,
    lock_timeout: float,
    origin: str = "cli",
    saved_plan_base: tuple[str | None] | None = None,
) -> ApplyResult:
    """Install `compiled` as the live table. From a saved plan
    (`saved_plan_base` holds the version it was made against), refuse unless
    that version is still the live one."""
    with state.lock(argv, lock_timeout):
        base_version, base = state.current_table()
        if saved_plan_base is not None and saved_plan_base[0] != base_version:
            planned = saved_plan_base[0][:12] if saved_plan_base[0] else "an empty state"
            live = base_version[:12] if base_version else "nothing"
            raise StalePlan(f"the plan was made against {planned}, but the live table is now {live}; run lbc plan again")
        plan = diff(base, compiled.table, base_version, compiled.version)
        if plan.empty:
            return ApplyResult(plan, installed=False, state=str(state.root))
        record = _record(compiled.version, base_version, "apply", origin, compiled.source, compiled.source_sha256, argv)
        state.install(compiled.table, compiled.data, compiled.secrets, record)
        return ApplyResult(plan, installed=True, state=str(state.root))


def rollback(state: StateDir, target: str | None, *, argv: str, lock_timeout: float, origin: str = "cli") -> ApplyResult:
    """Make an earlier table live again (default: the one before the live one)."""
    with state.lock(argv, lock_timeout):
        base_version, base = state.current_table()
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
        record = _record(version, base_version, "rollback", origin, None, None, argv)
        state.install(table, tablemod.dump(table), {}, record)
        return ApplyResult(plan, installed=True, state=str(state.root))


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
