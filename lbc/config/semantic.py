"""Checks the schema cannot express: names that must be unique or must exist,
conflicting binds, unreachable routes, features that do not fit a protocol.

They run on the defaults-filled tree even when the schema found errors, so a
user sees every problem at once; every reader here therefore skips values of
the wrong type (the schema has reported those already). `doc.written(path)`
tells a value the user wrote from one a default filled in.
"""

from __future__ import annotations

import ipaddress
import re
from collections import defaultdict
from typing import Any

from lbc.config.addresses import WILDCARDS, address_kind, format_hostport, parse_bind
from lbc.config.diagnostics import WARNING, Diagnostic, Path
from lbc.config.loader import Document
from lbc.config.schema import pool_schema
from lbc.config.tree import dicts
from lbc.config.units import duration_ms

L7 = frozenset({"http", "https"})
L4 = frozenset({"tcp", "udp", "tls_passthrough"})
HASHING = frozenset({"ip_hash", "consistent_hash"})
L7_ONLY_LISTENER_KEYS = ("add_request_headers", "remove_request_headers", "add_response_headers", "forwarded_headers", "limits")
HTTP_CHECK_KEYS = ("path", "method", "host", "expect_status", "expect_body")
MIN_TTL_MS, MAX_TTL_MS = 1000, 30 * 86_400_000
ALGORITHMS = tuple(pool_schema()["$defs"]["pool"]["properties"]["algorithm"]["enum"])
_BIND_SHAPE = re.compile(pool_schema()["$defs"]["listener"]["properties"]["bind"]["pattern"])


def check(doc: Document) -> list[Diagnostic]:
    c = _Checker(doc)
    c.run()
    return c.out


