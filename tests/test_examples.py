"""The bundled example runs as `make run` runs it."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.timeout(120)
def test_demo_serves_the_example_and_stops_cleanly(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py"), "--once", "--state", str(tmp_path / "s")],
                            capture_output=True, text=True, timeout=100)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "GET / -> 200 web-" in result.stdout
    assert "GET /api/users -> 200 api-" in result.stdout
    assert "lbc stopped" in result.stdout
