"""The algorithms through a real worker (workers: 1): exact sequences for the
deterministic ones, 5-sigma distributions for the random ones, and hash
picks that agree with what `lbc plan` computes."""

from __future__ import annotations

import http.client
import math
import threading
from collections import Counter

import pytest
from support.node import get

from lbc.hashing import lookup_table, pick_index

pytestmark = pytest.mark.timeout(180)

POOLS = {
    "rr": ("round_robin", [1, 1, 1], ""),
    "wrr": ("weighted_round_robin", [5, 1, 1], ""),
    "lc": ("least_connections", [1, 1, 1], ""),
    "ip": ("ip_hash", [1, 1, 1], ""),
    "ch": ("consistent_hash", [2, 1, 1], "    hash_key: header:X-User\n"),
    "rand": ("random", [3, 1, 1], ""),
}


def config(ip: str) -> str:
    routes = "".join(f"      - {{match: {{path_prefix: /{name}/}}, pool: {name}}}\n" for name in POOLS)
    pools = ""
    for name, (algorithm, weights, extra) in POOLS.items():
        pools += f"  - name: {name}\n    algorithm: {algorithm}\n{extra}    backends:\n"
        for letter, weight, port in zip("abc", weights, (9101, 9102, 9103), strict=True):
            pools += f"      - {{id: {name}-{letter}, address: {ip}, port: {port}, weight: {weight}}}\n"
        if name == "rr":
            pools += f"      - {{id: rr-d, address: {ip}, port: 9104, enabled: false}}\n"
    return (f"version: 1\nglobal: {{workers: 1}}\nlisteners:\n  - name: web\n    bind: \"{ip}:8080\"\n    routes:\n"
            f"{routes}      - pool: rr\npools:\n{pools}")


@pytest.fixture
def live(node, origins, ip):
    for letter, port in zip("abcd", (9101, 9102, 9103, 9104), strict=True):
        origins(letter, http=[f"{ip}:{port}"])
    node.up(config(ip))
    conn = http.client.HTTPConnection(ip, 8080, timeout=10)
    yield conn
    conn.close()


def picks(conn, path: str, n: int, headers=None) -> str:
    return "".join(get("", 0, path, headers=headers, conn=conn)[2].decode().strip() for _ in range(n))


def test_round_robin_sequence_skips_disabled(live):
    assert picks(live, "/rr/", 9) == "abcabcabc"  # rr-d is disabled: never picked


def test_smooth_weighted_round_robin_sequence(live):
    assert picks(live, "/wrr/", 14) == "aabacaa" * 2


def test_least_connections_rotates_ties(live):
    assert picks(live, "/lc/", 6) == "abcabc"


def test_ip_hash_keeps_each_client_and_spreads_clients(live, ip):
    base = ip.rsplit(".", 1)[0]
    seen = {}
    for last in range(2, 32):
        source = f"{base}.{last}"
        got = set()
        for _ in range(3):
            conn = http.client.HTTPConnection(ip, 8080, timeout=10, source_address=(source, 0))
            got.add(get("", 0, "/ip/", conn=conn)[2])
            conn.close()
        assert len(got) == 1, source
        seen[source] = got.pop().decode().strip()
    ids = ["ip-a", "ip-b", "ip-c"]
    table = lookup_table("ip_hash", ids, [1, 1, 1])
    predicted = {s: ids[pick_index(table, s.encode())][-1] for s in seen}
    assert seen == predicted  # the worker picks what lbc plan predicts
    assert len(set(seen.values())) == 3


def test_consistent_hash_on_a_header_matches_the_plan(live):
    ids = ["ch-a", "ch-b", "ch-c"]
    table = lookup_table("consistent_hash", ids, [2, 1, 1])
    for user in (f"user-{i}" for i in range(60)):
        got = picks(live, "/ch/", 2, headers={"X-User": user})
        expected = ids[pick_index(table, user.encode())][-1]
        assert got == expected * 2, user
    # without the header: round robin, not one hot backend
    assert len(set(picks(live, "/ch/", 6))) == 3


def test_random_is_weighted_over_ten_thousand_requests(live, ip):
    n, threads = 10_000, 8
    counts: Counter = Counter()
    lock = threading.Lock()

    def run() -> None:
        conn = http.client.HTTPConnection(ip, 8080, timeout=10)
        local = Counter(picks(conn, "/rand/", n // threads))
        conn.close()
        with lock:
            counts.update(local)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(120)
    assert sum(counts.values()) == n
    for letter, p in (("a", 0.6), ("b", 0.2), ("c", 0.2)):
        sigma = math.sqrt(n * p * (1 - p))
        assert abs(counts[letter] - n * p) <= 5 * sigma, (letter, counts)
