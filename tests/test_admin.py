"""The admin API against a running node: every endpoint and documented
status, each response checked against schemas/admin-api.yaml; changes that
reach the workers; history, drift and dynamic pools; the token; /metrics
parsed with prometheus-client and matched against the requests sent."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import lbc
from openapi_core import OpenAPI
from openapi_core.testing import MockRequest, MockResponse
from prometheus_client.parser import text_string_to_metric_families
from support.node import get, wait_until

from lbc.admin.app import spec_path
from lbc.state import StateDir

pytestmark = pytest.mark.timeout(240)
SPEC = OpenAPI.from_file_path(str(spec_path()))
CHECK = "{type: http, path: /health, interval: 300ms, timeout: 250ms, healthy_threshold: 1, unhealthy_threshold: 1}"


def config(ip: str, *, web_backends: str = "a", extra_global: str = "", web_extra: str = "",
           app_extra: str = "    backends: [{{id: app-1, address: {ip}, port: 9111}}]\n") -> str:
    backends = "".join(f"      - {{id: {b}, address: {ip}, port: {9100 + ord(b) - 96}}}\n" for b in web_backends)
    return (f"version: 1\nglobal: {{workers: 2, drain_timeout: 2s, admin: {{bind: \"{ip}:9900\"{extra_global}}}}}\n"
            f"listeners:\n  - name: web\n    bind: \"{ip}:8080\"\n    routes:\n"
            f"      - {{match: {{path_prefix: /app}}, pool: app}}\n      - pool: web\n"
            f"pools:\n  - name: web\n    health_check: {CHECK}\n{web_extra}    backends:\n{backends}"
            f"  - name: app\n{app_extra.format(ip=ip)}")


class Admin:
    def __init__(self, ip: str, token: str | None = None) -> None:
        self.ip, self.token = ip, token

    def ready(self) -> bool:
        try:
            return self.call("GET", "/healthz", check=False)[0] == 200
        except OSError:
            return False

    def call(self, method: str, path: str, body=None, *, raw: bytes | None = None, token: str | None = None,
             check: bool = True) -> tuple[int, object]:
        c = http.client.HTTPConnection(self.ip, 9900, timeout=60)
        headers = {"Content-Type": "application/json"}
        if token or self.token:
            headers["Authorization"] = f"Bearer {token or self.token}"
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        try:
            c.request(method, path, body=data, headers=headers)
            r = c.getresponse()
            payload = r.read()
            ctype = r.getheader("content-type", "")
        finally:
            c.close()
        if check and path.split("?")[0] != "/metrics":  # every answer as the contract says
            result = SPEC.unmarshal_response(
                MockRequest(f"http://{self.ip}:9900", method.lower(), path, data=data),
                MockResponse(payload, r.status, content_type=ctype.split(";")[0]))
            assert not result.errors, (method, path, r.status, payload, result.errors)
        return r.status, (json.loads(payload) if ctype.startswith("application/json") else payload.decode())


@pytest.fixture
def stack(node, origins, ip):
    for letter in "abcd":
        origins(letter, http=[f"{ip}:{9100 + ord(letter) - 96}"])
    origins("sick", http=[f"{ip}:9109"], status=500)
    origins("app-1", http=[f"{ip}:9111"])
    node.up(config(ip))
    admin = Admin(ip)
    assert wait_until(lambda: admin.ready(), 10)
    return admin


def served(ip: str, n: int, path: str = "/") -> list[str]:
    conn = http.client.HTTPConnection(ip, 8080, timeout=10)
    out = [get(ip, 8080, path, conn=conn)[2].decode().strip() for _ in range(n)]
    conn.close()
    return out


def test_add_backends_get_traffic_once_healthy_and_a_removed_one_drains(stack, node, ip):
    status, body = stack.call("POST", "/backends", {"address": ip, "port": 9102, "pool": "web"})
    assert status == 201 and body["status"] == "unknown" and body["pool"] == "web" and body["weight"] == 1
    b_id = body["backend_id"]
    status, sick = stack.call("POST", "/backends", {"address": ip, "port": 9109, "pool": "web", "weight": 3})
    assert status == 201
    assert wait_until(lambda: stack.call("GET", f"/backends/{b_id}/health")[1]["status"] == "healthy", 5)
    assert wait_until(lambda: stack.call("GET", f"/backends/{sick['backend_id']}/health")[1]["status"] == "unhealthy", 5)
    # Workers look at health every 50 ms: b may lag its status by that. The failing one never gets traffic.
    answers: list[str] = []
    assert wait_until(lambda: set(answers.extend(served(ip, 20)) or answers[-20:]) == {"a", "b"}, 2), answers[-20:]
    assert set(answers) <= {"a", "b"}, set(answers)
    assert wait_until(lambda: {b["backend_id"]: b for b in stack.call("GET", "/backends")[1]["backends"]}[b_id][
        "total_requests"] >= 10, 2)  # counters are published four times a second
    listed = {b["backend_id"]: b for b in stack.call("GET", "/backends")[1]["backends"]}
    assert listed[b_id]["origin"] == "api" and listed["a"]["origin"] == "file"
    h = stack.call("GET", f"/backends/{b_id}/health")[1]
    assert h["total_requests"] >= 10 and h["avg_response_ms"] > 0 and h["last_check"] and h["consecutive_successes"] >= 1

    # removal: in flight requests finish, new ones never reach it
    status, body = stack.call("DELETE", f"/backends/{b_id}")
    assert (status, body["status"], body["backend_id"]) == (200, "draining", b_id)
    assert set(served(ip, 20)) == {"a"}
    assert stack.call("DELETE", f"/backends/{b_id}")[0] == 404
    assert stack.call("GET", f"/backends/{b_id}/health")[0] == 404
    history = StateDir(node.state).history()
    assert [r.origin for r in history[-3:]] == ["api", "api", "api"]
    assert history[-1].command == f"api: DELETE /backends/{b_id}"


@pytest.mark.parametrize("body, status, words", [
    ({"address": "not an address!", "port": 9102, "pool": "web"}, 400, "not an IPv4"),
    ({"address": "127.0.0.1", "port": 70000, "pool": "web"}, 400, "does not match"),
    ({"address": "127.0.0.1", "port": 9102, "pool": "nope"}, 400, "unknown pool"),
    ({"address": "127.0.0.1", "port": 9102}, 400, "name one with `pool`"),
    ({"address": "127.0.0.1", "port": 9102, "pool": "web", "extra": 1}, 400, "does not match"),
    ({"port": 9102, "pool": "web"}, 400, "does not match"),
])
def test_bad_additions_are_400_and_change_nothing(stack, node, body, status, words):
    before = StateDir(node.state).current_version()
    code, answer = stack.call("POST", "/backends", body)
    assert code == status and words in json.dumps(answer), answer
    assert set(answer) <= {"error", "detail"}
    assert StateDir(node.state).current_version() == before


def test_conflicts_limits_and_unknown_paths(stack, ip):
    code, answer = stack.call("POST", "/backends", {"address": ip, "port": 9101, "pool": "web"})
    assert code == 409 and "already in pool web as backend a" in answer["error"]
    code, answer = stack.call("POST", "/backends", raw=b'{"address": "' + b"x" * 70_000 + b'", "port": 1}')
    assert code == 413
    assert stack.call("POST", "/backends", raw=b"{not json")[0] == 400
    assert stack.call("GET", "/nope", check=False)[0] == 404
    c = http.client.HTTPConnection(ip, 9900, timeout=10)
    c.request("TRACE", "/backends")
    r = c.getresponse()
    assert r.status == 405 and set(r.getheader("allow").split(", ")) >= {"GET", "POST"}  # RFC 9110 15.5.6
    r.read()
    c.close()
    code, answer = stack.call("DELETE", "/backends/app-1")  # as validation refuses a pool without backends
    assert code == 409 and "last enabled backend of pool app" in answer["error"]
    c = http.client.HTTPConnection(ip, 9900, timeout=10)  # a page reaching it by DNS rebinding names its own host
    c.request("GET", "/config", headers={"Host": "attacker.example:9900"})
    r = c.getresponse()
    assert r.status == 400 and "not this admin API's address" in r.read().decode()
    c.close()


def test_algorithm_switch_takes_effect_at_once(stack, ip):
    stack.call("POST", "/backends", {"address": ip, "port": 9102, "pool": "web"})
    assert wait_until(lambda: set(served(ip, 10)) == {"a", "b"}, 5)
    code, settings = stack.call("PUT", "/config/algorithm", {"algorithm": "consistent_hash", "pool": "web"})
    assert code == 200 and settings == {"pool": "web", "algorithm": "consistent_hash", "hash_key": "source_ip",
                                        "sticky": None, "backends": 2, "dynamic_backends": False,
                                        "set_by_api": ["algorithm"]}
    assert len(set(served(ip, 20))) == 1  # one client address: one backend, from the next request on
    code, settings = stack.call("PUT", "/config/algorithm", {"algorithm": "round_robin", "pool": "web",
                                                             "sticky_sessions": True, "sticky_ttl_seconds": 60})
    assert code == 200 and settings["sticky"] == {"mode": "cookie", "ttl_seconds": 60}
    status, headers, _ = get(ip, 8080, "/")
    assert status == 200 and headers["set-cookie"].startswith("SERVERID=") and "Max-Age=60" in headers["set-cookie"]
    for bad, words in (({"algorithm": "fastest", "pool": "web"}, "unknown algorithm"),
                       ({"algorithm": "random", "pool": "web", "sticky_ttl_seconds": 0}, "between 1 and 2592000"),
                       ({"algorithm": "random", "pool": "web", "sticky_ttl_seconds": 10**8}, "between 1 and 2592000"),
                       ({"algorithm": "random"}, "name one with `pool`")):
        code, answer = stack.call("PUT", "/config/algorithm", bad)
        assert code == 400 and words in answer["error"], answer


def test_config_and_healthz(stack, node):
    code, cfg = stack.call("GET", "/config")
    assert code == 200 and cfg["version"] == StateDir(node.state).current_version()
    assert [p["pool"] for p in cfg["pools"]] == ["app", "web"] and cfg["listeners"][0]["protocol"] == "http"
    code, h = stack.call("GET", "/healthz")
    assert code == 200 and h["status"] == "ok" and h["workers"] == h["serving"] == 2 and h["version"] == cfg["version"]
    # a worker that does not serve the live table: 503 until it does
    pid = node.worker_pids()[0]
    os.kill(pid, signal.SIGSTOP)
    try:
        assert node.apply(config(stack.ip, web_backends="ac"), "--no-wait").returncode == 0
        # within the apply's grace a worker counts while its heartbeat is fresh (3 s)
        assert wait_until(lambda: stack.call("GET", "/healthz")[0] == 503, 8)
        code, h = stack.call("GET", "/healthz")
        assert h["status"] == "unavailable" and "1 of 2 workers" in h["reason"], h
    finally:
        os.kill(pid, signal.SIGCONT)
    assert wait_until(lambda: stack.call("GET", "/healthz")[0] == 200, 10)


def node_check(node) -> subprocess.CompletedProcess[str]:
    """The script keepalived runs."""
    return subprocess.run([sys.executable, "-m", "lbc.nodecheck", "--state", str(node.state)],
                          capture_output=True, text=True, timeout=30)


def test_drain_node_fails_the_node_check_and_traffic_goes_on(stack, node):
    assert node_check(node).returncode == 0
    kept = http.client.HTTPConnection(stack.ip, 8080, timeout=10)  # a client already connected
    assert get(stack.ip, 8080, conn=kept)[0] == 200
    assert "drained" in node.lbc("drain-node").stdout
    code, h = stack.call("GET", "/healthz")
    assert code == 503 and h["draining"] and h["reason"] == "drained by lbc drain-node", h
    check = node_check(node)
    assert check.returncode == 1 and "drained" in check.stdout
    assert "unavailable: drained" in node.lbc("status").stdout
    assert get(stack.ip, 8080, conn=kept)[0] == 200  # the node still serves what reaches it
    assert get(stack.ip, 8080)[0] == 200
    kept.close()
    assert "takes traffic again" in node.lbc("drain-node", "--undo").stdout
    code, h = stack.call("GET", "/healthz")
    assert code == 200 and not h["draining"]
    assert node_check(node).returncode == 0


def test_node_check_fails_without_serving_workers(stack, node):
    for pid in node.worker_pids().values():
        os.kill(pid, signal.SIGSTOP)  # wedged: alive, but no heartbeat
    try:
        # each worker's heartbeat goes stale on its own clock: one may be seen before the other
        assert wait_until(lambda: (lambda r: r.returncode == 1 and "2 of 2 workers" in r.stdout)(node_check(node)), 6)
    finally:
        for pid in node.worker_pids().values():
            os.kill(pid, signal.SIGCONT)
    assert wait_until(lambda: node_check(node).returncode == 0, 6)


def test_drift_is_shown_by_plan_and_undone_by_apply(stack, node, ip):
    b = stack.call("POST", "/backends", {"address": ip, "port": 9103, "pool": "web"})[1]["backend_id"]
    stack.call("PUT", "/config/algorithm", {"algorithm": "least_connections", "pool": "web"})
    plan = node.lbc("plan", str(node.config))
    assert plan.returncode == 0, plan.stderr
    text = plan.stdout
    assert f'- backend "{b}"' in text and "# drift: set through the admin API" in text
    assert '~ algorithm: "least_connections" -> "round_robin"' in text
    assert "2 of these changes undo drift" in text and "(the file wins)" in text
    applied = node.lbc("apply", str(node.config))
    assert applied.returncode == 0 and "the file wins" in applied.stdout
    cfg = stack.call("GET", "/config")[1]
    web = next(p for p in cfg["pools"] if p["pool"] == "web")
    assert (web["algorithm"], web["backends"], web["set_by_api"]) == ("round_robin", 1, [])
    assert node.lbc("plan", str(node.config)).stdout.strip() == "No changes."


def test_dynamic_pools_keep_the_apis_backends_and_survive_down_up(stack, node, ip):
    dynamic = "    dynamic_backends: true\n"
    text = config(ip, web_extra=dynamic)
    assert node.apply(text).returncode == 0
    ids = [stack.call("POST", "/backends", {"address": ip, "port": port, "pool": "web"})[1]["backend_id"]
           for port in (9102, 9103)]
    changed = config(ip, web_extra=dynamic + "    retries: 2\n")
    node.write(changed)
    plan = node.lbc("plan", str(node.config)).stdout
    assert "~ retries: 1 -> 2" in plan and "drift" not in plan and f'pool "web": {", ".join(ids)}' in plan
    assert node.lbc("apply", str(node.config)).returncode == 0
    assert {b["backend_id"] for b in stack.call("GET", "/backends")[1]["backends"]} >= set(ids)
    assert wait_until(lambda: set(served(ip, 12)) == {"a", "b", "c"}, 5)
    # down and up without a file: the live table, API changes included
    assert node.lbc("down").returncode == 0
    assert node.lbc("up").returncode == 0
    assert wait_until(lambda: stack.ready(), 10)
    assert {b["backend_id"] for b in stack.call("GET", "/backends")[1]["backends"]} >= set(ids)
    # up with a file applies it: a non-dynamic web pool drops the API's backends
    assert node.lbc("down").returncode == 0
    node.up(config(ip))
    assert wait_until(lambda: stack.ready(), 10)
    assert not {b["backend_id"] for b in stack.call("GET", "/backends")[1]["backends"]} & set(ids)


def test_a_token_file_makes_the_token_required(node, origins, ip, tmp_path):
    origins("a", http=[f"{ip}:9101"])
    (tmp_path / "admin.token").write_text("s3cret-token-0123456789\n")
    node.up(config(ip, extra_global=f", token_file: {tmp_path / 'admin.token'}",
                   app_extra="    backends: [{{id: app-1, address: {ip}, port: 9101}}]\n"))
    admin = Admin(ip)
    assert wait_until(lambda: admin.ready(), 10)  # liveness needs no token
    code, answer = admin.call("GET", "/backends")
    assert code == 401 and "bearer token" in answer["error"]
    assert admin.call("GET", "/backends", token="wrong")[0] == 401
    assert admin.call("GET", "/backends", token="s3cret-token-0123456789")[0] == 200
    assert admin.call("GET", "/metrics", check=False)[0] == 401


def test_token_rules_for_binds():
    from lbc.admin.__main__ import is_loopback
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("::")


def test_metrics_match_the_requests_sent(stack, ip):
    time.sleep(0.6)  # publications are 4 a second
    before = metrics(stack)
    served(ip, 37)
    served(ip, 5, "/app/x")
    time.sleep(0.6)
    after = metrics(stack)

    def delta(name, **labels):
        return after.get((name, tuple(sorted(labels.items()))), 0) - before.get((name, tuple(sorted(labels.items()))), 0)

    assert delta("lbc_listener_responses_total", listener="web", code_class="2xx") == 42
    assert delta("lbc_listener_request_seconds_count", listener="web") == 42
    assert delta("lbc_backend_requests_total", pool="web", backend="a") == 37
    assert delta("lbc_backend_responses_total", pool="web", backend="a", code_class="2xx") == 37
    assert delta("lbc_backend_requests_total", pool="app", backend="app-1") == 5
    assert delta("lbc_backend_response_seconds_count", pool="web", backend="a") == 37
    assert delta("lbc_backend_response_seconds_bucket", pool="web", backend="a", le="+Inf") == 37
    assert after[("lbc_backend_health", (("backend", "a"), ("pool", "web"), ("state", "healthy")))] == 1
    assert after[("lbc_reloads_total", (("result", "ok"),))] >= 2
    assert after[("lbc_up", ())] == 1
    assert ("lbc_worker_table_info", (("version", stack.call("GET", "/config")[1]["version"]), ("worker", "0"))) in after


def metrics(admin: Admin) -> dict:
    code, text = admin.call("GET", "/metrics")
    assert code == 200
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_a_pushed_table_is_checked_installed_and_rolled_back(stack, node, ip, tmp_path):
    """PUT /table and POST /table/rollback, the endpoints behind `lbc apply --node`."""
    v0, table0 = (lambda b: (b["version"], b["table"]))(stack.call("GET", "/table")[1])
    assert v0 == StateDir(node.state).current_version() and table0["pools"][0]["name"] == "app"

    # Through the command: one node named by host:port.
    changed = node.write(config(ip).replace("drain_timeout: 2s", "drain_timeout: 3s"), "changed.yaml")
    plan = node.lbc("plan", str(changed), "--node", f"{ip}:9900", "--detailed-exitcode")
    assert plan.returncode == 2 and "Plan: 0 to add, 3 to change, 0 to remove." in plan.stdout, plan.stdout
    assert f"live {v0[:12]}" in plan.stdout and "1 of 1 node would change." in plan.stdout
    applied = node.lbc("apply", str(changed), "--node", f"http://{ip}:9900")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    v1 = StateDir(node.state).current_version()
    assert v1 != v0 and f"serves {v1[:12]}" in applied.stdout and "is live on all 1 node." in applied.stdout
    record = StateDir(node.state).history()[-1]
    assert (record.origin, record.source) == ("push", str(changed.resolve()))
    assert set(served(ip, 4)) == {"a"}
    again = node.lbc("apply", str(changed), "--node", f"{ip}:9900")
    assert again.returncode == 0 and "already serves it" in again.stdout

    # Refusals change nothing.
    compiled = json.loads(lbc("compile", str(changed)).stdout)
    code, answer = stack.call("PUT", "/table", {"version": v1, "table": compiled, "expect": v0})
    assert code == 200 and answer["installed"] is False, answer  # planned against v0, but it is live already
    third = lbc("compile", str(node.write(config(ip).replace("drain_timeout: 2s", "drain_timeout: 4s"), "third.yaml")))
    stale = {"version": hashlib.sha256(third.stdout.strip().encode()).hexdigest(),
             "table": json.loads(third.stdout), "expect": v0}
    code, answer = stack.call("PUT", "/table", stale)
    assert code == 409 and "the live table is now" in answer["error"], answer
    moved = lbc("compile", str(node.write(config(ip).replace(":9900", ":9901"), "moved.yaml"))).stdout
    code, answer = stack.call("PUT", "/table", {"version": hashlib.sha256(moved.strip().encode()).hexdigest(),
                                                "table": json.loads(moved), "expect": v1})
    assert code == 409 and "changes global.admin" in answer["error"], answer
    code, answer = stack.call("PUT", "/table", {"version": "0" * 64, "table": compiled, "expect": v1})
    assert code == 400 and "does not hash to its version" in answer["error"], answer

    # A secret the node lacks is read from the path the pusher names, and must be the same file.
    secret = tmp_path / "sticky.secret"
    secret.write_text("one secret, 32 bytes or more ........\n")
    sticky = node.write(config(ip, web_extra=f"    sticky: {{mode: cookie, secret_file: {secret}}}\n"), "sticky.yaml")
    text = lbc("compile", str(sticky)).stdout.strip()
    secret.write_text("another secret, as long as the first.\n")
    body = {"version": hashlib.sha256(text.encode()).hexdigest(), "table": json.loads(text), "expect": v1,
            "files": {json.loads(text)["pools"][1]["sticky"]["secret_sha256"]: str(secret)}}
    code, answer = stack.call("PUT", "/table", body)
    assert code == 409 and "is not the file it was compiled with" in answer["error"], answer
    body["files"] = {digest: "/dev/zero" for digest in body["files"]}  # not a regular file: refused alike, unread
    code, answer = stack.call("PUT", "/table", body)
    assert code == 409 and "is not the file it was compiled with" in answer["error"], answer
    assert StateDir(node.state).current_version() == v1

    # Rollback, on the condition that the live table is the one named.
    assert stack.call("POST", "/table/rollback", {"version": v0, "expect": v0})[0] == 409
    code, answer = stack.call("POST", "/table/rollback", {"version": v0, "expect": v1})
    assert (code, answer["installed"], answer["version"], answer["workers"]) == (200, True, v0, 2), answer
    assert StateDir(node.state).current_version() == v0
    assert stack.call("POST", "/table/rollback", {"version": "f" * 64, "expect": v0})[0] == 404

    # The API cannot install a table that moves the API itself (it would stop itself mid-way).
    assert node.lbc("apply", str(node.write(config(ip).replace(":9900", ":9901"), "moved.yaml"))).returncode == 0
    v_moved = StateDir(node.state).current_version()
    assert node.lbc("apply", str(node.config)).returncode == 0
    assert wait_until(lambda: stack.ready(), 10)
    live = StateDir(node.state).current_version()
    code, answer = stack.call("POST", "/table/rollback", {"version": v_moved, "expect": live})
    assert code == 409 and "cannot install on itself" in answer["error"], answer
    assert StateDir(node.state).current_version() == live and stack.ready()
