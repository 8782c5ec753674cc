"""The shared-memory layout: one mmap'd file, `<state>/run/shm`, created by
`lbc up`, read by `lbc status` and `lbc apply`, written by the workers.

Python has no cross-process compare-and-swap, so every region has exactly one
writer: each worker writes only its own region; readers sum over regions.

    header        4096 bytes   magic, layout version, sizes, node-wide settings
    worker 0      WORKER_BYTES header + BACKEND_BYTES x max_backends
    worker 1      ...
    ...

A worker's header (pid, the version it serves, the version it last tried and
why that failed) changes on reloads and is read by `lbc apply` waiting for
acks; it is written under a seqlock (the writer makes `seq` odd, writes, makes
it even; a reader retries until it sees the same even value on both sides).
Backend counters are plain 8-byte integers, published a few times a second;
a reader may see one slightly stale, never a torn record header.

Backend counters are indexed by slot. Slots are keyed by backend identity
(pool, id, address, port) and allocated when a table is installed (see
lbc.state), so workers that switch tables at different moments agree on them,
and counters carry across swaps.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"LBCSHM\x00\x01"
LAYOUT = 1
HEADER_BYTES = 4096
MAX_WORKERS = 64
MAX_BACKENDS = 32768

# magic, layout, max_workers, max_backends, worker_bytes, drain_override_ms
_HEADER = struct.Struct("<8sIIIQq")
# seq, pid, started, heartbeat, state, generation, version, attempted, error, connections, requests
_WORKER = struct.Struct("<QqddiQ64s64s256sqQ")
WORKER_BYTES = 512
assert _WORKER.size <= WORKER_BYTES
# active, requests, failures, bytes_in, bytes_out
BACKEND = struct.Struct("<qQQQQ")
BACKEND_BYTES = BACKEND.size

EMPTY, STARTING, SERVING, DRAINING = 0, 1, 2, 3
STATE_NAMES = {EMPTY: "empty", STARTING: "starting", SERVING: "serving", DRAINING: "draining"}


class ShmError(Exception):
    pass


def region_bytes(max_backends: int) -> int:
    return WORKER_BYTES + BACKEND_BYTES * max_backends


def create(path: Path, max_workers: int = MAX_WORKERS, max_backends: int = MAX_BACKENDS) -> None:
    """Create (or reset) the file. Sparse: untouched regions cost no memory."""
    size = HEADER_BYTES + max_workers * region_bytes(max_backends)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.truncate(size)
        f.seek(0)
        f.write(_HEADER.pack(MAGIC, LAYOUT, max_workers, max_backends, region_bytes(max_backends), -1))
    os.replace(tmp, path)


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    slot: int
    pid: int
    started: float
    heartbeat: float
    state: int
    generation: int
    version: str  # the table it serves ("" before its first)
    attempted: str  # the table it last tried to load
    error: str  # why `attempted` failed, if it did
    connections: int
    requests: int

    @property
    def state_name(self) -> str:
        return STATE_NAMES.get(self.state, "?")


@dataclass(frozen=True, slots=True)
class BackendCounters:
    active: int = 0
    requests: int = 0
    failures: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    def __add__(self, other: BackendCounters) -> BackendCounters:
        return BackendCounters(*(a + b for a, b in zip(self._tuple(), other._tuple(), strict=True)))

    def _tuple(self) -> tuple[int, ...]:
        return (self.active, self.requests, self.failures, self.bytes_in, self.bytes_out)


class Shm:
    """A mapping of the file; readers and writers both use it."""

    def __init__(self, path: Path, *, writable: bool = False) -> None:
        try:
            fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        except OSError as e:
            raise ShmError(f"cannot open {path}: {e.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            self.map = mmap.mmap(fd, size, access=access)
        finally:
            os.close(fd)
        magic, layout, self.max_workers, self.max_backends, self.worker_bytes, _ = _HEADER.unpack_from(self.map, 0)
        if magic != MAGIC or layout != LAYOUT:
            raise ShmError(f"{path} is not an lbc shared memory file of layout {LAYOUT}")

    def close(self) -> None:
        self.map.close()

    def _worker_offset(self, slot: int) -> int:
        if not 0 <= slot < self.max_workers:
            raise ShmError(f"worker slot {slot} out of range")
        return HEADER_BYTES + slot * self.worker_bytes

    # -- node-wide ------------------------------------------------------------

    def drain_override_ms(self) -> int | None:
        value = _HEADER.unpack_from(self.map, 0)[5]
        return None if value < 0 else value

    def set_drain_override_ms(self, ms: int | None) -> None:
        struct.pack_into("<q", self.map, _HEADER.size - 8, -1 if ms is None else ms)

    # -- a worker's own region (one writer) -----------------------------------

    def write_worker(self, slot: int, **fields: object) -> None:
        """Update some fields of a worker's header under the seqlock."""
        off = self._worker_offset(slot)
        current = list(_WORKER.unpack_from(self.map, off))
        names = _WORKER_FIELDS
        seq = current[0]
        struct.pack_into("<Q", self.map, off, seq + 1)  # odd: writing
        for name, value in fields.items():
            i = names.index(name)
            if isinstance(value, str):
                value = value.encode("utf-8", "replace")[: _WORKER_STR_LEN[name]]
            current[i] = value
        current[0] = seq + 1
        _WORKER.pack_into(self.map, off, *current)
        struct.pack_into("<Q", self.map, off, seq + 2)  # even: done

    def write_backend(self, worker: int, slot: int, counters: tuple[int, int, int, int, int]) -> None:
        BACKEND.pack_into(self.map, self._worker_offset(worker) + WORKER_BYTES + slot * BACKEND_BYTES, *counters)

    def backend_writer(self, worker: int):
        """A fast writer for one worker's counters: f(slot, active, requests, failures, bytes_in, bytes_out)."""
        base = self._worker_offset(worker) + WORKER_BYTES
        pack, m = BACKEND.pack_into, self.map

        def write(slot: int, *counters: int) -> None:
            pack(m, base + slot * BACKEND_BYTES, *counters)

        return write

    def clear_worker(self, slot: int) -> None:
        off = self._worker_offset(slot)
        self.map[off : off + self.worker_bytes] = bytes(self.worker_bytes)

    # -- readers ----------------------------------------------------------------

    def read_worker(self, slot: int) -> WorkerInfo:
        off = self._worker_offset(slot)
        for _ in range(1000):
            before = struct.unpack_from("<Q", self.map, off)[0]
            values = _WORKER.unpack_from(self.map, off)
            after = struct.unpack_from("<Q", self.map, off)[0]
            if before == after and not before & 1:
                break
            time.sleep(0.0005)
        else:
            raise ShmError(f"worker {slot}'s region stays busy")
        _, pid, started, heartbeat, state, generation, version, attempted, error, conns, reqs = values
        return WorkerInfo(
            slot, pid, started, heartbeat, state, generation,
            _text(version), _text(attempted), _text(error), conns, reqs,
        )

    def read_backend(self, worker: int, slot: int) -> BackendCounters:
        off = self._worker_offset(worker) + WORKER_BYTES + slot * BACKEND_BYTES
        return BackendCounters(*BACKEND.unpack_from(self.map, off))

    def backend_totals(self, slot: int, workers: range | list[int] | None = None) -> BackendCounters:
        total = BackendCounters()
        for w in workers if workers is not None else range(self.max_workers):
            total = total + self.read_backend(w, slot)
        return total


_WORKER_FIELDS = (
    "seq", "pid", "started", "heartbeat", "state", "generation",
    "version", "attempted", "error", "connections", "requests",
)
_WORKER_STR_LEN = {"version": 64, "attempted": 64, "error": 256}


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\x00").decode("utf-8", "replace")
