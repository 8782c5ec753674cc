"""The RoutingTable: the one contract between the control plane and the data
plane.

A table is a tree of frozen, slotted dataclasses that check their invariants
when built. On disk it is canonical JSON (sorted keys, no whitespace, UTF-8,
integers only: durations in ms, sizes in bytes), and its version is the sha256
of exactly those bytes, so `sha256sum tables/<version>.json` names the file.
The same Config always compiles to the same bytes.

Files a config names (certificates, keys, CA bundles, secrets) appear here only
as sha256 digests; their bytes live in the state directory's secrets/.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

FORMAT = 1
HASH_NAME = "blake2b-64/lbc1"  # see lbc.hashing

PROTOCOLS = frozenset({"http", "https", "tcp", "udp", "tls_passthrough"})
ALGORITHMS = frozenset(
    {
        "round_robin",
        "weighted_round_robin",
        "least_connections",
        "weighted_least_connections",
        "ip_hash",
        "consistent_hash",
        "random",
        "power_of_two",
    }
)
HASHING = frozenset({"ip_hash", "consistent_hash"})

Pair = tuple[str, str]


class TableError(ValueError):
    """Bytes or values that do not make a valid routing table."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise TableError(message)


@dataclass(frozen=True, slots=True)
class Timeouts:
    client_header_ms: int
    client_body_ms: int
    idle_ms: int
    connect_ms: int
    response_ms: int

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _require(getattr(self, f.name) > 0, f"timeout {f.name} must be positive")


@dataclass(frozen=True, slots=True)
class Limits:
    max_request_head: int
    max_header_count: int
    max_request_line: int
    max_body: int  # 0: unlimited

    def __post_init__(self) -> None:
        _require(self.max_request_head > 0 and self.max_header_count > 0 and self.max_request_line > 0, "limits must be positive")
        _require(self.max_body >= 0, "max_body must not be negative")


@dataclass(frozen=True, slots=True)
class Match:
    host: str | None  # lowercase; "*.example.com" matches any subdomain
    path_prefix: str | None
    path_regex: str | None
    methods: tuple[str, ...]  # empty: any method
    headers: tuple[Pair, ...]  # (lowercase name, value), sorted by name

    def __post_init__(self) -> None:
        _require(
            any((self.host, self.path_prefix, self.path_regex, self.methods, self.headers)),
            "a match needs at least one condition",
        )


@dataclass(frozen=True, slots=True)
class Route:
    match: Match | None  # None: the default route
    pool: str


@dataclass(frozen=True, slots=True)
class Certificate:
    cert_sha256: str
    key_sha256: str
    subject: str
    names: tuple[str, ...]  # SAN entries, lowercase
    not_after: str  # ISO 8601 UTC


@dataclass(frozen=True, slots=True)
class ListenerTLS:
    certificates: tuple[Certificate, ...]  # the first is the default
    min_version: str
    ciphers: str  # TLS 1.2 only: OpenSSL has no per-context API for TLS 1.3 suites in Python
    strict_sni: bool
    hsts: str | None  # the Strict-Transport-Security value to send, if any
    client_ca_sha256: str | None  # mTLS: verify client certificates against this CA
    client_verify: str  # required, optional, or none (no client_ca)
    client_subject_header: str  # lowercase

    def __post_init__(self) -> None:
        _require(len(self.certificates) > 0, "tls needs a certificate")
        _require(self.min_version in ("1.2", "1.3"), "min_version must be 1.2 or 1.3")