class _Checker:
    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.data = doc.data if isinstance(doc.data, dict) else {}
        self.out: list[Diagnostic] = []
        self.pools: dict[str, int] = {}  # name -> index of its first definition
        # pool name -> protocols of the listeners that send traffic to it
        self.pool_protocols: dict[str, set[str]] = defaultdict(set)

    def error(self, path: Path, message: str, *, key: bool = False) -> None:
        self.out.append(self.doc.diagnostic(path, message, key=key))

    def warn(self, path: Path, message: str) -> None:
        self.out.append(self.doc.diagnostic(path, message, severity=WARNING))

    def run(self) -> None:
        self.collect_pools()
        self.check_listeners()
        self.check_binds()
        for i, pool in dicts(self.data, "pools"):
            self.check_pool(("pools", i), pool)
        self.check_backend_ids()
        self.check_ha()

    # -- names ------------------------------------------------------------

    def collect_pools(self) -> None:
        for i, pool in dicts(self.data, "pools"):
            name = pool.get("name")
            if not isinstance(name, str):
                continue
            if name in self.pools:
                self.error(("pools", i, "name"), f"duplicate pool name '{name}' (also pools[{self.pools[name]}])")
            else:
                self.pools[name] = i

    def pool_ref(self, path: Path, name: Any, protocol: str) -> None:
        if not isinstance(name, str):
            return
        if name not in self.pools:
            known = ", ".join(sorted(self.pools)) or "none defined"
            self.error(path, f"no pool named '{name}' (pools: {known})")
        else:
            self.pool_protocols[name].add(protocol)

    # -- listeners --------------------------------------------------------

    def check_listeners(self) -> None:
        seen: dict[str, int] = {}
        for i, listener in dicts(self.data, "listeners"):
            base: Path = ("listeners", i)
            name = listener.get("name")
            if isinstance(name, str):
                if name in seen:
                    self.error(base + ("name",), f"duplicate listener name '{name}' (also listeners[{seen[name]}])")
                else:
                    seen[name] = i
            protocol = listener.get("protocol")
            if not isinstance(protocol, str) or protocol not in L7 | L4:
                # The schema reported the protocol; count the pools named here as used.
                self.pool_ref(base + ("pool",), listener.get("pool"), "?")
                for j, route in dicts(listener, "routes"):
                    self.pool_ref(base + ("routes", j, "pool"), route.get("pool"), "?")
                continue
            self.check_listener_shape(base, listener, protocol)
            self.check_routes(base, listener, protocol)
            if isinstance(listener.get("timeouts"), dict):
                for key, value in listener["timeouts"].items():
                    self.positive_duration(base + ("timeouts", key), value)

    def check_listener_shape(self, base: Path, listener: dict[str, Any], protocol: str) -> None:
        has_routes = "routes" in listener
        if protocol in L7:
            if "pool" in listener:
                self.error(base + ("pool",), f"{protocol} listeners send traffic through routes: write `routes: [{{pool: {listener['pool']}}}]`", key=True)
                if not has_routes:
                    self.pool_ref(base + ("pool",), listener["pool"], protocol)  # meant as the default route
            elif not has_routes:
                self.error(base, f"{protocol} listener needs routes")
        else:
            if protocol in ("tcp", "udp") and has_routes:
                self.error(base + ("routes",), f"{protocol} listeners take one `pool`, not routes", key=True)
            if "pool" not in listener and not (protocol == "tls_passthrough" and has_routes):
                need = "a `pool` or routes matching on host" if protocol == "tls_passthrough" else "a `pool`"
                self.error(base, f"{protocol} listener needs {need}")
            for key in L7_ONLY_LISTENER_KEYS:
                if self.doc.written(base + (key,)):
                    self.error(base + (key,), f"{key} applies only to http and https listeners", key=True)
            self.pool_ref(base + ("pool",), listener.get("pool"), protocol)
        if protocol != "http" and self.doc.written(base + ("redirect_to_https",)):
            self.error(base + ("redirect_to_https",), "redirect_to_https applies only to http listeners", key=True)
        tls = listener.get("tls")
        if isinstance(tls, dict) and "client_ca" not in tls:
            for key in ("client_verify", "client_subject_header"):
                if self.doc.written(base + ("tls", key)):
                    self.error(base + ("tls", key), f"{key} needs client_ca", key=True)
        if protocol == "https" and "tls" not in listener:
            self.error(base, "https listener needs tls.certificates")
        if protocol != "https" and "tls" in listener:
            why = " (passthrough forwards TLS untouched)" if protocol == "tls_passthrough" else ""
            self.error(base + ("tls",), f"tls applies only to https listeners{why}", key=True)
        bind = listener.get("bind")
        if protocol == "udp" and isinstance(bind, str):
            try:
                host, _ = parse_bind(bind)
            except ValueError:
                return  # reported by check_binds
            if host in WILDCARDS:
                self.error(base + ("bind",), "udp listeners need a concrete address, not a wildcard: replies must leave from the address the client sent to")

    def check_routes(self, base: Path, listener: dict[str, Any], protocol: str) -> None:
        if protocol in ("tcp", "udp"):
            return
        default_at: int | None = None
        for j, route in dicts(listener, "routes"):
            path = base + ("routes", j)
            if default_at is not None:
                self.error(path, f"unreachable: routes[{default_at}] has no match and catches every request")
            match = route.get("match")
            if match is None:
                default_at = j if default_at is None else default_at
            elif isinstance(match, dict):
                if protocol == "tls_passthrough":
                    for key in match:
                        if key != "host":
                            self.error(path + ("match", key), "tls_passthrough routes match only on host (the SNI name)", key=True)
                regex = match.get("path_regex")
                if isinstance(regex, str):
                    try:
                        re.compile(regex)
                    except re.error as e:
                        self.error(path + ("match", "path_regex"), f"invalid regular expression: {e}")
            self.pool_ref(path + ("pool",), route.get("pool"), protocol)

    def check_binds(self) -> None:
        # transport, port -> (host, listener index): TCP and UDP may share a port,
        # and a wildcard host conflicts with every host on the same port.
        taken: dict[tuple[str, int], list[tuple[str, str]]] = defaultdict(list)
        binds = [(("listeners", i, "bind"), x.get("bind"), "udp" if x.get("protocol") == "udp" else "tcp", f"listeners[{i}]")
                 for i, x in dicts(self.data, "listeners")]
        glob = self.data.get("global") if isinstance(self.data, dict) else None
        admin = glob.get("admin") if isinstance(glob, dict) else None
        if isinstance(admin, dict) and admin.get("enabled") is not False:
            binds.append((("global", "admin", "bind"), admin.get("bind"), "tcp", "the admin API"))
        for path, bind, transport, label in binds:
            if not isinstance(bind, str):
                continue
            try:
                host, port = parse_bind(bind)
            except ValueError as e:
                if _BIND_SHAPE.match(bind):  # else the schema reported it
                    self.error(path, str(e))
                continue
            for other_host, other in taken[(transport, port)]:
                if other_host == host or host in WILDCARDS or other_host in WILDCARDS:
                    self.error(path, f"{format_hostport(host, port)} overlaps {other} ({format_hostport(other_host, port)})")
                    break
            taken[(transport, port)].append((host, label))

    # -- pools ------------------------------------------------------------

    def check_pool(self, base: Path, pool: dict[str, Any]) -> None:
        name = pool.get("name")
        algorithm = pool.get("algorithm")
        protocols = self.pool_protocols.get(name, set()) if isinstance(name, str) else set()
        if isinstance(name, str) and self.pools.get(name) == base[1] and not protocols:
            self.warn(base + ("name",), f"pool '{name}' is not used by any listener")
        if self.doc.written(base + ("hash_key",)) and algorithm in ALGORITHMS:  # else the schema reported it
            hash_key = pool.get("hash_key")
            if algorithm not in HASHING:
                self.error(base + ("hash_key",), f"hash_key applies only to ip_hash and consistent_hash, not {algorithm}", key=True)
            elif algorithm == "ip_hash" and hash_key != "source_ip":
                self.error(base + ("hash_key",), "ip_hash hashes the client address only; use consistent_hash for other keys")
            elif isinstance(hash_key, str) and hash_key != "source_ip" and protocols & L4:
                self.error(base + ("hash_key",), f"hash_key {hash_key} needs HTTP, but an L4 listener uses this pool")
        self.check_health(base, pool.get("health_check"))
        self.check_outliers(base, pool.get("outlier_detection"))
        if "tls" in pool and "tls_passthrough" in protocols:
            self.error(base + ("tls",), "a tls_passthrough listener forwards its clients' TLS as it is: its pools "
                       "cannot add TLS of their own", key=True)
        self.check_sticky(base, pool.get("sticky"), protocols)
        self.check_backends(base, pool)

    def check_health(self, base: Path, hc: Any) -> None:
        if not isinstance(hc, dict):
            return
        path = base + ("health_check",)
        kind = hc.get("type")
        interval = self.positive_duration(path + ("interval",), hc.get("interval"))
        timeout = self.positive_duration(path + ("timeout",), hc.get("timeout"))
        if interval is not None and timeout is not None and timeout >= interval:
            if self.doc.written(path + ("timeout",)):
                default = "" if self.doc.written(path + ("interval",)) else ", the default"
                self.error(path + ("timeout",), f"must be below interval ({hc['interval']}{default})")
            else:
                self.error(path + ("interval",), f"must be above timeout ({hc['timeout']}, the default)")
        if kind == "custom" and "command" not in hc:
            self.error(path, "custom health checks need a command")
        if kind != "custom" and self.doc.written(path + ("command",)):
            self.error(path + ("command",), "command applies only to custom health checks", key=True)
        if kind != "http":
            for key in HTTP_CHECK_KEYS:
                if self.doc.written(path + (key,)):
                    self.error(path + (key,), f"{key} applies only to http health checks", key=True)

    def check_outliers(self, base: Path, od: Any) -> None:
        if not isinstance(od, dict):
            return
        path = base + ("outlier_detection",)
        first = self.positive_duration(path + ("ejection_time",), od.get("ejection_time"))
        longest = self.positive_duration(path + ("max_ejection_time",), od.get("max_ejection_time"))
        if first is not None and longest is not None and longest < first:
            self.error(path + ("max_ejection_time",), f"must be at least ejection_time ({od['ejection_time']})")

    def check_sticky(self, base: Path, sticky: Any, protocols: set[str]) -> None:
        if not isinstance(sticky, dict):
            return
        path = base + ("sticky",)
        mode = sticky.get("mode")
        if mode in ("cookie", "header") and protocols & L4:
            l4 = ", ".join(sorted(protocols & L4))
            self.error(path + ("mode",), f"{mode} stickiness needs HTTP, but a {l4} listener uses this pool")
        if mode == "header" and "header" not in sticky:
            self.error(path, "header stickiness needs `header`: the request header to key on")
        if mode != "header" and self.doc.written(path + ("header",)):
            self.error(path + ("header",), "header applies only to mode: header", key=True)
        for key in ("cookie_name", "secret_file"):
            if mode != "cookie" and self.doc.written(path + (key,)):
                self.error(path + (key,), f"{key} applies only to mode: cookie", key=True)
        ttl = self.nonnegative_duration(path + ("ttl",), sticky.get("ttl"))
        if ttl is not None and not MIN_TTL_MS <= ttl <= MAX_TTL_MS:
            self.error(path + ("ttl",), f"must be between 1s and 30d (got {sticky['ttl']})")
        store = sticky.get("store")
        if isinstance(store, str):
            self.check_store_port(path + ("store",), store)
        if isinstance(store, str) and store.startswith("redis://") and "udp" in protocols:
            self.warn(path + ("store",), "udp sessions are placed by the hash ring alone: the store is used by http, https and tcp listeners")
        if mode == "cookie" and isinstance(store, str) and store.startswith("redis://") and "secret_file" not in sticky:
            self.warn(path + ("store",), "with a shared store several nodes serve this pool: give them one secret_file, or each node signs cookies with its own secret")

    def check_backends(self, base: Path, pool: dict[str, Any]) -> None:
        seen: dict[tuple[str, int], int] = {}
        listed = enabled = 0
        for j, backend in dicts(pool, "backends"):
            listed += 1
            path = base + ("backends", j)
            address, port = backend.get("address"), backend.get("port")
            if isinstance(address, str) and address_kind(address) is None:
                hint = "; write IPv6 addresses without brackets" if address.startswith("[") else ""
                self.error(path + ("address",), f"'{address}' is not an IPv4 address, an IPv6 address or a host name{hint}")
            if isinstance(address, str) and isinstance(port, int):
                key = (address.lower(), port)
                if key in seen:
                    self.error(path, f"{format_hostport(address, port)} is already backends[{seen[key]}] of this pool")
                else:
                    seen[key] = j
            if backend.get("enabled") is True:
                enabled += 1
        if not enabled and pool.get("dynamic_backends") is not True:
            where = base + ("backends",) if self.doc.written(base + ("backends",)) else base
            if not listed:
                self.error(where, "pool has no backends (with dynamic_backends: true the admin API adds them)")
            else:
                self.error(where, "pool has no enabled backend")

    def check_backend_ids(self) -> None:
        seen: dict[str, Path] = {}
        for i, pool in dicts(self.data, "pools"):
            for j, backend in dicts(pool, "backends"):
                backend_id = backend.get("id")
                if not isinstance(backend_id, str):
                    continue
                if backend_id in seen:
                    where = seen[backend_id]
                    self.error(("pools", i, "backends", j, "id"), f"duplicate backend id '{backend_id}' (also pools[{where[1]}].backends[{where[3]}]); ids are unique across the file")
                else:
                    seen[backend_id] = ("pools", i, "backends", j)

    # -- values -----------------------------------------------------------

    # -- high availability --------------------------------------------------

    def check_ha(self) -> None:
        glob = self.data.get("global")
        ha = glob.get("ha") if isinstance(glob, dict) else None
        if not isinstance(ha, dict):
            return
        base = ("global", "ha")
        vips = []
        for i, v in enumerate(ha.get("virtual_ips") or ()):
            if isinstance(v, str):
                try:
                    vips.append(ipaddress.ip_interface(v))
                except ValueError as e:
                    self.error(base + ("virtual_ips", i), f"not an address with a prefix length: {e}")
        names: dict[str, int] = {}
        addresses: dict[Any, int] = {}
        priorities: dict[int, int] = {}
        for i, n in dicts(ha, "nodes"):
            where = base + ("nodes", i)
            if isinstance(n.get("name"), str):
                if n["name"] in names:
                    self.error(where + ("name",), f"node name {n['name']!r} is also nodes[{names[n['name']]}]'s")
                names.setdefault(n["name"], i)
            if isinstance(n.get("address"), str):
                try:
                    address = ipaddress.ip_address(n["address"])
                except ValueError as e:
                    self.error(where + ("address",), str(e))
                else:
                    if address in addresses:
                        self.error(where + ("address",), f"{address} is also nodes[{addresses[address]}]'s address")
                    if any(address == v.ip for v in vips):
                        self.error(where + ("address",), f"{address} is a virtual IP: a node needs an address of its own")
                    if any(address.version != v.version for v in vips):
                        self.error(where + ("address",), "node addresses and virtual IPs must be of one IP version "
                                   "(one VRRP instance carries one family)")
                    addresses.setdefault(address, i)
            if isinstance(n.get("priority"), int) and not isinstance(n["priority"], bool):
                if n["priority"] in priorities:
                    self.warn(where + ("priority",), f"the same priority as nodes[{priorities[n['priority']]}]: "
                              "VRRP then prefers the higher address")
                priorities.setdefault(n["priority"], i)
        advert = self.nonnegative_duration(base + ("advert_interval",), ha.get("advert_interval"))
        if advert is not None and not 10 <= advert <= 40_950:
            self.error(base + ("advert_interval",), "must be between 10ms and 40.95s (VRRPv3 counts centiseconds)")
        check = self.nonnegative_duration(base + ("check_interval",), ha.get("check_interval"))
        if check is not None and (check < 1000 or check % 1000):
            self.error(base + ("check_interval",), "must be whole seconds, at least 1s (keepalived's script interval)")
        store = ha.get("store")
        if isinstance(store, str):
            self.check_store_port(base + ("store",), store)
            admin = glob.get("admin")
            if isinstance(admin, dict) and admin.get("enabled") is False:
                self.error(base + ("store",), "needs the admin API (global.admin.enabled): it installs what the "
                           "other nodes write to the store")
            elif not isinstance(admin, dict) or "token_file" not in admin:
                self.error(base + ("store",), "needs global.admin.token_file, the same file on every node: the "
                           "nodes sign what they write to the store with it")

    def check_store_port(self, path: Path, url: str) -> None:
        m = re.search(r":([0-9]+)(/|$)", url.rpartition("@")[2])
        if m and not 1 <= int(m.group(1)) <= 65535:
            self.error(path, f"port {m.group(1)} is out of range (1 to 65535)")

    def positive_duration(self, path: Path, value: Any) -> int | None:
        ms = self.nonnegative_duration(path, value)
        if ms == 0:
            self.error(path, "must be longer than 0")
            return None
        return ms

    @staticmethod
    def nonnegative_duration(path: Path, value: Any) -> int | None:
        try:
            return duration_ms(value)
        except (ValueError, TypeError):
            return None  # the schema reported it
