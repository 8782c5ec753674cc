"""The worker's view of one routing table: listeners with compiled routes,
pools with their balancers, and backend runtimes with live counters.

A reload builds a new Router beside the old one and the worker flips one
reference. Backend runtimes are keyed by identity (pool, id, address, port)
and carried from the old Router to the new one, so active counts, counters,
pooled connections and the smooth-round-robin state survive a swap; so does
each pool's balancer while its algorithm stays the same. A request (or a TCP
connection, or a UDP session) holds the Router it started with.
"""

from __future__ import annotations

import math
import random
import re
from bisect import bisect_left
from collections.abc import Callable, Iterable
from pathlib import Path

from lbc_workers import balance
from lbc_workers.health.machine import HEALTHY, UNHEALTHY, eligible
from lbc_workers.proxy.accesslog import Where
from lbc_workers.proxy.h1 import HeadRules, Request, ResponseRules
from lbc_workers.proxy.tls import CertificateChooser, client_context
from lbc_workers.sticky import Affinity, cookie_values

from lbc import table as tablemod
from lbc.config.addresses import address_kind
from lbc.shm import LATENCY_BOUNDS
from lbc.state import listener_key, slot_key

BindKey = tuple[str, str, int]  # transport ("tcp" or "udp"), host, port: Listener.socket_key

class BackendRuntime:
    """One backend as this worker sees it; also a balance.Member."""

    __slots__ = (
        "key", "id", "pool", "address", "port", "weight", "limit", "enabled", "slot",
        "active", "swrr", "requests", "failures", "bytes_in", "bytes_out",
        "idle", "conns", "removed_at", "drain_ms", "connect_address", "hostname",
        "outlier", "consecutive_failures", "ejected_until", "ejections", "unhealthy", "checked_state",
        "by_class", "retries", "ejected_total", "latency_us", "timed", "buckets", "log_id",
    )

    def __init__(self, key: str, pool: str, spec: tablemod.Backend, slot: int) -> None:
        self.key = key
        self.pool = pool
        self.id = spec.id
        self.log_id = spec.id.encode()  # as access logs write it
        self.address = spec.address
        self.port = spec.port
        self.slot = slot
        self.active = 0
        self.swrr = 0
        self.requests = self.failures = self.bytes_in = self.bytes_out = 0
        # For /metrics: responses by status class (1xx..5xx), retries away from this backend,
        # passive ejections, and response times (to the response head) per LATENCY_BOUNDS bucket.
        self.by_class = [0, 0, 0, 0, 0]
        self.retries = self.ejected_total = self.latency_us = self.timed = 0
        self.buckets = [0] * (len(LATENCY_BOUNDS) + 1)
        self.idle: list = []  # pooled idle upstream connections (LIFO)
        # Every open connection to this backend (HTTP: pooled idle ones too;
        # added when it opens, not per request): a drain that runs out cuts them.
        self.conns: set = set()
        self.removed_at: float | None = None  # set while it drains (removed, disabled or unhealthy)
        self.drain_ms = 0
        # A host name is connected to at the address the checker published.
        self.hostname = address_kind(spec.address) == "hostname"
        self.connect_address = "" if self.hostname else spec.address
        # Passive health: this worker's own view.
        self.consecutive_failures = 0
        self.ejected_until = 0.0
        self.ejections = 0
        self.unhealthy = False  # the checker says so: no new traffic, drained
        self.checked_state = 0  # the checker's last state seen (machine.UNKNOWN)
        self.update(spec, 1, 0, None)

    def update(self, spec: tablemod.Backend, workers: int, drain_ms: int,
               outlier: tablemod.OutlierDetection | None) -> None:
        self.weight = spec.weight
        self.enabled = spec.enabled
        # max_connections is per node; with N workers and no shared counter,
        # each worker takes ceil(max/N).
        self.limit = math.ceil(spec.max_connections / workers) if spec.max_connections else 0
        self.drain_ms = drain_ms
        self.outlier = outlier
        self.removed_at = None

    def counters(self) -> tuple[int, ...]:
        """In lbc.shm.BACKEND's order."""
        return (self.active, self.requests, self.failures, self.bytes_in, self.bytes_out, *self.by_class,
                self.retries, self.ejected_total, self.latency_us, self.timed, *self.buckets)

    def timed_response(self, seconds: float, status_digit: int) -> None:
        """A response head from this backend, `seconds` after the request went out."""
        if 49 <= status_digit <= 53:  # b"1" .. b"5"
            self.by_class[status_digit - 49] += 1
        self.latency_us += int(seconds * 1e6)
        self.timed += 1
        self.buckets[bisect_left(LATENCY_BOUNDS, seconds)] += 1


