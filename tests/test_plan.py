"""Plans: golden texts for before/after pairs (tests/cases/plan/NAME/), the
measured effects, JSON, exit codes, and saved plans."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import CASES, lbc

from lbc import service
from lbc.plan import diff
from lbc.state import StateDir

PLAN_CASES = sorted(p for p in (CASES / "plan").iterdir() if p.is_dir())
UPDATE = os.environ.get("LBC_UPDATE_GOLDEN") == "1"


def _plan(case: Path):
    before = service.compile_file(case / "before.yaml")
    after = service.compile_file(case / "after.yaml")
    return diff(before.table, after.table, before.version, after.version), before, after


def _normalized(text: str, before: service.Compiled, after: service.Compiled) -> str:
    return text.replace(before.version[:12], "<before>").replace(after.version[:12], "<after>")


@pytest.mark.parametrize("case", PLAN_CASES, ids=[p.name for p in PLAN_CASES])
def test_plan_golden(case: Path):
    plan, before, after = _plan(case)
    text = _normalized(plan.render_text(), before, after)
    expected = case / "expected.txt"
    if UPDATE:
        expected.write_text(text)
    assert text == expected.read_text()


def test_weight_change_shows_shares():
    plan, *_ = _plan(CASES / "plan" / "weights")
    [effect] = plan.effects
    shares = {s.backend: (s.before, s.after) for s in effect.shares}
    assert shares == {"app-1": (0.5, 0.375), "app-2": (0.5, 0.125), "app-3": (None, 0.5)}


def test_consistent_hash_moves_about_one_nth_and_ip_hash_most():
    consistent, *_ = _plan(CASES / "plan" / "consistent_hash")
    mapped, *_ = _plan(CASES / "plan" / "ip_hash")
    assert 0.08 < consistent.effects[0].moved < 0.14
    assert mapped.effects[0].moved > 0.5


def test_json_plan_and_detailed_exit_codes(tmp_path):
    state = tmp_path / "state"
    case = CASES / "plan" / "weights"
    assert lbc("apply", str(case / "before.yaml"), "--state", str(state)).returncode == 0
    result = lbc("plan", str(case / "after.yaml"), "--state", str(state), "--json", "--detailed-exitcode")
    assert result.returncode == 2
    doc = json.loads(result.stdout)
    assert doc["summary"] == {"add": 1, "change": 1, "remove": 0}
    assert doc["base_version"] == StateDir(state).current_version()
    kinds = {(c["action"], c["kind"], c["name"]) for c in doc["changes"]}
    assert ("add", "backend", "app-3") in kinds and ("change", "backend", "app-1") in kinds
    assert lbc("plan", str(case / "after.yaml"), "--state", str(state)).returncode == 0
    same = lbc("plan", str(case / "before.yaml"), "--state", str(state), "--detailed-exitcode", "--json")
    assert same.returncode == 0 and json.loads(same.stdout)["changes"] == []
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 2\n")
    assert lbc("plan", str(bad), "--state", str(state), "--detailed-exitcode").returncode == 1


def test_saved_plan_applies_exactly_and_refuses_when_stale(tmp_path):
    state = tmp_path / "state"
    case = CASES / "plan" / "weights"
    saved = tmp_path / "plan.json"
    made = lbc("plan", str(case / "after.yaml"), "--state", str(state), "--out", str(saved))
    assert made.returncode == 0 and saved.is_file()
    # made against an empty state; the state moves on: the plan is stale
    assert lbc("apply", str(case / "before.yaml"), "--state", str(state)).returncode == 0
    stale = lbc("apply", str(saved), "--state", str(state))
    assert stale.returncode == 1
    assert "made against an empty state" in stale.stderr and "run lbc plan again" in stale.stderr

    assert lbc("plan", str(case / "after.yaml"), "--state", str(state), "--out", str(saved)).returncode == 0
    planned_version = json.loads(saved.read_text())["plan"]["version"]
    applied = lbc("apply", str(saved), "--state", str(state))
    assert applied.returncode == 0, applied.stderr
    assert StateDir(state).current_version() == planned_version
    assert StateDir(state).history()[-1].source == str((case / "after.yaml").resolve())
    again = lbc("apply", str(saved), "--state", str(state))
    assert again.returncode == 1 and "run lbc plan again" in again.stderr


def test_saved_plan_refuses_a_changed_certificate(tmp_path, tls_files):
    import shutil

    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    shutil.copy(tls_files["www_cert"], cert)
    shutil.copy(tls_files["www_key"], key)
    cfg = tmp_path / "tls.yaml"
    cfg.write_text("""\
