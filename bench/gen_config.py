#!/usr/bin/env python3
"""Generate a large, valid lbc configuration for benchmarks.

    python bench/gen_config.py --pools 1000 --backends 10 -o big.yaml
    python bench/gen_config.py --pools 1000 --backends 10 --variant 1 -o big-v1.yaml

Shape (realistic, not uniform):
- a few http listeners (--listeners, default 4) on distinct ports, some with
  header rewriting, timeouts and limits; their routes, one per pool, mix
  path_prefix, host (a few wildcards), header, method and path_regex matches;
  each listener's last route is a default route (no match);
- pools with a mix of algorithms (round robin, least connections, their
  weighted variants, consistent_hash with various hash keys, ip_hash, random,
  power_of_two), health checks on most (http, tcp, a few custom), some sticky,
  a few with upstream TLS or their own drain timeout;
- backends with distinct 10.x.y.z addresses, ids unique across the file,
  weights on weighted pools, some max_connections, a few disabled.

--variant K (K >= 1) writes a deterministic modification of the same base, so
`lbc plan` has something realistic to diff: weights change in ~1% of pools, a
backend leaves a few consistent_hash pools, one backend is disabled, one health
check interval changes, and a pool is added with a route to it inserted in the
middle of one listener's routes. --variant 0 (the default) is the base.

Output is a pure function of the arguments (no clock, no hash()): the same
arguments always give the same bytes. Only the standard library is used.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path
from typing import Any

TEAMS = ("payments", "search", "catalog", "checkout", "identity", "media", "ads", "maps",
         "billing", "notify", "reports", "inventory", "shipping", "reviews", "pricing", "chat")
KINDS = ("api", "web", "grpc-gw", "images", "auth", "feed", "export", "admin", "static", "events", "ws", "graphql")
PORTS = {"api": 8080, "web": 8000, "grpc-gw": 9090, "images": 8081, "auth": 8443, "feed": 8080,
         "export": 9000, "admin": 8088, "static": 80, "events": 7000, "ws": 8085, "graphql": 4000}
LISTENER_NAMES = ("edge-public", "edge-internal", "partner-api", "admin", "mobile", "legacy")

# (algorithm, relative frequency)
ALGORITHMS = (
    ("round_robin", 28),
    ("weighted_round_robin", 12),
    ("least_connections", 14),
    ("weighted_least_connections", 10),
    ("consistent_hash", 14),
    ("ip_hash", 8),
    ("random", 6),
    ("power_of_two", 8),
)
WEIGHTED = {"weighted_round_robin", "weighted_least_connections", "random", "consistent_hash", "ip_hash"}
HASH_KEYS = ("source_ip", "header:X-User-ID", "cookie:session", "uri", "header:X-Tenant")


def pick(rng: random.Random, table: tuple[tuple[str, int], ...]) -> str:
    return rng.choices([a for a, _ in table], weights=[w for _, w in table])[0]


# -- the model --------------------------------------------------------------------


class Addresses:
    """Distinct 10.x.y.z addresses (last octet 1..254) from a counter."""

    def __init__(self, start: int = 0) -> None:
        self.n = start

    def next(self) -> str:
        n = self.n
        self.n += 1
        hi, lo = divmod(n, 254)
        if hi >= 65536:
            raise SystemExit("gen_config: more backends than 10.0.0.0/8 holds")
        return f"10.{hi >> 8}.{hi & 255}.{lo + 1}"


def make_backends(rng: random.Random, pool: str, algorithm: str, count: int, port: int,
                  addresses: Addresses, http_check: bool, first_index: int = 1) -> list[dict[str, Any]]:
    weighted = algorithm in WEIGHTED and (algorithm != "consistent_hash" or rng.random() < 0.5)
    backends = []
    for j in range(count):
        b: dict[str, Any] = {"id": f"{pool}-{first_index + j:02d}", "address": addresses.next(), "port": port}
        if weighted:
            b["weight"] = rng.choice((1, 1, 1, 2, 2, 3, 4, 5, 10))
        if rng.random() < 0.2:
            b["max_connections"] = rng.choice((100, 250, 500, 1000, 2000))
        if j > 0 and rng.random() < 0.01:
            b["enabled"] = False
        if http_check and rng.random() < 0.02:
            b["health_check_path"] = "/healthz/deep"
        backends.append(b)
    return backends


def make_pool(rng: random.Random, index: int, backends: int, addresses: Addresses, prefix: str = "") -> dict[str, Any]:
    team, kind = TEAMS[index % len(TEAMS)], KINDS[(index // len(TEAMS) + index) % len(KINDS)]
    name = f"{prefix}{team}-{kind}-{index:04d}"
    algorithm = pick(rng, ALGORITHMS)
    pool: dict[str, Any] = {"name": name, "algorithm": algorithm}
    if algorithm == "consistent_hash":
        pool["hash_key"] = rng.choice(HASH_KEYS)
    elif algorithm == "ip_hash" and rng.random() < 0.5:
        pool["hash_key"] = "source_ip"  # the default, sometimes written out
    http_check = False
    r = rng.random()
    if r < 0.55:
        http_check = True
        hc: dict[str, Any] = {"type": "http", "path": rng.choice(("/healthz", "/health", "/status", "/-/ready")),
                              "interval": rng.choice(("5s", "5s", "10s", "2s")), "timeout": "1s"}
        if rng.random() < 0.3:
            hc["expect_status"] = rng.choice(("200", "200-299", "200,204"))
        if rng.random() < 0.2:
            hc["healthy_threshold"], hc["unhealthy_threshold"] = 3, 2
        if rng.random() < 0.05:
            hc["host"] = f"{kind}.{team}.internal"
        pool["health_check"] = hc
    elif r < 0.82:
        pool["health_check"] = {"type": "tcp", "interval": rng.choice(("5s", "10s")), "timeout": "2s"}
    elif r < 0.86:
        pool["health_check"] = {"type": "custom", "command": f"/usr/local/bin/check-{kind} --quiet",
                                "interval": "30s", "timeout": "10s"}
    # else: no health check (~14%)
    if algorithm not in ("consistent_hash", "ip_hash") and rng.random() < 0.15:
        mode = rng.choice(("cookie", "cookie", "source_ip", "header"))
        sticky: dict[str, Any] = {"mode": mode}
        if mode == "cookie":
            sticky["cookie_name"] = f"{team.upper()}_SID"
            sticky["ttl"] = rng.choice(("30m", "1h", "8h"))
        elif mode == "header":
            sticky["header"] = "X-Session-ID"
            sticky["ttl"] = "2h"
        else:
            sticky["ttl"] = "1h"
            if rng.random() < 0.3:
                sticky["store"] = "redis://redis-0.internal:6379/2"
        pool["sticky"] = sticky
    if rng.random() < 0.1:
        pool["drain_timeout"] = rng.choice(("60s", "2m", "5m"))
    if rng.random() < 0.05:
        pool["tls"] = {"verify": True, "sni": f"{kind}.{team}.internal"}
    pool["backends"] = make_backends(rng, name, algorithm, backends, PORTS[kind], addresses, http_check)
    return pool


def make_match(rng: random.Random, pool: dict[str, Any], index: int) -> dict[str, Any]:
    team, kind = TEAMS[index % len(TEAMS)], pool["name"].split("-", 1)[1].rsplit("-", 1)[0]
    r = rng.random()
    if r < 0.40:
        return {"path_prefix": f"/{team}/{kind}/{index}"}
    if r < 0.60:
        return {"host": f"{kind}-{index}.{team}.example.com"}
    if r < 0.65:
        return {"host": f"*.{kind}-{index}.{team}.example.com"}
    if r < 0.80:
        headers = {"X-Service": f"{kind}-{index}"}
        if rng.random() < 0.3:
            headers["X-Tenant"] = team
        return {"headers": headers}
    if r < 0.90:
        return {"host": f"{team}.example.com", "path_prefix": f"/{kind}/{index}"}
    if r < 0.95:
        return {"path_prefix": f"/{team}/{kind}/{index}",
                "method": rng.choice(("GET", "POST", ["GET", "HEAD"], ["POST", "PUT", "PATCH"]))}
    return {"path_regex": f"^/v[0-9]+/{team}/{kind}-{index}(/|$)"}


def make_listener(rng: random.Random, index: int) -> dict[str, Any]:
    name = LISTENER_NAMES[index] if index < len(LISTENER_NAMES) else f"listener-{index}"
    listener: dict[str, Any] = {"name": name, "bind": f"0.0.0.0:{8080 + index}", "protocol": "http"}
    if index % 2 == 0:
        listener["add_request_headers"] = {"X-Edge": name}
        listener["remove_request_headers"] = ["X-Debug", "X-Internal-Auth"]
    if index % 3 == 0:
        listener["add_response_headers"] = {"Strict-Transport-Security": "max-age=31536000"}
    if index % 2 == 1:
        listener["timeouts"] = {"idle": "120s", "response": "30s"}
        listener["limits"] = {"max_body": "10MiB", "max_header_count": 200}
    listener["routes"] = []
    return listener


def split_counts(total: int, parts: int) -> list[int]:
    """Uneven shares (the first listener is the busiest), each at least 1."""
    weights = [1 / (i + 1) for i in range(parts)]
    counts = [max(1, int(total * w / sum(weights))) for w in weights]
    counts[0] += total - sum(counts)
    return counts


def build(pools: int, backends: int, listeners: int, seed: int) -> dict[str, Any]:
    rng = random.Random(f"lbc-bench:{seed}")
    listeners = max(1, min(listeners, pools))
    addresses = Addresses()
    pool_list = [make_pool(rng, i, backends, addresses) for i in range(pools)]
    listener_list = [make_listener(rng, i) for i in range(listeners)]
    start = 0
    for listener, count in zip(listener_list, split_counts(pools, listeners), strict=True):
        for i in range(start, start + count):
            pool = pool_list[i]
            if i == start + count - 1:
                listener["routes"].append({"pool": pool["name"]})  # the default route, last
            else:
                listener["routes"].append({"match": make_match(rng, pool, i), "pool": pool["name"]})
        start += count
    return {
        "version": 1,
        "global": {"workers": 4, "drain_timeout": "30s"},
        "listeners": listener_list,
        "pools": pool_list,
    }


def apply_variant(config: dict[str, Any], variant: int, seed: int, backends: int) -> list[str]:
    """Modify `config` in place; returns what changed, one line each."""
    rng = random.Random(f"lbc-bench-variant:{seed}:{variant}")
    pools, listeners = config["pools"], config["listeners"]
    notes: list[str] = []
    used = sum(len(p["backends"]) for p in pools)  # addresses the base took

    # Weights change in ~1% of pools, mostly pools whose algorithm honours them.
    weighted = [p for p in pools if p["algorithm"] in WEIGHTED]
    count = max(1, round(len(pools) * 0.01))
    n_weighted = min(len(weighted), round(count * 0.8))
    chosen = rng.sample(weighted, n_weighted)
    others = [p for p in pools if p not in chosen]
    chosen += rng.sample(others, min(len(others), count - n_weighted))
    for pool in chosen:
        for b in rng.sample(pool["backends"], min(len(pool["backends"]), rng.randint(1, 3))):
            old = b.get("weight", 1)
            b["weight"] = rng.choice([w for w in (1, 2, 3, 5, 8, 10) if w != old])
        notes.append(f"weights changed in {pool['name']} ({pool['algorithm']})")

    # A backend leaves a few consistent_hash pools (~2% of them, at least 1).
    hashed = [p for p in pools if p["algorithm"] == "consistent_hash" and len(p["backends"]) > 1]
    for pool in rng.sample(hashed, min(len(hashed), max(1, round(len(hashed) * 0.02)))):
        gone = pool["backends"].pop(rng.randrange(len(pool["backends"])))
        if not any(b.get("enabled", True) for b in pool["backends"]):
            pool["backends"][0].pop("enabled", None)
        notes.append(f"backend {gone['id']} removed from {pool['name']} (consistent_hash)")

    # One backend of a non-hashing pool is disabled (drained).
    plain = [p for p in pools if p["algorithm"] in ("round_robin", "least_connections")
             and sum(b.get("enabled", True) for b in p["backends"]) > 1]
    if plain:
        pool = rng.choice(plain)
        b = rng.choice([b for b in pool["backends"] if b.get("enabled", True)])
        b["enabled"] = False
        notes.append(f"backend {b['id']} disabled in {pool['name']}")

    # One health check interval changes.
    checked = [p for p in pools if "health_check" in p and p["health_check"]["type"] != "custom"]
    if checked:
        pool = rng.choice(checked)
        hc = pool["health_check"]
        hc["interval"] = "15s" if hc.get("interval") != "15s" else "20s"
        notes.append(f"health check interval of {pool['name']} -> {hc['interval']}")

    # A pool is added, and a route to it inserted before a listener's default.
    addresses = Addresses(start=used + 1000 * variant)  # past every base address
    new = make_pool(rng, len(pools), backends, addresses, prefix=f"added{variant}-")
    pools.append(new)
    listener = rng.choice(listeners)
    at = rng.randrange(len(listener["routes"]))  # before the default, which stays last
    listener["routes"].insert(at, {"match": {"path_prefix": f"/new/{new['name']}"}, "pool": new["name"]})
    notes.append(f"pool {new['name']} ({new['algorithm']}, {len(new['backends'])} backends) added, "
                 f"routed from {listener['name']} routes[{at}]")
    return notes


# -- YAML output ---------------------------------------------------------------------

# Strings lbc's YAML 1.2 core-schema resolver (or a YAML 1.1 reader) would not
# read back as strings, and characters that need quoting: quote those.
_NOT_STRING = re.compile(
    r"^(?:~|null|Null|NULL|true|True|TRUE|false|False|FALSE|yes|Yes|YES|no|No|NO|on|On|ON|off|Off|OFF|y|Y|n|N)$"
    r"|^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$"
    r"|^0o[0-7]+$|^0x[0-9a-fA-F]+$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"
)
_PLAIN = re.compile(r"^[A-Za-z0-9/_.][A-Za-z0-9/_.=+-]*$")


def scalar(value: Any) -> str:
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if _PLAIN.match(value) and not _NOT_STRING.match(value):
        return value
    return json.dumps(value)  # a JSON string is a valid double-quoted YAML scalar


def _flow(value: Any) -> str | None:
    """One-line flow form of a small mapping of scalars (or lists of scalars)."""
    if isinstance(value, list):
        if all(not isinstance(v, (dict, list)) for v in value):
            return "[" + ", ".join(scalar(v) for v in value) + "]"
        return None
    if not isinstance(value, dict) or not value:
        return None
    parts = []
    for k, v in value.items():
        if isinstance(v, dict):
            return None
        text = _flow(v) if isinstance(v, list) else scalar(v)
        if text is None:
            return None
        parts.append(f"{k}: {text}")
    text = "{" + ", ".join(parts) + "}"
    return text if len(text) <= 110 else None


def emit(value: Any, indent: int, out: list[str]) -> None:
    pad = " " * indent
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, (dict, list)):
                flow = _flow(v)
                if flow is not None and (isinstance(v, dict) or len(flow) <= 60):
                    out.append(f"{pad}{k}: {flow}")
                else:
                    out.append(f"{pad}{k}:")
                    emit(v, indent + 2, out)
            else:
                out.append(f"{pad}{k}: {scalar(v)}")
    elif isinstance(value, list):
        for item in value:
            flow = _flow(item) if isinstance(item, dict) and "backends" not in item else None
            if flow is not None:
                out.append(f"{pad}- {flow}")
            elif isinstance(item, dict):
                sub: list[str] = []
                emit(item, indent + 2, sub)
                sub[0] = f"{pad}- {sub[0][indent + 2:]}"
                out.extend(sub)
            else:
                out.append(f"{pad}- {scalar(item)}")
    else:
        out.append(f"{pad}{scalar(value)}")


def render(config: dict[str, Any], header: str) -> str:
    out = [f"# {line}" if line else "#" for line in header.splitlines()]
    top = dict(config)
    out.append(f"version: {top.pop('version')}")
    for key in ("global", "listeners", "pools"):
        out.append(f"{key}:")
        emit(top[key], 2, out)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pools", type=int, default=1000, help="number of pools (one route each); default 1000")
    ap.add_argument("--backends", type=int, default=10, help="backends per pool; default 10")
    ap.add_argument("--listeners", type=int, default=4, help="http listeners; default 4")
    ap.add_argument("--seed", type=int, default=1, help="random seed of the base config; default 1")
    ap.add_argument("--variant", type=int, default=0, help="0: the base; K >= 1: a deterministic modification")
    ap.add_argument("-o", "--out", default="-", help="output file; default stdout")
    ap.add_argument("-q", "--quiet", action="store_true", help="no summary on stderr")
    args = ap.parse_args(argv)
    if args.pools < 1 or args.backends < 1 or args.listeners < 1 or args.variant < 0:
        ap.error("--pools, --backends and --listeners must be at least 1, --variant at least 0")

    config = build(args.pools, args.backends, args.listeners, args.seed)
    notes = apply_variant(config, args.variant, args.seed, args.backends) if args.variant else []
    n_backends = sum(len(p["backends"]) for p in config["pools"])
    n_routes = sum(len(x["routes"]) for x in config["listeners"])
    header = (
        f"Generated by bench/gen_config.py --pools {args.pools} --backends {args.backends} "
        f"--listeners {args.listeners} --seed {args.seed} --variant {args.variant}\n"
        f"{len(config['listeners'])} listeners, {n_routes} routes, {len(config['pools'])} pools, {n_backends} backends"
        + "".join(f"\nvariant: {n}" for n in notes)
    )
    text = render(config, header)
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text, encoding="utf-8")
    if not args.quiet:
        print(f"gen_config: {len(config['listeners'])} listeners, {n_routes} routes, {len(config['pools'])} pools, "
              f"{n_backends} backends, {len(text.encode()):,} bytes"
              + (f" -> {args.out}" if args.out != "-" else ""), file=sys.stderr)
        for n in notes:
            print(f"gen_config: variant {args.variant}: {n}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
