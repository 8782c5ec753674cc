"""`lbc watch FILE`: apply a config file when it changes, and never a
half-written or an invalid one.

When something happens in the file's directory (or in the directory of a
file it names: certificates and keys), the watcher:

    waits for a quiet period (no event for `debounce`, 300 ms by default)
    reads the file (its real path again: a symlink may point elsewhere now)
    waits one more quiet period and reads it again:
        not identical            -> still being written: wait for quiet again
        same bytes and same files as the last read -> an unrelated event: nothing
    validates and compiles:
        invalid                  -> report it (located), keep serving the last good table
        same version as the last one the *watcher* applied -> nothing
                                    (not the live one: an API change is not undone
                                    by an unrelated event)
        destructive (removes a listener, or more than half of the enabled
        backends) without --allow-destructive -> held back, reported
        otherwise                -> applied through the same path as `lbc apply`

Filtering events by the file's name is not enough: a Kubernetes ConfigMap
swap only renames `..data_tmp` to `..data`. So every event in the watched
directories counts, and the file's real path, inode, size and sha256 decide.

What the watcher last did is written to `<state>/watch.json`, which
`lbc status` shows. A missing file is reported and retried, never a crash.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lbc import service
from lbc.config import check_document
from lbc.config.loader import parse_bytes
from lbc.errors import ConfigInvalid, LbcError
from lbc.state import StateDir, now_iso
from lbc.table import RoutingTable

RETRY_MISSING = 1.0  # seconds between looks for a missing file
MAX_FILE = 10 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One read of the config file and of the files it names."""

    data: bytes
    key: tuple  # (real path, inode, size, sha256) of the file, then (path, inode, size, mtime) of each named file


def destructive(old: RoutingTable | None, new: RoutingTable) -> str | None:
    """Why applying `new` over `old` should wait for a human, or None.
    Pure."""
    if old is None:
        return None
    gone = sorted({x.name for x in old.listeners} - {x.name for x in new.listeners})
    if gone:
        return f"it removes listener{'s' if len(gone) > 1 else ''} {', '.join(gone)}"
    enabled = {(p.name, b.id) for p in old.pools for b in p.backends if b.enabled}
    still = {(p.name, b.id) for p in new.pools for b in p.backends if b.enabled}
    lost = enabled - still
    if enabled and len(lost) * 2 > len(enabled):
        return f"it takes {len(lost)} of {len(enabled)} enabled backends out of service"
    return None