version: 1
listeners:
  - name: web
    bind: 127.0.0.1:8443
    protocol: https
    tls: {certificates: [{cert: c.pem, key: k.pem}]}
    routes: [{pool: web}]
pools:
  - name: web
    backends: [{id: w, address: 127.0.0.1, port: 9101}]
""")
    state, saved = tmp_path / "state", tmp_path / "plan.json"
    assert lbc("plan", str(cfg), "--state", str(state), "--out", str(saved)).returncode == 0
    shutil.copy(tls_files["api_cert"], cert)
    shutil.copy(tls_files["api_key"], key)
    result = lbc("apply", str(saved), "--state", str(state))
    assert result.returncode == 1 and "changed since the table was compiled" in result.stderr
    assert StateDir(state).current_version() is None


def test_plan_shows_a_renewed_certificate_and_warns_before_it_expires(tmp_path):
    """Renewal: the plan names the old and the new certificate (subject, SAN
    names, not-after); one that expires within 14 days is warned about, and
    the plan still goes ahead (a warning, not an error)."""
    import datetime
    import re
    import shutil

    import trustme

    ca = trustme.CA()
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    files = {}
    for name, days in (("old", 80), ("soon", 5)):
        cert = ca.issue_cert(f"{name}.example.test", "www.example.test", not_before=now - datetime.timedelta(days=1),
                             not_after=now + datetime.timedelta(days=days))
        cert.private_key_pem.write_to_path(tmp_path / f"{name}.key")
        cert.cert_chain_pems[0].write_to_path(tmp_path / f"{name}.pem")
        files[name] = (tmp_path / f"{name}.pem", tmp_path / f"{name}.key",
                       (now + datetime.timedelta(days=days)).strftime("%Y-%m-%d"))
    cfg = tmp_path / "tls.yaml"
    cfg.write_text("""\
version: 1
listeners:
  - name: web
    bind: 127.0.0.1:8443
    protocol: https
    tls: {certificates: [{cert: c.pem, key: k.pem}]}
    routes: [{pool: web}]
pools:
  - name: web
    backends: [{id: w, address: 127.0.0.1, port: 9101}]
""")
    state = tmp_path / "state"
    shutil.copy(files["old"][0], tmp_path / "c.pem")
    shutil.copy(files["old"][1], tmp_path / "k.pem")
    assert lbc("apply", str(cfg), "--state", str(state)).returncode == 0
    shutil.copy(files["soon"][0], tmp_path / "c.pem")
    shutil.copy(files["soon"][1], tmp_path / "k.pem")
    result = lbc("plan", str(cfg), "--state", str(state))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Plan: 0 to add, 1 to change, 0 to remove." in out, out
    old_line = next(line for line in out.splitlines() if "old.example.test" in line)
    new_line = next(line for line in out.splitlines() if "soon.example.test" in line)
    assert old_line.lstrip().startswith("-") or "->" in old_line, out
    assert f"until {files['old'][2]}" in old_line and "www.example.test" in old_line
    assert f"until {files['soon'][2]}" in new_line
    assert re.search(r"tls\.yaml:6:\d+: .*cert: warning: certificate \S*c\.pem expires on " + files["soon"][2],
                     result.stderr), result.stderr
    assert "BEGIN" not in out + result.stderr  # never key or certificate material
