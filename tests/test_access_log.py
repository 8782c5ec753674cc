"""Access logs through a real node: one line per request with the fields
the docs name, both formats, errors included, reopened after rotation."""

from __future__ import annotations

import json
import re
import time

import pytest
from support.node import get, wait_until

from lbc.state import StateDir

pytestmark = pytest.mark.timeout(120)


def config(ip: str, fmt: str = "combined", extra: str = "") -> str:
    return (f"version: 1\nglobal: {{workers: 1, admin: {{enabled: false}}, access_log: {{format: {fmt}{extra}}}}}\n"
            f"listeners:\n  - name: web\n    bind: \"{ip}:8080\"\n    routes:\n"
            f"      - {{match: {{path_prefix: /app}}, pool: app}}\n"
            f"      - {{match: {{path_prefix: /web}}, pool: web}}\n"
            f"pools:\n  - name: web\n    backends: [{{id: w1, address: {ip}, port: 9101}}]\n"
            f"  - name: app\n    backends: [{{id: gone, address: {ip}, port: 9109}}]\n")


def lines(path, n, timeout=3.0):
    assert wait_until(lambda: path.exists() and len(path.read_text().splitlines()) >= n, timeout), \
        path.read_text() if path.exists() else "no file"
    return path.read_text().splitlines()


COMBINED = re.compile(
    r'^(?P<client>\S+) - - \[(?P<time>[^\]]+)\] "(?P<request>[^"]*)" (?P<status>\d{3}) (?P<bytes>\d+) '
    r'"(?P<referer>[^"]*)" "(?P<agent>[^"]*)" listener=(?P<listener>\S+) route=(?P<route>-?\d+) pool=(?P<pool>\S+) '
    r'backend=(?P<backend>\S+) rt=(?P<rt>[\d.]+) ut=(?P<ut>[\d.]+|-) v=(?P<v>[0-9a-f]{12}) id=(?P<id>\S+)$')


def test_combined_lines_name_the_route_the_backend_the_times_and_the_table(node, origins, ip):
    origins("w1", http=[f"{ip}:9101"])
    node.up(config(ip))
    version = StateDir(node.state).current_version()
    get(ip, 8080, "/web/page?q=1", headers={"User-Agent": 'curl "quoted"', "Referer": "http://ref.example/"})
    get(ip, 8080, "/app/x")  # its backend is down: 502
    get(ip, 8080, "/nowhere")  # no route: 404
    log = node.state / "run" / "access-0.log"
    got = [COMBINED.match(line) for line in lines(log, 3)]
    assert all(got), lines(log, 3)
    ok, bad, lost = (m.groupdict() for m in got)
    assert ok["request"] == "GET /web/page?q=1 HTTP/1.1" and ok["status"] == "200" and int(ok["bytes"]) > 0
    assert ok["agent"] == r"curl \x22quoted\x22" and ok["referer"] == "http://ref.example/"
    assert (ok["listener"], ok["route"], ok["pool"], ok["backend"], ok["v"]) == ("web", "1", "web", "w1", version[:12])
    assert float(ok["rt"]) >= float(ok["ut"]) > 0 and ok["client"] == "127.0.0.1"
    assert (bad["status"], bad["route"], bad["pool"], bad["backend"], bad["ut"]) == ("502", "0", "app", "gone", "-")
    assert (lost["status"], lost["route"], lost["pool"], lost["backend"]) == ("404", "-1", "-", "-")


def test_json_lines_and_reopening_after_rotation(node, origins, ip, tmp_path):
    origins("w1", http=[f"{ip}:9101"])
    logs = tmp_path / "logs"
    node.up(config(ip, "json", f", directory: {logs}"))
    for _ in range(5):
        get(ip, 8080, "/web/")
    log = logs / "access-0.log"
    records = [json.loads(line) for line in lines(log, 5)]
    assert {r["status"] for r in records} == {200} and records[0]["backend"] == "w1"
    assert records[0]["time"].endswith("Z") and records[0]["request_id"] and records[0]["upstream_time"] > 0
    log.rename(logs / "access-0.log.1")  # as logrotate does, then signal
    assert node.lbc("reopen-logs").returncode == 0
    time.sleep(0.3)
    get(ip, 8080, "/web/again")
    assert [json.loads(line)["target"] for line in lines(log, 1)] == ["/web/again"]
    assert len((logs / "access-0.log.1").read_text().splitlines()) == 5


def test_access_logs_can_be_off(node, origins, ip):
    origins("w1", http=[f"{ip}:9101"])
    node.up(config(ip).replace("access_log: {format: combined}", "access_log: {enabled: false}"))
    assert get(ip, 8080, "/web/")[0] == 200
    time.sleep(0.5)
    assert not (node.state / "run" / "access-0.log").exists()
