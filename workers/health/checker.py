"""The health checker process: probes every enabled backend of every pool that
has a health check, runs each backend's state machine (machine.py), and
publishes the verdicts in the shared-memory health overlay (lbc.shm), where
every worker reads them without a syscall.

- Each backend has its own probe loop: the first probe comes at once (after
  a jitter of at most 10% of the interval, so a thousand backends are not
  probed in the same millisecond), then one per interval, each interval
  jittered by at most 10%.
- A verdict change bumps the overlay's generation; workers poll it a few
  dozen times a second and rebuild their eligible lists when it moves.
- A heartbeat goes into the overlay four times a second; workers stop
  trusting verdicts older than three intervals (see machine.eligible).
- Host names are resolved here, never per request and never at compile time:
  again every DNS_TTL seconds, for every backend written as a name (also in
  pools without a health check), and published with the verdicts; workers
  connect to the published address. A name that stops resolving fails its
  probes and so becomes unhealthy.
- On SIGHUP the checker reads the live table: new backends start unknown
  and are probed at once, removed ones are forgotten, unchanged ones keep
  their state and counters. Started afresh (supervisord restarts it), it
  continues from the states in the overlay, so a restart flips nothing.
- With global.ha, it also probes the other nodes' admin API /healthz (those
  with `admin` set) once per check_interval and writes what it saw to
  run/peers.json for `lbc status`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lbc_workers.health.machine import NAMES, UNKNOWN, Health, Thresholds, observe
from lbc_workers.health.probes import Prober
from lbc_workers.proxy.tls import client_context

from lbc import keepalived, nodecheck
from lbc import shm as shmmod
from lbc.config.addresses import address_kind, parse_bind
from lbc.errors import LbcError
from lbc.state import StateDir, slot_key
from lbc.table import Backend, HaNode, HealthCheck, HighAvailability, Pool, RoutingTable, TableError

log = logging.getLogger("lbc.health")
DNS_TTL = 30.0  # seconds a resolved name is used before it is resolved again
HEARTBEAT_EVERY = 0.25
JITTER = 0.1  # at most this share of the interval


@dataclass(slots=True)
class Target:
    key: str
    slot: int
    pool: Pool
    backend: Backend
    health: Health
    prober: Prober | None  # None: the pool has no check, the name is only resolved
    task: asyncio.Task | None = None
    resolved: str | None = None
    resolved_at: float = -1e9

    @property
    def check(self) -> HealthCheck | None:
        return self.pool.health_check


class Checker:
    def __init__(self, state: StateDir, loop: asyncio.AbstractEventLoop) -> None:
        self.state = state
        self.loop = loop
        self.shm = shmmod.Shm(state.run / "shm", writable=True)
        self.targets: dict[str, Target] = {}
        self.rng = random.Random()
        self.stopped = asyncio.Event()
        self._reloading = asyncio.Lock()
        self.peers: dict[str, asyncio.Task] = {}  # other ha nodes' names -> their probe loops
        self.peer_spec: tuple = ()  # what the loops were started for
        self.peer_results: dict[str, dict] = {}

    async def reload(self) -> None:
        async with self._reloading:
            try:
                version, table = self.state.current_table()
                slots = self.state.slots()
            except (LbcError, TableError) as e:
                log.error("cannot read the live table: %s", e)
                return
            if table is None:
                return
            wanted: dict[str, tuple[Pool, Backend]] = {}
            for pool in table.pools:
                for b in pool.backends:
                    if b.enabled and (pool.health_check is not None or address_kind(b.address) == "hostname"):
                        wanted[slot_key(pool.name, b)] = (pool, b)
            for key in [k for k in self.targets if k not in wanted]:
                self._forget(self.targets.pop(key))
            for key, (pool, backend) in wanted.items():
                target = self.targets.get(key)
                if (target is not None and target.pool.health_check == pool.health_check and target.backend == backend
                        and target.pool.tls == pool.tls):
                    target.pool = pool
                    continue
                if target is not None:  # how to probe it changed: same state, new probe settings
                    self._forget(target)
                    health = target.health
                else:
                    health = self._persisted(slots[key])
                target = Target(key, slots[key], pool, backend, health, self._prober(pool, backend))
                self.targets[key] = target
                target.task = self.loop.create_task(self._run(target))
            log.info("checking %d backends of table %s", len(self.targets), version[:12])
            self._follow_peers(table)

    def _follow_peers(self, table: RoutingTable) -> None:
        """Probe the other ha nodes' /healthz: the ones the table names now."""
        ha = table.settings.ha
        peers: tuple[HaNode, ...] = ()
        if ha is not None:
            try:
                name = self.state.run / "ha-node"
                me = keepalived.this_node(ha, name.read_text().strip() if name.exists() else None)
                peers = tuple(n for n in ha.nodes if n.name != me.name and n.admin)
            except (LbcError, OSError) as e:
                log.warning("not probing the other ha nodes: %s", e)
        spec = (peers, ha.check_interval_ms if ha else 0)
        if spec == self.peer_spec:
            return
        for task in self.peers.values():
            task.cancel()
        self.peers.clear()
        self.peer_results.clear()
        self.peer_spec = spec
        for node in peers:
            self.peers[node.name] = self.loop.create_task(self._probe_peer(node, ha))
        self._write_peers()

    async def _probe_peer(self, node: HaNode, ha: HighAvailability) -> None:
        host, port = parse_bind(node.admin)
        interval = ha.check_interval_ms
        check = HealthCheck("http", "/healthz", "GET", None, ((200, 200),), None, None, interval, interval // 2, 1, 1)
        prober = Prober(check, host, port, f"node {node.name}", None)
        try:
            while True:
                passed, latency, error = await prober.probe(host)
                self.peer_results[node.name] = {"admin": node.admin, "ok": passed, "error": error,
                                                "latency_ms": round(latency, 1), "checked": time.time()}
                self._write_peers()
                await asyncio.sleep(interval / 1000)
        finally:
            prober.close()

    def _write_peers(self) -> None:
        try:
            nodecheck.write_peers(self.state, self.peer_results)
        except OSError as e:
            log.warning("cannot write the peers' state: %s", e)

    def _persisted(self, slot: int) -> Health:
        """What an earlier run of the checker published: go on from there."""
        info = self.shm.read_health(slot)
        if not info.checked or info.state not in NAMES or (info.successes and info.failures):
            return Health()
        return Health(info.state, info.successes, info.failures)

    def _prober(self, pool: Pool, backend: Backend) -> Prober | None:
        if pool.health_check is None:
            return None
        tls = client_context(pool.tls, self.state.secrets) if pool.tls else None  # as the workers connect
        return Prober(pool.health_check, backend.address, backend.port, backend.id, backend.health_check_path,
                      tls, pool.tls.sni or backend.address if pool.tls else None)

    def _forget(self, target: Target) -> None:
        if target.task is not None:
            target.task.cancel()
        if target.prober is not None:
            target.prober.close()

    async def _run(self, t: Target) -> None:
        check = t.check
        interval = check.interval_ms / 1000 if check else DNS_TTL
        await asyncio.sleep(self.rng.uniform(0, JITTER) * interval)
        thresholds = Thresholds(check.healthy_threshold, check.unhealthy_threshold) if check else None
        while True:
            started = self.loop.time()
            address = await self._resolve(t)
            if check is None:
                self._publish(t, t.health, 0.0, "" if address else "name does not resolve", address, changed=False)
            else:
                if address is None:
                    passed, latency, error = False, 0.0, f"{t.backend.address} does not resolve"
                else:
                    passed, latency, error = await t.prober.probe(address)
                before = t.health
                t.health = observe(before, passed, thresholds)
                self._publish(t, t.health, latency, error, address, changed=t.health.state != before.state)
                if t.health.state != before.state:
                    log.info("backend %s of pool %s: %s -> %s (%s)", t.backend.id, t.pool.name,
                             NAMES[before.state], NAMES[t.health.state], error or "probe passed")
            pause = interval * (1 + self.rng.uniform(-JITTER, JITTER))
            await asyncio.sleep(max(0.0, started + pause - self.loop.time()))

    def _publish(self, t: Target, h: Health, latency: float, error: str, address: str | None, changed: bool) -> None:
        published = address if address and address != t.backend.address else ""
        old = self.shm.read_health(t.slot)
        self.shm.write_health(t.slot, shmmod.HealthInfo(
            state=h.state if t.check else UNKNOWN, checked=t.check is not None, successes=h.successes,
            failures=h.failures, last_check=time.time(), latency_ms=latency, address=published, error=error,
            failed_total=old.failed_total + (1 if error else 0)))
        if changed or old.address != published:
            self.shm.bump_health_generation()

    async def _resolve(self, t: Target) -> str | None:
        address = t.backend.address
        if address_kind(address) != "hostname":
            return address
        now = self.loop.time()
        if now - t.resolved_at < DNS_TTL:
            return t.resolved
        t.resolved_at = now
        try:
            infos = await self.loop.getaddrinfo(address, t.backend.port, type=socket.SOCK_STREAM)
            t.resolved = infos[0][4][0]
        except (socket.gaierror, OSError, IndexError):
            t.resolved = None
        return t.resolved

    async def heartbeat(self) -> None:
        pid = os.getpid()
        while not self.stopped.is_set():
            self.shm.write_health_heartbeat(pid)
            await asyncio.sleep(HEARTBEAT_EVERY)

    def stop(self) -> None:
        for target in self.targets.values():
            self._forget(target)
        for task in self.peers.values():
            task.cancel()
        self.stopped.set()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lbc_workers.health")
    parser.add_argument("--state", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s health[%(process)d] %(levelname)s %(message)s")
    import uvloop

    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    checker = Checker(StateDir(args.state), loop)
    (checker.state.run / "health.pid").write_text(f"{os.getpid()}\n")
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(checker.reload()))
    loop.add_signal_handler(signal.SIGTERM, checker.stop)
    loop.add_signal_handler(signal.SIGINT, checker.stop)

    async def run() -> None:
        await checker.reload()
        beat = loop.create_task(checker.heartbeat())
        await checker.stopped.wait()
        beat.cancel()

    try:
        loop.run_until_complete(run())
    finally:
        pid_file = checker.state.run / "health.pid"
        with contextlib.suppress(OSError, ValueError):
            if int(pid_file.read_text()) == os.getpid():  # not a successor's
                pid_file.unlink()
    return 0