@dataclass(frozen=True, slots=True)
class Listener:
    name: str
    protocol: str
    host: str
    port: int
    routes: tuple[Route, ...]
    pool: str | None  # L4: where connections go (tls_passthrough: when no route matches)
    tls: ListenerTLS | None
    timeouts: Timeouts
    limits: Limits
    add_request_headers: tuple[Pair, ...]
    remove_request_headers: tuple[str, ...]  # lowercase
    add_response_headers: tuple[Pair, ...]
    forwarded_headers: bool
    redirect_https: int | None  # http: answer 301 to https on this port (443 when the URL needs none)

    def __post_init__(self) -> None:
        _require(self.protocol in PROTOCOLS, f"unknown protocol {self.protocol!r}")
        _require(1 <= self.port <= 65535, "port out of range")
        _require((self.protocol == "https") == (self.tls is not None), "tls is set exactly on https listeners")
        if self.protocol in ("tcp", "udp"):
            _require(self.pool is not None and not self.routes, f"{self.protocol} listener needs a pool and no routes")
        defaults = [i for i, r in enumerate(self.routes) if r.match is None]
        _require(not defaults or defaults == [len(self.routes) - 1], "only the last route may lack a match")

    @property
    def bind(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def socket_key(self) -> tuple[str, str, int]:
        """What its listening socket is: transport, host, port (TCP and UDP
        may share a port; a protocol change on one socket keeps the socket)."""
        transport = {"udp": "udp", "https": "tls"}.get(self.protocol, "tcp")  # https: a server with a TLS context
        return (transport, self.host, self.port)

    def pools_used(self) -> tuple[str, ...]:
        names = [r.pool for r in self.routes] + ([self.pool] if self.pool else [])
        return tuple(dict.fromkeys(names))


@dataclass(frozen=True, slots=True)
class HealthCheck:
    type: str  # tcp, http, custom
    path: str | None  # http only, as are method, host, expect_status and expect_body
    method: str | None
    host: str | None
    expect_status: tuple[tuple[int, int], ...]  # inclusive ranges
    expect_body: str | None
    command: str | None  # custom only
    interval_ms: int
    timeout_ms: int
    healthy_threshold: int
    unhealthy_threshold: int

    def __post_init__(self) -> None:
        _require(self.type in ("tcp", "http", "custom"), f"unknown health check type {self.type!r}")
        _require(0 < self.timeout_ms < self.interval_ms, "health check timeout must be positive and below interval")
        _require((self.type == "custom") == (self.command is not None), "command is set exactly on custom checks")


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    consecutive_failures: int  # 0: off
    ejection_ms: int
    max_ejection_ms: int
    max_ejected_percent: int

    def __post_init__(self) -> None:
        _require(self.consecutive_failures >= 0 and 0 <= self.max_ejected_percent <= 100, "bad outlier detection")
        _require(0 < self.ejection_ms <= self.max_ejection_ms, "ejection time must be positive and at most the max")


@dataclass(frozen=True, slots=True)
class Sticky:
    mode: str  # cookie, source_ip, header
    cookie_name: str | None
    header: str | None  # lowercase
    ttl_ms: int
    secret_sha256: str | None
    store: str  # "none" or a redis:// URL

    def __post_init__(self) -> None:
        _require(self.mode in ("cookie", "source_ip", "header"), f"unknown sticky mode {self.mode!r}")
        _require((self.mode == "cookie") == (self.cookie_name is not None), "cookie_name is set exactly in cookie mode")
        _require((self.mode == "header") == (self.header is not None), "header is set exactly in header mode")


@dataclass(frozen=True, slots=True)
class UpstreamTLS:
    verify: bool
    ca_sha256: str | None
    sni: str | None


@dataclass(frozen=True, slots=True)
class Backend:
    id: str
    address: str
    port: int
    weight: int
    max_connections: int  # 0: unlimited
    enabled: bool
    health_check_path: str | None
    origin: str  # "file", or "api": added through the admin API (drift, or a dynamic pool's own)
    created_at: str | None  # ISO 8601 UTC, for backends the API added

    def __post_init__(self) -> None:
        _require(self.origin in ("file", "api"), f"backend {self.id}: unknown origin {self.origin!r}")
        _require(1 <= self.port <= 65535, f"backend {self.id}: port out of range")
        _require(1 <= self.weight <= 256, f"backend {self.id}: weight out of range")
        _require(self.max_connections >= 0, f"backend {self.id}: negative max_connections")


@dataclass(frozen=True, slots=True)
class Pool:
    name: str
    algorithm: str
    hash_key: str | None  # set exactly for the hashing algorithms
    health_check: HealthCheck | None
    sticky: Sticky | None
    retries: int
    outlier_detection: OutlierDetection
    panic_threshold: int  # percent; 0: off
    drain_timeout_ms: int
    dynamic_backends: bool
    tls: UpstreamTLS | None
    backends: tuple[Backend, ...]  # in config order: round robin follows it
    set_by_api: tuple[str, ...]  # settings the admin API changed since the file was applied ("algorithm", "sticky")

    def __post_init__(self) -> None:
        _require(self.algorithm in ALGORITHMS, f"unknown algorithm {self.algorithm!r}")
        _require((self.algorithm in HASHING) == (self.hash_key is not None), "hash_key is set exactly for hashing algorithms")
        ids = [b.id for b in self.backends]
        _require(len(ids) == len(set(ids)), f"pool {self.name}: duplicate backend id")

    def enabled_backends(self) -> tuple[Backend, ...]:
        return tuple(b for b in self.backends if b.enabled)


@dataclass(frozen=True, slots=True)
class Admin:
    host: str
    port: int
    token_sha256: str | None  # token_file's digest; None: the state directory's own token


@dataclass(frozen=True, slots=True)
class AccessLog:
    format: str  # combined, json
    directory: str | None  # None: the state directory's run/

    def __post_init__(self) -> None:
        _require(self.format in ("combined", "json"), f"unknown access log format {self.format!r}")


@dataclass(frozen=True, slots=True)
class HaNode:
    name: str
    address: str
    priority: int
    admin: str | None  # host:port of its admin API, for the other nodes' peer probes


@dataclass(frozen=True, slots=True)
class HighAvailability:
    virtual_ips: tuple[str, ...]  # address/prefix
    interface: str
    router_id: int
    advert_interval_ms: int
    check_interval_ms: int
    preempt: bool
    keepalived: bool  # lbc up runs it
    nodes: tuple[HaNode, ...]
    store: str | None  # redis:// URL of the table the nodes share (lbc.hastore); None: each node its own

    def __post_init__(self) -> None:
        _require(1 <= self.router_id <= 255, "router_id out of range")
        _require(len({n.name for n in self.nodes}) == len(self.nodes), "duplicate ha node name")

    def node(self, name: str) -> HaNode | None:
        return next((n for n in self.nodes if n.name == name), None)


@dataclass(frozen=True, slots=True)
class Settings:
    workers: int | None  # None: as many as the machine has CPUs
    drain_timeout_ms: int
    admin: Admin | None  # None: no admin API
    access_log: AccessLog | None  # None: off
    max_client_connections: int  # per node; each worker holds ceil(max/N)
    ha: HighAvailability | None  # None: a node of its own


@dataclass(frozen=True, slots=True)
class RoutingTable:
    format: int
    hash: str  # the named hash every worker and node uses for affinity
    settings: Settings
    listeners: tuple[Listener, ...]  # sorted by name
    pools: tuple[Pool, ...]  # sorted by name

    def __post_init__(self) -> None:
        _require(self.format == FORMAT, f"table format {self.format} is not {FORMAT}")
        _require(self.hash == HASH_NAME, f"unknown hash {self.hash!r}")
        pools = {p.name for p in self.pools}
        _require(len(pools) == len(self.pools), "duplicate pool name")
        _require(len({x.name for x in self.listeners}) == len(self.listeners), "duplicate listener name")
        ids = [b.id for p in self.pools for b in p.backends]
        _require(len(ids) == len(set(ids)), "duplicate backend id")
        for listener in self.listeners:
            for name in listener.pools_used():
                _require(name in pools, f"listener {listener.name} uses unknown pool {name!r}")

    def pool(self, name: str) -> Pool:
        for p in self.pools:
            if p.name == name:
                return p
        raise KeyError(name)

    def digests(self) -> frozenset[str]:
        """sha256 of every file whose bytes a worker needs (certificates, keys,
        CA bundles, secrets)."""
        out: set[str] = set()
        for listener in self.listeners:
            if listener.tls:
                for c in listener.tls.certificates:
                    out.update((c.cert_sha256, c.key_sha256))
                if listener.tls.client_ca_sha256:
                    out.add(listener.tls.client_ca_sha256)
        for pool in self.pools:
            if pool.tls and pool.tls.ca_sha256:
                out.add(pool.tls.ca_sha256)
            if pool.sticky and pool.sticky.secret_sha256:
                out.add(pool.sticky.secret_sha256)
        if self.settings.admin and self.settings.admin.token_sha256:
            out.add(self.settings.admin.token_sha256)
        return frozenset(out)


# -- encoding ----------------------------------------------------------------


def worker_count(table: RoutingTable) -> int:
    """Proxy workers a node runs for this table."""
    return table.settings.workers or os.cpu_count() or 1


def to_plain(value: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists; everything else as is."""
    return _encoder(type(value))(value)


@functools.cache
def _encoder(cls: type) -> Callable[[Any], Any]:
    # One encoder per class, built once: a table has tens of thousands of
    # values, and asking dataclasses about each one was most of the cost.
    if dataclasses.is_dataclass(cls):
        names = tuple(f.name for f in dataclasses.fields(cls))
        return lambda obj: {name: to_plain(getattr(obj, name)) for name in names}
    if issubclass(cls, tuple):
        return lambda items: [to_plain(v) for v in items]
    return _as_is


def _as_is(value: Any) -> Any:
    return value


def canonical(plain: Any) -> bytes:
    return json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def dump(table: RoutingTable) -> bytes:
    return canonical(to_plain(table))


def version_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load(data: bytes, *, expected_version: str | None = None) -> RoutingTable:
    """Bytes -> RoutingTable, checking the digest (when given), the format and
    every invariant. Raises TableError."""
    if expected_version is not None and version_of(data) != expected_version:
        raise TableError(f"table bytes do not hash to {expected_version}")
    try:
        plain = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TableError(f"not JSON: {e}") from None
    if not isinstance(plain, dict) or plain.get("format") != FORMAT:
        raise TableError(f"not a format {FORMAT} routing table")
    return from_plain(RoutingTable, plain)


def from_plain(cls: type, data: Any, where: str = "table") -> Any:
    """Build a table dataclass from plain JSON values, strictly: no missing or
    unknown keys, no wrong types."""
    try:
        return _decoder(cls)(data)
    except _Invalid as e:
        raise TableError(f"{where}{''.join(reversed(e.path))}: {e.message}") from None


class _Invalid(Exception):
    """A value that does not decode. The decoders on the way out add where it
    was, so a valid table (the usual case) never builds a location string."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.path: list[str] = []  # innermost first


@functools.cache
def _decoder(hint: Any) -> Callable[[Any], Any]:
    """The decoder for a type hint, built once: resolving hints per value was
    most of the time it takes to read a big table."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _optional(_decoder(inner))
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return _sequence(_decoder(args[0]))
        return _fixed(tuple(_decoder(a) for a in args))
    if dataclasses.is_dataclass(hint):
        return _record(hint)
    if hint is bool:
        return _scalar(lambda v: isinstance(v, bool), hint)
    if hint is int:
        return _scalar(lambda v: isinstance(v, int) and not isinstance(v, bool), hint)
    return _scalar(lambda v: isinstance(v, hint), hint)


def _optional(decode: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else decode(value)


def _sequence(decode: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def decode_all(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise _Invalid("expected a list")
        out: list[Any] = []
        try:
            for v in value:
                out.append(decode(v))
        except _Invalid as e:
            e.path.append(f"[{len(out)}]")
            raise
        return tuple(out)

    return decode_all


def _fixed(decoders: tuple[Callable[[Any], Any], ...]) -> Callable[[Any], Any]:
    def decode_all(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise _Invalid("expected a list")
        if len(value) != len(decoders):
            raise _Invalid(f"expected {len(decoders)} items")
        out: list[Any] = []
        try:
            for decode, v in zip(decoders, value, strict=True):
                out.append(decode(v))
        except _Invalid as e:
            e.path.append(f"[{len(out)}]")
            raise
        return tuple(out)

    return decode_all


def _record(cls: type) -> Callable[[Any], Any]:
    fields = tuple((name, _decoder(hint)) for name, hint in typing.get_type_hints(cls).items())
    names = frozenset(name for name, _ in fields)

    def decode(data: Any) -> Any:
        if not isinstance(data, dict):
            raise _Invalid("expected an object")
        if data.keys() != names:
            extra, missing = set(data) - names, names - set(data)
            raise _Invalid(f"unknown keys {sorted(extra)}, missing keys {sorted(missing)}")
        values = {}
        try:
            for name, decode_field in fields:
                values[name] = decode_field(data[name])
        except _Invalid as e:
            e.path.append(f".{name}")
            raise
        return cls(**values)

    return decode


def _scalar(ok: Callable[[Any], bool], hint: type) -> Callable[[Any], Any]:
    message = f"expected {hint.__name__}"

    def decode(value: Any) -> Any:
        if not ok(value):
            raise _Invalid(message)
        return value

    return decode
