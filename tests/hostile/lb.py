"""The scorecard's setting: lbc with product defaults (2 workers, default
limits and timeouts) in front of small origins on this test's 127.a.b.1."""

from __future__ import annotations

HTTP_PORT = 8080


def config(ip: str, *, listener: str = "", backends: int = 2, workers: int = 2, glob: str = "",
           pools: str = "", listeners: str = "") -> str:
    """http listener `web` on IP:8080 -> pool `web` (origins web-N on IP:910N),
    plus whatever `listeners`/`pools` add. `listener` and `glob` are extra
    lines for the listener and global sections."""
    lines = [
        "version: 1",
        "global:",
        f"  workers: {workers}",
        "  drain_timeout: 2s",
        f'  admin: {{bind: "{ip}:9900"}}',  # the test's own address: nodes may run side by side
        *(f"  {line}" for line in glob.strip("\n").splitlines() if line.strip()),
        "listeners:",
        "  - name: web",
        f'    bind: "{ip}:{HTTP_PORT}"',
        *(f"    {line}" for line in listener.strip("\n").splitlines() if line.strip()),
        "    routes: [{pool: web}]",
        listeners.rstrip("\n"),
        "pools:",
        "  - name: web",
        "    backends:",
        *(f"      - {{id: web-{i}, address: {ip}, port: {9100 + i}}}" for i in range(1, backends + 1)),
        pools.rstrip("\n"),
    ]
    return "\n".join(line for line in lines if line) + "\n"


def web_origins(origins, ip: str, backends: int = 2, **kw) -> list:
    """The origins config() points at (tests/support/origin.py)."""
    return [origins(f"web-{i}", http=[f"{ip}:{9100 + i}"], **kw) for i in range(1, backends + 1)]
