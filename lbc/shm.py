"""The shared-memory layout: one mmap'd file, `<state>/run/shm`, created by
`lbc up`, read by `lbc status` and `lbc apply`, written by the workers.

Python has no cross-process compare-and-swap, so every region has exactly one
writer: each worker writes only its own region; readers sum over regions.

    header        4096 bytes   magic, layout version, sizes, node-wide settings
    worker 0      WORKER_BYTES header + BACKEND_BYTES x max_backends
    worker 1      ...
    ...
    health        HEALTH_HEADER_BYTES + HEALTH_BYTES x max_backends   (the health overlay)

A worker's header (pid, the version it serves, the version it last tried and
why that failed) changes on reloads and is read by `lbc apply` waiting for
acks; it is written under a seqlock (the writer makes `seq` odd, writes, makes
it even; a reader retries until it sees the same even value on both sides).
Backend counters are plain 8-byte integers, published a few times a second;
a reader may see one slightly stale, never a torn record header.

The health overlay has one writer, the health checker: a header (a
generation counter bumped on every verdict change, and a heartbeat) and a
record per backend slot (state, consecutive successes and failures, last
probe time and latency, the address a host name resolved to, the last
error). Workers poll the generation a few dozen times a second and rebuild
their eligible lists only when it moves; the state byte is read directly.

Backend counters and health records are indexed by slot. Slots are keyed by backend identity
(pool, id, address, port) and allocated when a table is installed (see
lbc.state), so workers that switch tables at different moments agree on them,
and counters carry across swaps.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from lbc.errors import StateError

MAGIC = b"LBCSHM\x00\x01"
LAYOUT = 3
HEADER_BYTES = 4096
MAX_WORKERS = 64
MAX_BACKENDS = 32768

# magic, layout, max_workers, max_backends, worker_bytes, drain_override_ms
_HEADER = struct.Struct("<8sIIIQq")
# seq, pid, started, heartbeat, state, generation, version, attempted, error, connections, requests,
# reloads_ok, reloads_failed, rejected (bad requests answered 4xx and closed), store_errors (sticky store)
_WORKER = struct.Struct("<QqddiQ64s64s256sqQQQQQ")
WORKER_BYTES = 512
assert _WORKER.size <= WORKER_BYTES
# Backend response time histogram: upper bounds in seconds (the last bucket is +Inf).
LATENCY_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# active, requests, failures, bytes_in, bytes_out, responses by class (1xx..5xx), retries, ejections,
# response time sum (microseconds), responses timed, then one count per latency bucket (not cumulative)
BACKEND = struct.Struct("<qQQQQ" + "Q" * 5 + "QQ" + "QQ" + "Q" * (len(LATENCY_BOUNDS) + 1))
BACKEND_BYTES = BACKEND.size
COUNTERS = len(BACKEND.format) - 1

# seq, generation, heartbeat, pid
_HEALTH_HEADER = struct.Struct("<QQdq")
HEALTH_HEADER_BYTES = 64
# state, family (0 none, 4, 6), flags, successes, failures, last_check, latency_ms, address, error,
# failed probes so far
_HEALTH = struct.Struct("<BBHIIdf16s80sQ")
HEALTH_BYTES = 128
assert _HEALTH.size == HEALTH_BYTES
HEALTH_CHECKED = 1  # flags: the checker probes this backend (its pool has a health check)

EMPTY, STARTING, SERVING, DRAINING = 0, 1, 2, 3
STATE_NAMES = {EMPTY: "empty", STARTING: "starting", SERVING: "serving", DRAINING: "draining"}


class ShmError(StateError):
    pass


def region_bytes(max_backends: int) -> int:
    return WORKER_BYTES + BACKEND_BYTES * max_backends


def create(path: Path, max_workers: int = MAX_WORKERS, max_backends: int = MAX_BACKENDS) -> None:
    """Create (or reset) the file. Sparse: untouched regions cost no memory."""
    size = HEADER_BYTES + max_workers * region_bytes(max_backends) + HEALTH_HEADER_BYTES + HEALTH_BYTES * max_backends
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
    reloads_ok: int = 0
    reloads_failed: int = 0
    rejected: int = 0
    store_errors: int = 0

    @property
    def state_name(self) -> str:
        return STATE_NAMES.get(self.state, "?")


@dataclass(frozen=True, slots=True)
class HealthInfo:
    state: int  # lbc_workers.health.machine: 0 unknown, 1 healthy, 2 unhealthy
    checked: bool
    successes: int
    failures: int
    last_check: float  # time.time(), 0 before the first probe
    latency_ms: float
    address: str  # what a host name resolved to ("" for addresses, or unresolved)
    error: str
    failed_total: int = 0  # failed probes since the checker started


@dataclass(frozen=True, slots=True)
class BackendCounters:
    """One backend's counters (one worker's, or summed); the order is BACKEND's."""

    values: tuple[int, ...] = (0,) * COUNTERS

    active = property(lambda self: self.values[0])
    requests = property(lambda self: self.values[1])
    failures = property(lambda self: self.values[2])
    bytes_in = property(lambda self: self.values[3])
    bytes_out = property(lambda self: self.values[4])
    by_class = property(lambda self: self.values[5:10])  # responses 1xx .. 5xx
    retries = property(lambda self: self.values[10])
    ejections = property(lambda self: self.values[11])
    latency_sum_s = property(lambda self: self.values[12] / 1e6)
    latency_count = property(lambda self: self.values[13])
    buckets = property(lambda self: self.values[14:])  # per LATENCY_BOUNDS and +Inf, not cumulative

    def __add__(self, other: BackendCounters) -> BackendCounters:
        return BackendCounters(tuple(a + b for a, b in zip(self.values, other.values, strict=True)))


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
        self.health_offset = HEADER_BYTES + self.max_workers * self.worker_bytes
        self.health_records = self.health_offset + HEALTH_HEADER_BYTES

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

    def write_backend(self, worker: int, slot: int, counters: tuple[int, ...]) -> None:
        BACKEND.pack_into(self.map, self._worker_offset(worker) + WORKER_BYTES + slot * BACKEND_BYTES, *counters)

    def backend_writer(self, worker: int):
        """A fast writer for one worker's counters: f(slot, *counters) in BACKEND's order."""
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
        _, pid, started, heartbeat, state, generation, version, attempted, error, *counts = values
        return WorkerInfo(slot, pid, started, heartbeat, state, generation,
                          _text(version), _text(attempted), _text(error), *counts)

    def read_backend(self, worker: int, slot: int) -> BackendCounters:
        off = self._worker_offset(worker) + WORKER_BYTES + slot * BACKEND_BYTES
        return BackendCounters(BACKEND.unpack_from(self.map, off))

    def backend_totals(self, slot: int, workers: range | list[int] | None = None) -> BackendCounters:
        total = BackendCounters()
        for w in workers if workers is not None else range(self.max_workers):
            total = total + self.read_backend(w, slot)
        return total


    # -- the health overlay (one writer: the checker) ---------------------------

    def health_generation(self) -> int:
        return struct.unpack_from("<Q", self.map, self.health_offset + 8)[0]

    def health_heartbeat(self) -> tuple[float, int]:
        """(time.time() of the checker's last heartbeat, its pid)."""
        _, _, beat, pid = _HEALTH_HEADER.unpack_from(self.map, self.health_offset)
        return beat, pid

    def write_health_heartbeat(self, pid: int) -> None:
        struct.pack_into("<dq", self.map, self.health_offset + 16, time.time(), pid)

    def bump_health_generation(self) -> None:
        off = self.health_offset + 8
        struct.pack_into("<Q", self.map, off, struct.unpack_from("<Q", self.map, off)[0] + 1)

    def health_state(self, slot: int) -> int:
        """The state byte alone: what a worker reads for each member."""
        return self.map[self.health_records + slot * HEALTH_BYTES]

    def read_health(self, slot: int) -> HealthInfo:
        state, family, flags, ok, bad, last, latency, addr, error, failed = _HEALTH.unpack_from(
            self.map, self.health_records + slot * HEALTH_BYTES)
        return HealthInfo(state, bool(flags & HEALTH_CHECKED), ok, bad, last, latency,
                          _unpack_address(family, addr), _text(error), failed)

    def write_health(self, slot: int, info: HealthInfo) -> None:
        family, packed = _pack_address(info.address)
        _HEALTH.pack_into(self.map, self.health_records + slot * HEALTH_BYTES, info.state, family,
                          HEALTH_CHECKED if info.checked else 0, info.successes, info.failures, info.last_check,
                          info.latency_ms, packed, info.error.encode("utf-8", "replace")[:80], info.failed_total)


def _pack_address(address: str) -> tuple[int, bytes]:
    if not address:
        return 0, b""
    if ":" in address:
        return 6, socket.inet_pton(socket.AF_INET6, address)
    return 4, socket.inet_pton(socket.AF_INET, address)


def _unpack_address(family: int, packed: bytes) -> str:
    if family == 4:
        return socket.inet_ntop(socket.AF_INET, packed[:4])
    if family == 6:
        return socket.inet_ntop(socket.AF_INET6, packed[:16])
    return ""


_WORKER_FIELDS = (
    "seq", "pid", "started", "heartbeat", "state", "generation",
    "version", "attempted", "error", "connections", "requests",
    "reloads_ok", "reloads_failed", "rejected", "store_errors",
)
_WORKER_STR_LEN = {"version": 64, "attempted": 64, "error": 256}


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\x00").decode("utf-8", "replace")
