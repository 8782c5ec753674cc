"""The state directory: installed tables, the pointer to the live one, history,
secrets, and the lock that serializes changes.

    <state>/
      tables/<version>.json   canonical table bytes; sha256(file) == version
      secrets/<sha256>        bytes of files tables name by digest (mode 0600)
      current                 the live version, one line
      slots.json              backend identity -> shared-memory slot (see lbc.shm)
      watch.json              what `lbc watch` last did (a status for lbc status)
      node-secret             this node's stickiness cookie secret, made at first use (mode 0600)
      admin-token             the admin API's bearer token without a token_file, made at first use (0600)
      history.jsonl           one JSON record per install, appended
      lock                    flock()ed by the command changing state; holds its pid

Crash safety. Every file is written as: temp file in the same directory,
write, fsync, rename over the final name, fsync the directory. An install
writes in this order:

    secrets -> table -> slots -> history record -> current

so `current` only ever names a table whose bytes and secrets are already
durable. A crash before the flip leaves the old table live (and possibly a
history record of an install that never went live: the record says which
version was live before it, and `lbc history` marks the live one from
`current`, so nothing is misreported). Tables and secrets are content
addressed, so rewriting one is harmless and they are never deleted.

History records are each one write() of one line with O_APPEND; a crash can
leave a torn last line, which readers skip and the next append first ends with
a newline so it cannot glue onto the torn one.

`LBC_FAULT=<point>` makes the process SIGKILL itself right after that step
(see FAULT_POINTS), so tests can crash an install at every point.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from lbc import table as tablemod
from lbc.errors import LockTimeout, StateError, UnknownVersion
from lbc.shm import MAX_BACKENDS
from lbc.table import RoutingTable

FAULT_POINTS = tuple(
    f"{what}.{step}"
    for what in ("secret", "table", "slots", "history", "current")
    for step in ("write", "fsync", "rename", "dirsync")
    if not (what == "history" and step in ("rename", "dirsync"))
)


def fault(point: str) -> None:
    if os.environ.get("LBC_FAULT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True, slots=True)
class HistoryRecord:
    version: str
    previous: str | None  # the version live when this install started
    time: str  # ISO 8601 UTC
    command: str  # apply, rollback, ...
    origin: str  # cli, api, watch, push (lbc apply --node, from another machine)
    source: str | None  # config path, when there is one
    source_sha256: str | None
    who: str  # user@host
    argv: str  # the command line


class StateDir:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.tables = self.root / "tables"
        self.secrets = self.root / "secrets"
        self.current_file = self.root / "current"
        self.history_file = self.root / "history.jsonl"
        self.lock_file = self.root / "lock"
        self.slots_file = self.root / "slots.json"
        self.paths_file = self.root / "file-paths.json"  # digest -> where the file was read from
        self.pending_file = self.root / "store-pending.json"  # an install the ha store has not taken yet
        self.run = self.root / "run"  # runtime files of a running node (lbc up)
        self.node_secret_file = self.root / "node-secret"
        self.admin_token_file = self.root / "admin-token"

    # -- reading ------------------------------------------------------------

    def current_version(self) -> str | None:
        try:
            text = self.current_file.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return None
        except (OSError, UnicodeError) as e:
            raise StateError(f"cannot read {self.current_file}: {e}") from None
        return text or None

    def read_table(self, version: str) -> RoutingTable:
        path = self.tables / f"{version}.json"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise UnknownVersion(f"no table {version} in {self.tables}") from None
        except OSError as e:
            raise StateError(f"cannot read {path}: {e.strerror}") from None
        try:
            return tablemod.load(data, expected_version=version)
        except tablemod.TableError as e:
            raise StateError(f"{path} is damaged: {e}") from None

    def current_table(self) -> tuple[str, RoutingTable] | tuple[None, None]:
        version = self.current_version()
        if version is None:
            return None, None
        return version, self.read_table(version)

    def resolve_version(self, prefix: str) -> str:
        """A full version from a unique prefix of at least 4 characters."""
        if len(prefix) < 4:
            raise UnknownVersion(f"version prefix {prefix!r} is too short (give at least 4 characters)")
        try:
            matches = sorted(p.stem for p in self.tables.glob(f"{prefix}*.json"))
        except OSError as e:
            raise StateError(f"cannot list {self.tables}: {e.strerror}") from None
        if not matches:
            raise UnknownVersion(f"no table version starts with {prefix!r}")
        if len(matches) > 1:
            raise UnknownVersion(f"{prefix!r} is ambiguous: {', '.join(m[:12] for m in matches)}")
        return matches[0]

    def node_secret(self) -> bytes:
        """This node's own secret (stickiness cookies without a secret_file)."""
        return self._made_once(self.node_secret_file)

    def admin_token(self) -> bytes:
        """The admin API's bearer token when the config names no token_file."""
        return self._made_once(self.admin_token_file)

    def _made_once(self, path: Path) -> bytes:
        """A random secret in `path` (mode 0600), made by the first process
        that asks, then read by all. Written beside and hard-linked into
        place, so two processes starting at once agree on one secret and
        nobody reads half of it."""
        try:
            return path.read_bytes().strip()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StateError(f"cannot read {path}: {_reason(e)}") from None
        # not named like the temp files a lock holder removes as a crashed writer's (no lock here)
        tmp = self.root / f".{path.name}-{os.getpid()}.part"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, os.urandom(32).hex().encode() + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            with contextlib.suppress(FileExistsError):  # another process was first: theirs wins
                os.link(tmp, path)
            _fsync_dir(self.root)
            return path.read_bytes().strip()
        except OSError as e:
            raise StateError(f"cannot write {path}: {_reason(e)}") from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def watch_status(self) -> dict | None:
        """What `lbc watch` last did (see lbc.watch), if it ever ran here."""
        try:
            return json.loads((self.root / "watch.json").read_text())
        except (OSError, ValueError):
            return None

    def write_watch_status(self, record: dict) -> None:
        """Replace watch.json (a status, not state: no fsync, no lock)."""
        self.root.mkdir(parents=True, exist_ok=True)
        replace_file(self.root / "watch.json", json.dumps(record, sort_keys=True).encode())

    def store_pending(self) -> tuple[str, str | None] | None:
        """(version, the store version it replaces) of a table installed while
        global.ha.store could not take it; lbc.hastore rule 2."""
        try:
            doc = json.loads(self.pending_file.read_text())
            return doc["version"], doc["expect"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StateError(f"cannot read {self.pending_file}: {e}") from None

    def set_store_pending(self, version: str | None, expect: str | None = None) -> None:
        if version is None:
            self.pending_file.unlink(missing_ok=True)
        else:
            replace_file(self.pending_file, json.dumps({"version": version, "expect": expect}).encode())

    def has_secret(self, digest: str) -> bool:
        return (self.secrets / digest).is_file()

    def secret(self, digest: str) -> bytes:
        path = self.secrets / digest
        try:
            return path.read_bytes()
        except OSError as e:
            raise StateError(f"cannot read {path}: {_reason(e)}") from None

    def file_paths(self, table: RoutingTable) -> dict[str, str]:
        """digest -> the path each file `table` names was read from when it
        was compiled (what another node needs to read its own copy)."""
        try:
            known = json.loads(self.paths_file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise StateError(f"cannot read {self.paths_file}: {e}") from None
        return {d: known[d] for d in sorted(table.digests()) if d in known}

    def history(self) -> list[HistoryRecord]:
        """Records in order; torn or foreign lines are skipped."""
        try:
            text = self.history_file.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        except OSError as e:
            raise StateError(f"cannot read {self.history_file}: {e.strerror}") from None
        out = []
        for line in text.splitlines():
            try:
                out.append(HistoryRecord(**json.loads(line)))
            except (ValueError, TypeError):
                continue
        return out

    # -- writing (under the lock) -------------------------------------------

    @contextlib.contextmanager
    def lock(self, command: str, timeout: float) -> Iterator[None]:
        """Serialize changes. Waits up to `timeout` seconds, then fails naming
        the holder. flock is released by the kernel if the holder dies."""
        self._ensure_dirs()
        try:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StateError(f"cannot open {self.lock_file}: {_reason(e)}") from None
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise LockTimeout(self._holder_message(fd, timeout)) from None
                    time.sleep(0.05)
            holder = json.dumps({"pid": os.getpid(), "command": command, "started": now_iso()})
            # The holder note only names us to a waiting command: on a full
            # disk it cannot be written, and the writes of the change itself
            # fail with the error to report.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, holder.encode(), 0)
            self._remove_temp_files()
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # releases the flock

    def _holder_message(self, fd: int, timeout: float) -> str:
        try:
            holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            holder = {}
        who = f"pid {holder.get('pid', '?')} ({holder.get('command', 'unknown command')}, since {holder.get('started', '?')})"
        return f"state {self.root} is locked by {who}; gave up after {timeout:g}s (--lock-timeout)"

    def slots(self) -> dict[str, int]:
        """Backend identity key (see slot_key) -> shared-memory slot."""
        try:
            return json.loads(self.slots_file.read_text())["slots"]
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError) as e:
            raise StateError(f"cannot read {self.slots_file}: {e}") from None

    def install(self, table: RoutingTable, data: bytes, secrets: Mapping[str, bytes], record: HistoryRecord,
                paths: Mapping[str, str] | None = None) -> None:
        """Make `table` (whose canonical bytes are `data`) the live table. The
        caller holds the lock and has checked the table; `secrets` holds the
        bytes of every digest it names that is not stored yet, `paths` where
        files were read from (kept for file_paths)."""
        version = tablemod.version_of(data)
        if version != record.version:
            raise StateError("history record does not match the table")
        self._ensure_dirs()
        for digest, blob in sorted(secrets.items()):
            if not self.has_secret(digest):
                self._atomic_write(self.secrets, digest, blob, "secret", mode=0o600)
        if paths:
            self._remember_paths(paths)
        if not (self.tables / f"{version}.json").is_file():
            self._atomic_write(self.tables, f"{version}.json", data, "table")
        self._allocate_slots(table)
        self._append_history(record)
        self._atomic_write(self.root, "current", f"{version}\n".encode(), "current")

    def _remember_paths(self, paths: Mapping[str, str]) -> None:
        try:
            known = json.loads(self.paths_file.read_text())
        except (OSError, ValueError):
            known = {}
        if all(known.get(d) == p for d, p in paths.items()):
            return
        known.update(paths)
        data = json.dumps(known, sort_keys=True, indent=0).encode()
        self._atomic_write(self.root, self.paths_file.name, data, "paths")

    def _allocate_slots(self, table: RoutingTable) -> None:
        """Give every backend (and HTTP listener) of the table a slot, keeping
        existing ones, so counters and balancer state follow a backend across
        tables."""
        slots = self.slots()
        keys = [slot_key(p.name, b) for p in table.pools for b in p.backends]
        keys += [listener_key(x.name) for x in table.listeners if x.protocol in ("http", "https")]
        fresh = [k for k in keys if k not in slots]
        if not fresh:
            return
        used = set(slots.values())
        free = (i for i in range(MAX_BACKENDS) if i not in used)
        for key in fresh:
            slot = next(free, None)
            if slot is None:
                raise StateError(f"more than {MAX_BACKENDS} backend identities in {self.slots_file}")
            slots[key] = slot
        data = json.dumps({"slots": slots}, sort_keys=True, separators=(",", ":")).encode()
        self._atomic_write(self.root, "slots.json", data, "slots")

    def _ensure_dirs(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.tables.mkdir(exist_ok=True)
            self.secrets.mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise StateError(f"cannot create state directory {self.root}: {e.strerror}") from None

    def _atomic_write(self, directory: Path, name: str, data: bytes, point: str, mode: int = 0o644) -> None:
        tmp = directory / f".{name}.tmp.{os.getpid()}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            try:
                _write_all(fd, data)
                fault(f"{point}.write")
                os.fsync(fd)
                fault(f"{point}.fsync")
            finally:
                os.close(fd)
            os.rename(tmp, directory / name)
            fault(f"{point}.rename")
            _fsync_dir(directory)
            fault(f"{point}.dirsync")
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StateError(f"cannot write {directory / name}: {_reason(e)}") from None

    def _append_history(self, record: HistoryRecord) -> None:
        line = json.dumps(asdict(record), sort_keys=True, separators=(",", ":")) + "\n"
        try:
            fd = os.open(self.history_file, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    line = "\n" + line  # a crash tore the last record: do not glue onto it
                _write_all(fd, line.encode())
                fault("history.write")
                os.fsync(fd)
                fault("history.fsync")
            finally:
                os.close(fd)
        except OSError as e:
            raise StateError(f"cannot write {self.history_file}: {_reason(e)}") from None

    def _remove_temp_files(self) -> None:
        # Only called with the lock held: any temp file is a crashed writer's.
        for directory in (self.root, self.tables, self.secrets):
            with contextlib.suppress(OSError):
                for p in directory.glob(".*.tmp.*"):
                    p.unlink()


def slot_key(pool: str, backend: tablemod.Backend) -> str:
    return f"{pool}\x00{backend.id}\x00{backend.address}\x00{backend.port}"


def listener_key(name: str) -> str:
    """An HTTP listener's counters share the backends' slot space and record shape."""
    return f"\x01listener\x00{name}"


def replace_file(path: Path, data: bytes) -> None:
    """Write a runtime file (run/) whole, through a temporary file and a
    rename, so readers never see half of it. No fsync: run/ describes the
    processes of this boot, not state to keep across a crash."""
    temp = path.with_name(f".{path.name}-{os.getpid()}.part")
    try:
        temp.write_bytes(data)
        os.replace(temp, path)
    except OSError:
        temp.unlink(missing_ok=True)
        raise


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reason(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    if e.errno == errno.EROFS:
        return "the file system is read-only"
    return e.strerror or str(e)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
