"""Bind and backend addresses: parsing and classification, no resolution."""

from __future__ import annotations

import ipaddress
import re

_HOSTNAME = re.compile(r"^(?=.{1,253}\.?$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")
WILDCARDS = frozenset({"0.0.0.0", "::"})


def parse_bind(text: str) -> tuple[str, int]:
    """'127.0.0.1:80' -> ('127.0.0.1', 80); '[::1]:80' -> ('::1', 80).
    Raises ValueError with a user-facing reason."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError("must be host:port")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            return str(ipaddress.IPv6Address(host)), port
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    if host == "localhost":
        return "127.0.0.1", port
    try:
        return str(ipaddress.IPv4Address(host)), port
    except ValueError:
        raise ValueError(f"{host!r} is not an IPv4 address (IPv6 addresses go in brackets)") from None


def address_kind(text: str) -> str | None:
    """'ipv4', 'ipv6', 'hostname', or None when it is none of them."""
    try:
        return "ipv6" if ipaddress.ip_address(text).version == 6 else "ipv4"
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", text):
        return None  # looks like an IPv4 address but is not one: not a name either
    return "hostname" if _HOSTNAME.match(text) else None


def format_hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