class ListenerStats:
    """An HTTP listener's answers, in lbc.shm.BACKEND's record shape:
    requests, bytes sent, responses by status class, and the time from the
    request head to the end of the response."""

    __slots__ = ("slot", "requests", "sent", "by_class", "latency_us", "timed", "buckets")

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.requests = self.sent = self.latency_us = self.timed = 0
        self.by_class = [0, 0, 0, 0, 0]
        self.buckets = [0] * (len(LATENCY_BOUNDS) + 1)

    def answered(self, status: int, sent: int, seconds: float) -> None:
        self.requests += 1
        self.sent += sent
        if 100 <= status < 600:
            self.by_class[status // 100 - 1] += 1
        self.latency_us += int(seconds * 1e6)
        self.timed += 1
        self.buckets[bisect_left(LATENCY_BOUNDS, seconds)] += 1

    def counters(self) -> tuple[int, ...]:
        return (0, self.requests, 0, 0, self.sent, *self.by_class, 0, 0, self.latency_us, self.timed, *self.buckets)


class PoolRuntime:
    __slots__ = ("name", "spec", "balancer", "backends", "enabled", "members", "hash_key", "trust_s", "ssl", "sni",
                 "affinity")

    def __init__(self, spec: tablemod.Pool, backends: tuple[BackendRuntime, ...], balancer: balance.Balancer,
                 secrets: Path, node_secret: Callable[[], bytes] | None = None) -> None:
        self.name = spec.name
        self.affinity = _affinity(spec, secrets, node_secret) if spec.sticky else None
        # Re-encryption: connections to these backends speak TLS.
        self.ssl = client_context(spec.tls, secrets) if spec.tls else None
        self.sni = spec.tls.sni if spec.tls else None
        self.spec = spec
        self.backends = backends
        self.enabled = tuple(b for b in backends if b.enabled)
        self.members = tuple(b for b in self.enabled if b.connect_address)  # until refresh() knows better
        self.balancer = balancer
        self.hash_key = spec.hash_key
        # The checker's verdicts are trusted while its heartbeat is fresher than three intervals.
        self.trust_s = 3 * spec.health_check.interval_ms / 1000 if spec.health_check else 0.0

    def pick(self, key: bytes | None = None) -> BackendRuntime | None:
        return self.balancer.pick(self.members, key)

    def pick_for(self, request: Request | None, client_ip: bytes) -> BackendRuntime | None:
        """The balancer's pick for a request (its hash key, for hashing pools)."""
        return self.balancer.pick(self.members, self.key_for(request, client_ip) if self.hash_key else None)

    def refresh(self, states: list[int], trusted: bool, now: float) -> None:
        """Recompute the members that get traffic from the checker's states
        (one per enabled backend), its trust, and passive-health ejections."""
        enabled = self.enabled
        chosen = eligible(enabled, states, checked=self.spec.health_check is not None, trusted=trusted,
                          panic_threshold=self.spec.panic_threshold)
        for b, state in zip(enabled, states, strict=True):
            b.unhealthy = trusted and self.spec.health_check is not None and state == UNHEALTHY and b not in chosen
            if state == HEALTHY and b.checked_state != HEALTHY:
                # Proven healthy again by active checks: passive ejection ends too
                # (as Envoy's successful_active_health_check_uneject_host).
                b.ejected_until = 0.0
                b.consecutive_failures = 0
            b.checked_state = state
        reachable = [b for b in chosen if b.connect_address]
        live = [b for b in reachable if b.ejected_until <= now]
        self.members = tuple(live or reachable)  # all ejected: ejection is off for now

    def eject(self, backend: BackendRuntime, now: float) -> bool:
        """Passive health: take `backend` out of this worker's picks after
        consecutive failures, for an ejection time that doubles on repeats;
        never more than max_ejected_percent of the pool."""
        od = self.spec.outlier_detection
        if backend.ejected_until > now:
            return False
        ejected = sum(1 for b in self.enabled if b.ejected_until > now)
        if (ejected + 1) * 100 > od.max_ejected_percent * len(self.enabled):
            return False
        if now - backend.ejected_until > od.max_ejection_ms / 1000:
            backend.ejections = 0  # long enough back: start again from the first ejection time
        backend.ejections += 1
        backend.ejected_total += 1
        backend.ejected_until = now + min(od.ejection_ms * 2 ** (backend.ejections - 1), od.max_ejection_ms) / 1000
        backend.consecutive_failures = 0
        return True

    def key_for(self, request: Request | None, client_ip: bytes) -> bytes | None:
        """The hashing key of a request (or connection) for hashing pools."""
        kind = self.hash_key
        if kind is None:
            return None
        if kind == "source_ip" or request is None:
            return client_ip
        if kind == "uri":
            return request.target
        name, _, arg = kind.partition(":")
        if name == "header":
            return request.header(arg.lower().encode())
        cookies = request.header(b"cookie")
        return next(iter(cookie_values(cookies, arg.encode())), None) if cookies else None


def _affinity(spec: tablemod.Pool, secrets: Path, node_secret: Callable[[], bytes] | None) -> Affinity:
    sticky = spec.sticky
    keys: list[bytes] = []
    if sticky.mode == "cookie":
        if sticky.secret_sha256:  # secret_file: one secret per line, the first signs
            keys = [x.strip() for x in (secrets / sticky.secret_sha256).read_bytes().splitlines() if x.strip()]
        elif node_secret is not None:
            keys = [node_secret()]
        if not keys:
            raise tablemod.TableError(f"pool {spec.name}: no secret to sign stickiness cookies with")
    return Affinity(spec.name, sticky, keys)


class CompiledRoute:
    __slots__ = ("host", "suffix", "prefix", "regex", "methods", "headers", "pool", "simple", "index", "where")

    def __init__(self, spec: tablemod.Route, pool: PoolRuntime, index: int = 0, listener: str = "") -> None:
        m = spec.match
        self.pool = pool
        self.index = index  # its place in the listener's routes
        self.where = Where(listener, index, pool.name)  # for access logs
        self.host = self.suffix = self.prefix = self.regex = None
        self.methods: frozenset[bytes] = frozenset()
        self.headers: tuple[tuple[bytes, bytes], ...] = ()
        self.simple = True  # nothing to check but the path prefix, if any
        if m is None:
            return
        if m.host is not None:
            if m.host.startswith("*."):
                self.suffix = m.host[1:].encode()
            else:
                self.host = m.host.encode()
        if m.path_prefix is not None:
            self.prefix = m.path_prefix.encode()
        if m.path_regex is not None:
            self.regex = re.compile(m.path_regex.encode())
        self.methods = frozenset(x.encode() for x in m.methods)
        self.headers = tuple((n.encode(), v.encode()) for n, v in m.headers)
        self.simple = not (self.host or self.suffix or self.regex or self.methods or self.headers)

    def matches(self, req: Request) -> bool:
        if self.host is not None and req.host != self.host:
            return False
        if self.suffix is not None and not (req.host.endswith(self.suffix) and len(req.host) > len(self.suffix)):
            return False
        if self.prefix is not None and not req.path.startswith(self.prefix):
            return False
        if self.regex is not None and self.regex.match(req.path) is None:
            return False
        if self.methods and req.method not in self.methods:
            return False
        for name, value in self.headers:
            if req.header(name) != value:
                return False
        return True

    def matches_sni(self, name: bytes | None) -> bool:
        """tls_passthrough routes match on host alone (validation allows
        nothing else); a ClientHello without a name matches only a route
        without a match."""
        if self.host is not None:
            return name == self.host
        if self.suffix is not None:
            return name is not None and name.endswith(self.suffix) and len(name) > len(self.suffix)
        return True


class ListenerRuntime:
    __slots__ = ("spec", "name", "key", "protocol", "routes", "pool", "rules", "response_rules",
                 "idle_s", "header_s", "body_s", "connect_s", "response_s", "certificates", "subject_header", "stats", "nowhere")

    def __init__(self, spec: tablemod.Listener, pools: dict[str, PoolRuntime], secrets: Path,
                 stats: ListenerStats | None = None) -> None:
        self.spec = spec
        self.stats = stats  # HTTP listeners: requests answered, for /metrics
        self.name = spec.name
        self.key = spec.socket_key
        self.protocol = spec.protocol
        self.routes = tuple(CompiledRoute(r, pools[r.pool], i, spec.name) for i, r in enumerate(spec.routes))
        self.nowhere = Where(spec.name, -1, None)  # requests no route takes
        self.pool = pools[spec.pool] if spec.pool else None
        t = spec.timeouts
        self.idle_s = t.idle_ms / 1000
        self.header_s = t.client_header_ms / 1000
        self.body_s = t.client_body_ms / 1000
        self.connect_s = t.connect_ms / 1000
        self.response_s = t.response_ms / 1000
        tls = spec.tls
        self.certificates = CertificateChooser(tls, secrets) if tls else None
        # mTLS: the verified subject goes to the backend in this header (what a client sends in it is dropped).
        self.subject_header = tls.client_subject_header.encode() if tls and tls.client_ca_sha256 else b""
        add = b"".join(f"{n}: {v}\r\n".encode() for n, v in spec.add_request_headers)
        self.rules = HeadRules(
            max_request_line=spec.limits.max_request_line,
            max_head=spec.limits.max_request_head,
            max_headers=spec.limits.max_header_count,
            remove=tuple(n.encode() for n in spec.remove_request_headers) + ((self.subject_header,) if self.subject_header else ()),
            add=add,
            add_names=tuple(n.encode() for n, _ in spec.add_request_headers),
            forwarded=spec.forwarded_headers,
            proto=b"https" if spec.protocol == "https" else b"http",
        )
        response_add = list(spec.add_response_headers)
        if tls and tls.hsts:
            response_add.append(("strict-transport-security", tls.hsts))
        self.response_rules = ResponseRules(
            add=b"".join(f"{n}: {v}\r\n".encode() for n, v in response_add),
            add_names=tuple(n.encode() for n, _ in response_add),
        )

    def route(self, req: Request) -> CompiledRoute | None:
        for r in self.routes:
            # Conditions inline (a route is usually a prefix, or nothing).
            if r.prefix is not None and not req.path.startswith(r.prefix):
                continue
            if r.simple or r.matches(req):
                return r
        return None

    def route_sni(self, name: bytes | None) -> PoolRuntime | None:
        """tls_passthrough: the pool for a ClientHello's server name: the
        first route whose host matches, else the listener's pool (None: no
        pool takes it, and the connection closes)."""
        for r in self.routes:
            if r.matches_sni(name):
                return r.pool
        return self.pool


class Router:
    def __init__(self, version: str, table: tablemod.RoutingTable, listeners: dict[BindKey, ListenerRuntime],
                 pools: dict[str, PoolRuntime], backends: dict[str, BackendRuntime]) -> None:
        self.version = version
        self.table = table
        self.listeners = listeners
        self.pools = pools
        self.backends = backends
        workers = tablemod.worker_count(table)
        self.max_clients = math.ceil(table.settings.max_client_connections / workers)

    @classmethod
    def build(cls, version: str, table: tablemod.RoutingTable, slots: dict[str, int], previous: Router | None,
              secrets: Path, rng: random.Random | None = None,
              node_secret: Callable[[], bytes] | None = None) -> Router:
        """Build beside `previous`, reusing its backend runtimes and balancers.
        Pure apart from the objects it reuses and the files it reads (the
        table's secrets; `node_secret` gives the node's own cookie secret):
        nothing is opened or closed."""
        workers = tablemod.worker_count(table)
        old_backends = previous.backends if previous else {}
        old_pools = previous.pools if previous else {}
        backends: dict[str, BackendRuntime] = {}
        pools: dict[str, PoolRuntime] = {}
        for p in table.pools:
            runtimes = []
            for b in p.backends:
                key = slot_key(p.name, b)
                if key not in slots:
                    raise tablemod.TableError(f"backend {b.id} has no shared-memory slot")
                rt = old_backends.get(key) or BackendRuntime(key, p.name, b, slots[key])
                rt.update(b, workers, p.drain_timeout_ms, p.outlier_detection)
                backends[key] = rt
                runtimes.append(rt)
            old = old_pools.get(p.name)
            if old is not None and old.spec.algorithm == p.algorithm:
                balancer = old.balancer
            else:
                balancer = balance.make(p.algorithm, rng)
            pools[p.name] = PoolRuntime(p, tuple(runtimes), balancer, secrets, node_secret)
        old_stats = {x.name: x.stats for x in previous.listeners.values()} if previous else {}
        listeners = {}
        for x in table.listeners:
            stats = old_stats.get(x.name)  # counts only grow: the same object across swaps
            slot = slots.get(listener_key(x.name))
            if stats is None and slot is not None:
                stats = ListenerStats(slot)
            listeners[x.socket_key] = ListenerRuntime(x, pools, secrets, stats)
        return cls(version, table, listeners, pools, backends)

    def removed_since(self, previous: Router) -> Iterable[BackendRuntime]:
        """Backends of `previous` that take no new traffic under this router."""
        for key, rt in previous.backends.items():
            if key not in self.backends or not self.backends[key].enabled:
                yield rt
