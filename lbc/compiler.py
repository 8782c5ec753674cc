"""Config -> RoutingTable. Pure: no I/O, no clock, no randomness, so the same
Config always gives the same table bytes and the same version.

What compiling decides, so that workers do not have to:
- durations become milliseconds and sizes bytes;
- listeners and pools are sorted by name (their order in the file means
  nothing); routes and backends keep file order (first match wins; round
  robin follows backend order);
- header names become lowercase, match headers are sorted;
- settings that do not apply are dropped (an http check's path on a tcp
  check, a hash_key on round robin), so changing an unused default is not a
  change;
- files become digests; the bytes travel beside the table, never in it;
- the pool drain timeout falls back to the global one.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from typing import Any

from lbc.config import Config
from lbc.config.addresses import parse_bind
from lbc.config.units import duration_ms, size_bytes
from lbc.table import (
    FORMAT,
    HASH_NAME,
    HASHING,
    AccessLog,
    Admin,
    Backend,
    Certificate,
    HaNode,
    HealthCheck,
    HighAvailability,
    Limits,
    Listener,
    ListenerTLS,
    Match,
    OutlierDetection,
    Pool,
    Route,
    RoutingTable,
    Settings,
    Sticky,
    Timeouts,
    UpstreamTLS,
)

Tree = Mapping[str, Any]


def compile_config(config: Config) -> RoutingTable:
    tree = config.tree
    glob = tree["global"]
    drain_ms = duration_ms(glob["drain_timeout"])
    return RoutingTable(
        format=FORMAT,
        hash=HASH_NAME,
        settings=Settings(workers=glob.get("workers"), drain_timeout_ms=drain_ms, admin=_admin(glob["admin"], config),
                          access_log=_access_log(glob["access_log"], config),
                          max_client_connections=glob["max_client_connections"],
                          ha=_ha(glob["ha"]) if "ha" in glob else None),
        listeners=tuple(sorted((_listener(x, config) for x in tree["listeners"]), key=lambda x: x.name)),
        pools=tuple(sorted((_pool(p, config, drain_ms) for p in tree["pools"]), key=lambda p: p.name)),
    )


def _listener(x: Tree, config: Config) -> Listener:
    host, port = parse_bind(x["bind"])
    protocol = x["protocol"]
    l7 = protocol in ("http", "https")
    timeouts, limits = x["timeouts"], x["limits"]
    return Listener(
        name=x["name"],
        protocol=protocol,
        host=host,
        port=port,
        routes=tuple(_route(r) for r in x.get("routes", ())),
        pool=x.get("pool"),
        tls=_listener_tls(x["tls"], config) if "tls" in x else None,
        timeouts=Timeouts(
            client_header_ms=duration_ms(timeouts["client_header"]),
            client_body_ms=duration_ms(timeouts["client_body"]),
            idle_ms=duration_ms(timeouts["idle"]),
            connect_ms=duration_ms(timeouts["connect"]),
            response_ms=duration_ms(timeouts["response"]),
        ),
        limits=Limits(
            max_request_head=size_bytes(limits["max_request_head"]),
            max_header_count=limits["max_header_count"],
            max_request_line=size_bytes(limits["max_request_line"]),
            max_body=size_bytes(limits["max_body"]),
        ),
        add_request_headers=_pairs(x.get("add_request_headers", {})),
        remove_request_headers=tuple(sorted({h.lower() for h in x.get("remove_request_headers", ())})),
        add_response_headers=_pairs(x.get("add_response_headers", {})),
        forwarded_headers=bool(x["forwarded_headers"]) and l7,
        redirect_https=_redirect(x["redirect_to_https"]) if protocol == "http" else None,
    )


def _redirect(value: bool | int) -> int | None:
    if value is True:
        return 443
    return value or None


def _pairs(headers: Tree) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((name.lower(), value) for name, value in headers.items()))


def _route(r: Tree) -> Route:
    m = r.get("match")
    if m is None:
        return Route(match=None, pool=r["pool"])
    methods = m.get("method", ())
    return Route(
        match=Match(
            host=m["host"].lower().rstrip(".") if "host" in m else None,
            path_prefix=m.get("path_prefix"),
            path_regex=m.get("path_regex"),
            methods=(methods,) if isinstance(methods, str) else tuple(methods),
            headers=_pairs(m.get("headers", {})),
        ),
        pool=r["pool"],
    )


def _listener_tls(t: Tree, config: Config) -> ListenerTLS:
    certs = []
    for c in t["certificates"]:
        cert, key = config.files[c["cert"]], config.files[c["key"]]
        info = config.certs[cert.sha256]
        certs.append(Certificate(cert.sha256, key.sha256, info.subject, info.names, info.not_after))
    hsts = None
    if "hsts" in t:
        hsts = f"max-age={duration_ms(t['hsts']['max_age']) // 1000}"
        if t["hsts"]["include_subdomains"]:
            hsts += "; includeSubDomains"
    mtls = "client_ca" in t
    return ListenerTLS(
        certificates=tuple(certs),
        min_version=t["min_version"],
        ciphers=t["ciphers"],
        strict_sni=t["strict_sni"],
        hsts=hsts,
        client_ca_sha256=config.files[t["client_ca"]].sha256 if mtls else None,
        client_verify=t["client_verify"] if mtls else "none",
        client_subject_header=t["client_subject_header"].lower() if mtls else "",
    )


def _pool(p: Tree, config: Config, global_drain_ms: int) -> Pool:
    algorithm = p["algorithm"]
    return Pool(
        name=p["name"],
        algorithm=algorithm,
        hash_key=p["hash_key"] if algorithm in HASHING else None,
        health_check=_health(p["health_check"]) if "health_check" in p else None,
        sticky=_sticky(p["sticky"], config) if "sticky" in p else None,
        retries=p["retries"],
        outlier_detection=_outlier(p["outlier_detection"]),
        panic_threshold=p["panic_threshold"],
        drain_timeout_ms=duration_ms(p["drain_timeout"]) if "drain_timeout" in p else global_drain_ms,
        dynamic_backends=p["dynamic_backends"],
        tls=_upstream_tls(p["tls"], config) if "tls" in p else None,
        backends=tuple(_backend(b) for b in p["backends"]),
        set_by_api=(),
    )


def _access_log(a: Tree, config: Config) -> AccessLog | None:
    if not a["enabled"]:
        return None
    directory = a.get("directory")
    if directory is not None:  # relative to the config file, as every path in it (string work, no I/O)
        directory = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(config.source)), directory))
    return AccessLog(format=a["format"], directory=directory)


def _admin(a: Tree, config: Config) -> Admin | None:
    if not a["enabled"]:
        return None
    host, port = parse_bind(a["bind"])
    return Admin(host=host, port=port,
                 token_sha256=config.files[a["token_file"]].sha256 if "token_file" in a else None)


def _ha(h: Tree) -> HighAvailability:
    return HighAvailability(
        virtual_ips=tuple(str(ipaddress.ip_interface(v)) for v in h["virtual_ips"]),
        interface=h["interface"],
        router_id=h["router_id"],
        advert_interval_ms=duration_ms(h["advert_interval"]),
        check_interval_ms=duration_ms(h["check_interval"]),
        preempt=h["preempt"],
        keepalived=h["keepalived"],
        nodes=tuple(HaNode(n["name"], _normal_address(n["address"]), n["priority"], n.get("admin"))
                    for n in h["nodes"]),
        store=h.get("store"),
    )


def _health(h: Tree) -> HealthCheck:
    http = h["type"] == "http"
    return HealthCheck(
        type=h["type"],
        path=h["path"] if http else None,
        method=h["method"] if http else None,
        host=h.get("host") if http else None,
        expect_status=_status_ranges(h["expect_status"]) if http else (),
        expect_body=h.get("expect_body") if http else None,
        command=h["command"] if h["type"] == "custom" else None,
        interval_ms=duration_ms(h["interval"]),
        timeout_ms=duration_ms(h["timeout"]),
        healthy_threshold=h["healthy_threshold"],
        unhealthy_threshold=h["unhealthy_threshold"],
    )


def _outlier(o: Tree) -> OutlierDetection:
    return OutlierDetection(
        consecutive_failures=o["consecutive_failures"],
        ejection_ms=duration_ms(o["ejection_time"]),
        max_ejection_ms=duration_ms(o["max_ejection_time"]),
        max_ejected_percent=o["max_ejected_percent"],
    )


def _status_ranges(text: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.append((int(lo), int(hi or lo)))
    return tuple(sorted(out))


def _sticky(s: Tree, config: Config) -> Sticky:
    mode = s["mode"]
    secret = config.files[s["secret_file"]].sha256 if "secret_file" in s else None
    return Sticky(
        mode=mode,
        cookie_name=s["cookie_name"] if mode == "cookie" else None,
        header=s["header"].lower() if mode == "header" else None,
        ttl_ms=duration_ms(s["ttl"]),
        secret_sha256=secret,
        store=s["store"],
    )


def _upstream_tls(t: Tree, config: Config) -> UpstreamTLS:
    ca = config.files[t["ca_file"]].sha256 if "ca_file" in t else None
    return UpstreamTLS(verify=t["verify"], ca_sha256=ca, sni=t.get("sni"))


def _backend(b: Tree) -> Backend:
    return Backend(
        id=b["id"],
        address=_normal_address(b["address"]),
        port=b["port"],
        weight=b["weight"],
        max_connections=b["max_connections"],
        enabled=b["enabled"],
        health_check_path=b.get("health_check_path"),
        origin="file",
        created_at=None,
    )


def _normal_address(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address.lower().rstrip(".")
