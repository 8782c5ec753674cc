"""keepalived's configuration from global.ha (templates/keepalived.conf.j2),
and which of the ha nodes this machine is.

The rendering is pure: the table, the node's name and the node check's
command in, text out. Finding the node reads the machine's addresses."""

from __future__ import annotations

import ipaddress
import re
import shlex
import stat
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


_PLAIN_PATH = re.compile(r"[A-Za-z0-9._/+-]+")


def check_command(state: Path) -> str:
    """The node check as keepalived runs it: the lbc-nodecheck script beside
    this Python. keepalived (with script security) executes the real file
    behind a symlink, and a venv's python is a symlink whose real file knows
    nothing of the venv, so `python -m` would not find lbc there."""
    script = Path(sys.executable).with_name("lbc-nodecheck")
    if not script.exists():
        raise LbcError(f"{script} is missing: install lbc with pip (it installs the lbc-nodecheck script) to run "
                       "keepalived's node check")
    root = state.resolve()
    for path in (script, root):
        # keepalived's script line is not a shell: it splits on spaces and
        # reads quotes and backslashes its own way. Plain paths only.
        if not _PLAIN_PATH.fullmatch(str(path)):
            raise LbcError(f"{path}: keepalived's script line needs a path of letters, digits and . _ / + - only")
    _check_script_security(script)
    return shlex.join([str(script), "--state", str(root), "--quiet"])


def _check_script_security(script: Path) -> None:
    """keepalived runs scripts as root only from files and directories no
    one else can change (enable_script_security); otherwise it disables the
    script, and the virtual IPs would stop following the node's health."""
    for path in [script.resolve(), *script.resolve().parents, script, *script.parents]:
        try:
            st = path.stat()
        except OSError as e:
            raise LbcError(f"cannot check {path} for keepalived: {e.strerror}") from None
        sticky_dir = path.is_dir() and st.st_mode & stat.S_ISVTX
        if st.st_uid != 0 or (st.st_mode & 0o022 and not sticky_dir):
            raise LbcError(f"keepalived will not run the node check from {script}: {path} is owned or writable by "
                           "a user other than root; install lbc where only root can write")


def render(ha: HighAvailability, node: HaNode, state: Path, *, exported: bool = False) -> str:
    """keepalived.conf for `node`; its node check runs lbc's on `state`."""
    check = check_command(state)
    template = jinja2.Environment(autoescape=False, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    text = files("lbc.templates").joinpath("keepalived.conf.j2").read_text()
    return template.from_string(text).render(
        ha=ha, node=node, peers=[n for n in ha.nodes if n.name != node.name], check_command=check,
        exported=exported)


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
