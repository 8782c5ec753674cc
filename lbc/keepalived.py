"""keepalived's configuration from global.ha (templates/keepalived.conf.j2),
and which of the ha nodes this machine is.

The rendering is pure: the table, the node's name and the node check's
command in, text out. Finding the node reads the machine's addresses."""

from __future__ import annotations

import ipaddress
import shlex
import sys
from importlib.resources import files
from pathlib import Path

import jinja2
import psutil

from lbc.errors import LbcError
from lbc.table import HaNode, HighAvailability, RoutingTable


def ha_of(table: RoutingTable) -> HighAvailability:
    if table.settings.ha is None:
        raise LbcError("the file has no global.ha section: nothing to render for keepalived")
    return table.settings.ha


def check_command(state: Path) -> str:
    """The node check as keepalived runs it. Through the lbc-nodecheck
    script beside this Python: keepalived (with script security) executes
    the real file behind a symlink, and a venv's python is a symlink whose
    real file knows nothing of the venv."""
    script = Path(sys.executable).with_name("lbc-nodecheck")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "lbc.nodecheck"]
    return shlex.join([*command, "--state", str(state.resolve()), "--quiet"])


def render(ha: HighAvailability, node: HaNode, state: Path, *, exported: bool = False,
           script_user: str = "root") -> str:
    """keepalived.conf for `node`; its node check runs lbc's on `state`."""
    check = check_command(state)
    template = jinja2.Environment(autoescape=False, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    text = files("lbc.templates").joinpath("keepalived.conf.j2").read_text()
    return template.from_string(text).render(
        ha=ha, node=node, peers=[n for n in ha.nodes if n.name != node.name], check_command=check,
        exported=exported, script_user=script_user)


def this_node(ha: HighAvailability, name: str | None = None) -> HaNode:
    """The node named `name`, or the one whose address is on this machine."""
    if name is not None:
        node = ha.node(name)
        if node is None:
            raise LbcError(f"global.ha has no node {name!r} (nodes: {', '.join(n.name for n in ha.nodes)})")
        return node
    mine = set()
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            try:
                mine.add(ipaddress.ip_address(a.address.split("%")[0]))
            except ValueError:
                continue
    found = [n for n in ha.nodes if ipaddress.ip_address(n.address) in mine]
    if len(found) != 1:
        listed = ", ".join(f"{n.name} {n.address}" for n in ha.nodes)
        why = "none of" if not found else "more than one of"
        raise LbcError(f"{why} global.ha's node addresses ({listed}) is on this machine: name the node with --ha-node")
    return found[0]
