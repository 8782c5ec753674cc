"""The `lbc` command as a user runs it, and the project as a user installs it."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import EXAMPLE, ROOT, lbc

from lbc import docgen


def test_validate_exit_codes_and_all_errors(write):
    good = write("good.yaml", EXAMPLE.read_text())
    bad = write("bad.yaml", EXAMPLE.read_text().replace("protocol: http", "protocl: http")
                .replace("algorithm: round_robin", "algorithm: round_robbin").replace("port: 9202", "port: 70000"))
    ok = lbc("validate", str(good))
    assert ok.returncode == 0 and ok.stdout.strip() == f"{good}: valid"
    both = lbc("validate", str(good), str(bad))
    assert both.returncode == 1
    errors = [line for line in both.stderr.splitlines() if line.startswith(str(bad))]
    assert len(errors) == 3, both.stderr
    assert "unknown key 'protocl'; did you mean 'protocol'?" in errors[0]
    assert "did you mean 'round_robin'?" in errors[1]
    assert "$.pools[1].backends[1].port: must be at most 65535 (got 70000)" in errors[2]
    assert both.stderr.strip().endswith("lbc: 3 errors; nothing was changed")
    missing = lbc("validate", str(write("x", "")) + ".missing")
    assert missing.returncode == 1 and "no such file" in missing.stderr


def test_readme_references_are_current():
    readme = (ROOT / "README.md").read_text()
    assert docgen.render(readme) == readme, "README is stale: run `make docs`"
    for command in ("make run", "make test", "lbc apply"):
        assert command in readme


def test_every_schema_key_is_documented():
    readme = (ROOT / "README.md").read_text()
    from lbc.config.schema import pool_schema

    for name, node in pool_schema()["$defs"].items():
        for key in node.get("properties", {}):
            assert f"| `{key}`" in readme, f"{name}.{key} missing from README"


def test_pip_install_dot_gives_a_working_lbc(tmp_path):
    """A non-editable install into a fresh venv finds its schema at run time.
    Dependencies come from this venv through a .pth file, so no network."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(wheels), str(ROOT)], check=True, timeout=120)
    [wheel] = wheels.glob("lbc-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--quiet", "--no-deps", str(wheel)],
                   check=True, timeout=120)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = subprocess.run([str(venv / "bin" / "lbc"), "validate", str(EXAMPLE)], cwd=elsewhere,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    where = subprocess.run([str(py), "-c", "import lbc, lbc.schemas, lbc.templates, lbc_workers.proxy.worker, lbc_workers.health.checker; "
                            "print(lbc.__file__)"],
                           cwd=elsewhere, capture_output=True, text=True, timeout=60)
    assert where.returncode == 0, where.stderr
    assert str(venv) in where.stdout  # the installed copy, not the checkout
    installed = Path(where.stdout.strip()).parent
    for folder, pattern in (("schemas", "*.json"), ("templates", "*.j2")):
        shipped = {p.name for p in (ROOT / folder).glob(pattern)}
        assert shipped <= {p.name for p in (installed / folder).glob(pattern)}
