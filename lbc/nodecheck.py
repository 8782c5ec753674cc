"""Should this node take traffic? The node check behind the admin API's
/healthz and the script keepalived runs (`python -m lbc.nodecheck`).

It reads only the state directory and shared memory (no supervisord call,
no heavy import), so keepalived can run it every half second, and it gives
the same answer when supervisord is gone but the workers serve on.

Rules, in order; the first that holds makes the node unavailable:
1. `lbc drain-node` drained it (run/drain exists): in-flight work goes on,
   new traffic should go elsewhere.
2. No table is installed.
3. Fewer workers serve the live table than the table asks for. A worker
   serves when its shared-memory record names the live version, its pid
   runs, and its heartbeat (published four times a second) is under
   WORKER_STALE_S old: a stopped or wedged worker does not count. For
   APPLY_GRACE_S after a table is installed, a live worker serving any
   table counts, and a slot no worker has started in yet is not asked for:
   an apply is being delivered (workers reload, a new worker starts), and a
   node check failing then would move a virtual IP, resetting every
   connection to it, on every apply. An apply the workers refuse is put
   back within its ack timeout, well inside the grace.
4. The health checker's heartbeat is over CHECKER_STALE_S old: backend
   verdicts are frozen. (Before its first heartbeat it is starting, which
   is not a reason.)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from lbc import shm
from lbc.errors import LbcError
from lbc.state import StateDir, replace_file
from lbc.table import worker_count

WORKER_STALE_S = 3.0
APPLY_GRACE_S = 20.0  # longer than apply's wait for the workers (10 s by default) and its revert
CHECKER_STALE_S = 10.0
DRAIN_FILE = "drain"  # in the state's run/ directory
PEERS_FILE = "peers.json"  # the other ha nodes as the health checker last probed them


@dataclass(frozen=True, slots=True)
class NodeHealth:
    version: str | None  # the live table
    wanted: int  # workers the table asks for
    running: int  # worker processes alive
    serving: int  # of those, serving the live table
    checker_age_s: float | None  # None before the checker's first heartbeat
    draining_since: float | None  # time.time() of `lbc drain-node`
    reason: str  # why not available; "" when it is

    @property
    def ok(self) -> bool:
        return not self.reason

    def as_json(self) -> dict:
        out = {"status": "ok" if self.ok else "unavailable", "version": self.version, "workers": self.running,
               "serving": self.serving, "checker_age_s": self.checker_age_s,
               "draining": self.draining_since is not None}
        if self.reason:
            out["reason"] = self.reason
        return out


def judge(version: str | None, wanted: int, workers: Sequence[shm.WorkerInfo], alive: Callable[[int], bool],
          checker_beat: float, draining_since: float | None, now: float, installed_at: float = 0.0) -> NodeHealth:
    """The rules above, on what was read. Pure."""
    running = [w for w in workers if w.pid and alive(w.pid) and now - w.heartbeat < WORKER_STALE_S]
    serving = sum(1 for w in running if w.version == version)
    if now - installed_at < APPLY_GRACE_S and serving < wanted:  # an apply is being delivered
        wanted = sum(1 for w in workers if w.started) or wanted
        serving = sum(1 for w in running if w.version)
    age = round(now - checker_beat, 3) if checker_beat else None
    if draining_since is not None:
        reason = "drained by lbc drain-node"
    elif version is None:
        reason = "no table is installed"
    elif serving < wanted:
        reason = f"{wanted - serving} of {wanted} workers do not serve {version[:12]}"
    elif age is not None and age > CHECKER_STALE_S:
        reason = f"the health checker's last heartbeat is {age:.0f} s old"
    else:
        reason = ""
    return NodeHealth(version, wanted, len(running), serving, age, draining_since, reason)


def check(state: StateDir) -> NodeHealth:
    """Read the node's state and judge it."""
    version, table = state.current_table()
    wanted = worker_count(table) if table is not None else 0
    workers: list[shm.WorkerInfo] = []
    beat = 0.0
    shm_file = state.run / "shm"
    if shm_file.exists():
        try:
            memory = shm.Shm(shm_file)
        except (shm.ShmError, ValueError) as e:  # ValueError: mmap of an empty file
            return NodeHealth(version, wanted, 0, 0, None, draining_since(state),
                              f"the shared memory cannot be read: {e}")
        try:
            workers = [memory.read_worker(slot) for slot in range(min(wanted, memory.max_workers))]
            beat, _ = memory.health_heartbeat()
        finally:
            memory.close()
    try:
        installed_at = state.current_file.stat().st_mtime
    except OSError:
        installed_at = 0.0
    return judge(version, wanted, workers, _alive, beat, draining_since(state), time.time(), installed_at)


def draining_since(state: StateDir) -> float | None:
    try:
        return json.loads((state.run / DRAIN_FILE).read_text())["since"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0  # there, but unreadable: still drained


def set_draining(state: StateDir, draining: bool) -> bool:
    """Drain (or undrain) the node; True when that changed anything."""
    path = state.run / DRAIN_FILE
    if not draining:
        try:
            path.unlink()
            return True
        except FileNotFoundError:
            return False
    if path.exists():
        return False
    try:
        state.run.mkdir(parents=True, exist_ok=True)
        replace_file(path, (json.dumps({"since": time.time(), "pid": os.getpid()}) + "\n").encode())
    except OSError as e:
        raise LbcError(f"cannot write {path}: {e.strerror}") from None
    return True


def write_peers(state: StateDir, peers: dict[str, dict]) -> None:
    replace_file(state.run / PEERS_FILE, (json.dumps(peers, sort_keys=True) + "\n").encode())


def read_peers(state: StateDir) -> dict[str, dict]:
    """name -> {admin, ok, error, latency_ms, checked}; {} without ha peers."""
    try:
        data = json.loads((state.run / PEERS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when the node should take traffic, 1 when not (keepalived's
    vrrp_script: the instance goes to FAULT and the virtual IP moves)."""
    parser = argparse.ArgumentParser(prog="python -m lbc.nodecheck", description=main.__doc__)
    parser.add_argument("--state", required=True, type=Path)
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    args = parser.parse_args(argv)
    try:
        health = check(StateDir(args.state))
    except (LbcError, OSError) as e:
        if not args.quiet:
            print(f"unavailable: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print("ok" if health.ok else f"unavailable: {health.reason}")
    return 0 if health.ok else 1


if __name__ == "__main__":
    sys.exit(main())