class Watcher:
    def __init__(self, file: Path, state: StateDir, *, debounce: float = 0.3, allow_destructive: bool = False,
                 argv: str = "lbc watch", lock_timeout: float = 30.0, say: Callable[[str], None] = print) -> None:
        self.file = Path(file)
        self.state = state
        self.debounce = debounce
        self.allow_destructive = allow_destructive
        self.argv = argv
        self.lock_timeout = lock_timeout
        self.say = say
        self.applied: str | None = None  # the version this watcher last applied (or found live at start)
        self.seen: tuple | None = None  # the key of the last snapshot it acted on
        self.named: tuple[Path, ...] = ()  # files the last good config named
        self._events = 0
        self.failures = 0  # reloads that did not happen: invalid, held, failed or missing files (for /metrics)
        self._cond = threading.Condition()
        self._stop = False

    # -- events (watchdog's thread) ------------------------------------------

    def notify(self, *_args) -> None:
        with self._cond:
            self._events += 1
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    # -- the loop (main thread) ---------------------------------------------------

    def run(self, observe: Callable[[list[Path]], Callable[[], None]]) -> None:
        """`observe(directories)` starts watching them (calling notify on any
        event) and returns a function that stops it."""
        # Watch first, then look: a save between the two is an event, not a change missed
        # until the next one.
        watched = self._directories()
        unwatch = observe(watched)
        seen = self._events
        self.check()  # at start: apply the file if the live table is not its table
        while True:
            wanted = self._directories()
            if wanted != watched:
                unwatch()
                unwatch = observe(wanted)
                watched = wanted
            with self._cond:
                # `seen` was taken before the last check: a save during it (an apply takes a
                # while) counts now, instead of waiting for the next one
                self._cond.wait_for(lambda seen=seen: self._stop or self._events != seen,
                                    timeout=None if self.seen is not None else RETRY_MISSING)
                if self._stop:
                    break
            self._quiet()
            seen = self._events
            self.check()
        unwatch()

    def _quiet(self) -> None:
        """Return once no event came for a whole debounce period."""
        while True:
            with self._cond:
                seen = self._events
                self._cond.wait_for(lambda seen=seen: self._stop or self._events != seen, timeout=self.debounce)
                if self._stop or self._events == seen:
                    return

    def _directories(self) -> list[Path]:
        dirs = {self.file.absolute().parent}
        with contextlib.suppress(OSError):
            dirs.add(self.file.resolve().parent)
        dirs.update(p.absolute().parent for p in self.named)
        return sorted(d for d in dirs if d.is_dir())

    # -- one look at the file ----------------------------------------------------------

    def check(self) -> None:
        first = self._read()
        if first is None:
            return
        time.sleep(self.debounce)
        second = self._read()
        if second is None or second.key != first.key or second.data != first.data:
            self.seen = None  # still being written: the next event (or retry) looks again
            return
        if first.key == self.seen:
            return  # an event elsewhere in the directory
        self.seen = first.key
        try:
            config = check_document(parse_bytes(first.data, str(self.file), directory=self.file.resolve().parent))
        except ConfigInvalid as e:
            self._record("invalid", "\n".join(str(d) for d in e.diagnostics))
            self.say(f"lbc watch: {self.file} is invalid; the live table stays:\n{e}")
            return
        self.named = tuple(Path(b.path) for b in config.files.values())
        self.seen = self._snapshot_key(first.data)
        compiled = service.Compiled.from_config(config)
        if compiled.version == self.applied:
            self._record("unchanged", "the file's table is the one the watcher applied last", compiled.version)
            return
        try:
            live_version, live = self.state.current_table()
            if self.applied is None and live_version == compiled.version:
                self.applied = live_version
                self._record("watching", "the live table is the file's", live_version)
                return
            why = None if self.allow_destructive else destructive(live, compiled.table)
            if why is not None:
                self._record("held", f"not applied: {why}; apply it by hand or run lbc watch --allow-destructive",
                             compiled.version)
                self.say(f"lbc watch: {self.file} held back: {why}")
                return
            result = service.apply(compiled, self.state, argv=self.argv, lock_timeout=self.lock_timeout, origin="watch")
        except LbcError as e:
            self._record("failed", str(e), compiled.version)
            self.say(f"lbc watch: applying {self.file} failed: {e}")
            return
        self.applied = compiled.version
        self._record("applied", result.plan.summary(), compiled.version)
        self.say(f"lbc watch: applied {compiled.version[:12]} from {self.file}: {result.plan.summary()}")

    def _read(self) -> Snapshot | None:
        try:
            real = self.file.resolve(strict=True)
            with open(real, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read(MAX_FILE + 1)
        except OSError as e:
            self.seen = None
            self._record("missing", f"cannot read {self.file}: {e.strerror}; retrying")
            return None
        if len(data) > MAX_FILE:
            self._record("invalid", f"{self.file} is larger than 10 MiB")
            return None
        key = (str(real), st.st_ino, st.st_size, hashlib.sha256(data).hexdigest())
        return Snapshot(data, key + self._named_key())

    def _named_key(self) -> tuple:
        out = []
        for p in self.named:
            try:
                st = p.stat()
                out.append((str(p), st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                out.append((str(p), None))
        return tuple(out)

    def _snapshot_key(self, data: bytes) -> tuple:
        real = self.file.resolve()
        st = real.stat()
        return (str(real), st.st_ino, st.st_size, hashlib.sha256(data).hexdigest()) + self._named_key()

    def _record(self, state: str, message: str, version: str | None = None) -> None:
        if state in FAILED:
            self.failures += 1
        record = {"file": str(self.file), "state": state, "message": message, "version": version,
                  "time": now_iso(), "pid": os.getpid(), "failures": self.failures}
        with contextlib.suppress(OSError):
            self.state.write_watch_status(record)


FAILED = frozenset({"invalid", "held", "failed", "missing"})  # the file's intent is not live


def observer(notify: Callable[..., None]) -> Callable[[list[Path]], Callable[[], None]]:
    """Adapter: watchdog watching directories (not recursively), calling
    `notify` on every event. inotify limits become a clear LbcError."""
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event) -> None:
            notify()

    def observe(directories: list[Path]) -> Callable[[], None]:
        obs = Observer()
        handler = Handler()
        for d in directories:
            obs.schedule(handler, str(d), recursive=False)
        try:
            obs.start()
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise LbcError("too many inotify watches: raise the sysctl fs.inotify.max_user_watches") from None
            if e.errno == errno.EMFILE:
                raise LbcError("too many inotify instances: raise the sysctl fs.inotify.max_user_instances") from None
            raise LbcError(f"cannot watch {', '.join(map(str, directories))}: {e.strerror}") from None

        def stop() -> None:
            obs.stop()
            obs.join(5)

        return stop

    return observe
