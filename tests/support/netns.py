"""Network namespaces a test makes for itself: hosts on one bridge, each
with eth0 on 10.77.0.0/24, all deleted (with their links) when it ends."""

from __future__ import annotations

import os
import shutil
import subprocess

SUBNET = "10.77.0"


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def can_make() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    probe = f"lbcprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except RuntimeError as e:
        return f"cannot make a network namespace: {e}"
    _ip("netns", "del", probe)
    return None


class Lan:
    """A bridge in a namespace of its own, and hosts plugged into it."""

    def __init__(self) -> None:
        self.tag = f"lbc{os.getpid() % 100000}"
        self.bridge = f"{self.tag}br"
        self.hosts: dict[str, str] = {}  # name -> namespace
        _ip("netns", "add", self.bridge)
        _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge, "link", "set", "br0", "up")

    def host(self, name: str, number: int) -> str:
        """A namespace with lo and eth0 (10.77.0.NUMBER/24) up; its name."""
        ns = f"{self.tag}{name}"
        _ip("netns", "add", ns)
        self.hosts[name] = ns
        port = f"v{self.tag}{name}"[:15]
        _ip("link", "add", port, "netns", self.bridge, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _ip("-n", self.bridge, "link", "set", port, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{SUBNET}.{number}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        return ns

    def exec(self, name: str) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.hosts[name])

    def addresses(self, name: str) -> str:
        return subprocess.run(["ip", "-n", self.hosts[name], "-brief", "addr", "show", "dev", "eth0"],
                              capture_output=True, text=True, timeout=10).stdout

    def close(self) -> None:
        for ns in [*self.hosts.values(), self.bridge]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
