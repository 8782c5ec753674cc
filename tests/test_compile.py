"""Compiling: deterministic, content-addressed, normalized; key material never
leaves the secrets directory."""

from __future__ import annotations

import hashlib
import json
import os
import stat

from conftest import EXAMPLE, https_config, lbc

from lbc import service, table
from lbc.hashing import hash64, lookup_table, maglev_table, pick_index


def test_same_yaml_same_bytes_across_processes(tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"t{i}.json"
        result = lbc("compile", str(EXAMPLE), "-o", str(out), env={"PYTHONHASHSEED": str(i + 1)})
        assert result.returncode == 0, result.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    version = hashlib.sha256(outs[0]).hexdigest()
    assert version in result.stderr
    stdout = lbc("compile", str(EXAMPLE))
    assert stdout.stdout.encode() == outs[0] + b"\n"


def test_order_comments_and_spelling_do_not_change_the_version(write):
    a = write("a.yaml", """\
version: 1
global: {drain_timeout: 30s}
listeners:
  - {name: web, bind: "127.0.0.1:8080", routes: [{pool: web}]}
  - {name: tcp, bind: "127.0.0.1:9000", protocol: tcp, pool: db}
pools:
  - name: web
    backends: [{id: w1, address: 127.0.0.1, port: 9101}]
  - name: db
    backends: [{id: d1, address: 127.0.0.1, port: 5432}]
""")
    b = write("b.yaml", """\
# same intent: other order, other spellings of the same values, defaults written out
pools:
  - name: db
    backends:
      - {port: 5432, address: 127.0.0.1, id: d1, weight: 1}
  - backends: [{id: w1, address: 127.0.0.1, port: 9101, enabled: true}]
    name: web
    algorithm: round_robin
listeners:
  - name: tcp
    protocol: tcp
    bind: 127.0.0.1:9000
    pool: db
  - bind: 127.0.0.1:8080
    name: web
    protocol: http
    timeouts: {idle: 1m}
    routes:
      - pool: web
global: {drain_timeout: 30000ms}
version: 1
""")
    assert service.compile_file(a).version == service.compile_file(b).version


def test_normalized_values(write):
    cfg = write("n.yaml", """\
version: 1
listeners:
  - name: web
    bind: "[::1]:8080"
    timeouts: {client_header: 2.5s, idle: 0.1}
    limits: {max_request_head: 32KiB, max_body: 1MB}
    add_request_headers: {X-Env: prod}
    remove_request_headers: [X-Debug]
    routes:
      - match: {host: API.Example.com, method: GET, headers: {X-B: "2", X-A: "1"}}
        pool: p
      - pool: p
pools:
  - name: p
    algorithm: consistent_hash
    health_check: {type: tcp, path: /ignored-for-tcp-is-an-error-so-absent}
    backends: [{id: a, address: "::1", port: 1}]
""".replace("path: /ignored-for-tcp-is-an-error-so-absent", "interval: 2s, timeout: 1500ms"))
    t = service.compile_file(cfg).table
    [listener] = t.listeners
    assert (listener.host, listener.port, listener.bind) == ("::1", 8080, "[::1]:8080")
    assert listener.timeouts.client_header_ms == 2500 and listener.timeouts.idle_ms == 100
    assert listener.limits.max_request_head == 32768 and listener.limits.max_body == 1_000_000
    assert listener.add_request_headers == (("x-env", "prod"),)
    assert listener.remove_request_headers == ("x-debug",)
    match = listener.routes[0].match
    assert match.host == "api.example.com" and match.methods == ("GET",)
    assert match.headers == (("x-a", "1"), ("x-b", "2"))
    [pool] = t.pools
    assert pool.hash_key == "source_ip"  # the default, named in the table
    hc = pool.health_check
    assert (hc.type, hc.path, hc.method, hc.interval_ms, hc.timeout_ms) == ("tcp", None, None, 2000, 1500)
    assert t.hash == table.HASH_NAME
    assert pool.drain_timeout_ms == t.settings.drain_timeout_ms == 30000


def test_table_round_trips_and_rejects_tampering():
    compiled = service.compile_file(EXAMPLE)
    assert table.load(compiled.data, expected_version=compiled.version) == compiled.table
    tampered = compiled.data.replace(b'"weight":3', b'"weight":4')
    try:
        table.load(tampered, expected_version=compiled.version)
    except table.TableError as e:
        assert "do not hash" in str(e)
    else:
        raise AssertionError("tampered table loaded")
    plain = json.loads(compiled.data)
    plain["pools"][0]["backends"][0]["weight"] = 0
    try:
        table.load(table.canonical(plain))
    except table.TableError as e:
        assert "weight out of range" in str(e)
    else:
        raise AssertionError("invalid table loaded")


def test_key_material_never_leaves_the_secrets_directory(write, tmp_path, tls_files):
    cfg = write("tls.yaml", https_config(tls_files["www_cert"], tls_files["www_key"]))

    state = tmp_path / "state"
    key = tls_files["www_key"].read_text()
    body = [line for line in key.splitlines() if line and not line.startswith("-----")]
    outputs = [
        lbc("compile", str(cfg)).stdout,
        lbc("plan", str(cfg), "--state", str(state)).stdout,
        lbc("plan", str(cfg), "--state", str(state), "--json", "--out", str(tmp_path / "plan.json")).stdout,
        (tmp_path / "plan.json").read_text(),
        lbc("apply", str(cfg), "--state", str(state)).stdout,
        lbc("history", "--state", str(state), "--json").stdout,
        lbc("show", "--state", str(state)).stdout,
    ]
    outputs += [p.read_text() for p in (state / "tables").iterdir()]
    outputs.append((state / "history.jsonl").read_text())
    for text in outputs:
        assert "PRIVATE KEY" not in text
        assert not any(chunk in text for chunk in body)
    key_digest = hashlib.sha256(tls_files["www_key"].read_bytes()).hexdigest()
    secret = state / "secrets" / key_digest
    assert secret.read_text() == key
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(state / "secrets").st_mode) == 0o700
    shown = json.loads(outputs[6])
    assert shown["listeners"][0]["tls"]["certificates"][0]["key_sha256"] == key_digest
    assert "www.example.test" in shown["listeners"][0]["tls"]["certificates"][0]["names"]


# -- the named hash: every worker and node must agree, forever --------------------


def test_named_hash_is_fixed():
    # Changing these values would send every sticky client elsewhere on upgrade.
    assert hash64(b"10.0.0.1") == 0x519F31B57B997975
    assert hash64(b"") == 0xE3E5AF92DF74AAE8


def test_maglev_spreads_by_weight_and_moves_about_one_nth():
    ids = [f"b{i}" for i in range(10)]
    table10 = maglev_table(ids, [1] * 10)
    counts = [table10.count(i) for i in range(10)]
    assert max(counts) - min(counts) <= len(table10) * 0.02
    weighted = maglev_table(["a", "b"], [3, 1])
    assert abs(weighted.count(0) / len(weighted) - 0.75) < 0.01

    keys = [f"k{i}".encode() for i in range(20000)]
    before = [ids[pick_index(table10, k)] for k in keys]
    ids9 = ids[:4] + ids[5:]
    table9 = maglev_table(ids9, [1] * 9)
    after = [ids9[pick_index(table9, k)] for k in keys]
    moved = sum(a != b for a, b in zip(before, after, strict=True)) / len(keys)
    # about 1/N: the removed backend's keys, plus Maglev's small disruption
    assert 0.08 < moved < 0.14, moved


def test_ip_hash_is_map_based():
    t = lookup_table("ip_hash", ["a", "b", "c"], [2, 1, 1])
    assert t == (0, 0, 1, 2)
