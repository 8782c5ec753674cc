"""One config, several nodes: `lbc plan|apply FILE --node URL ...`.

The file is validated and compiled once, here; every node gets the same
table through its admin API (GET /table, PUT /table, POST /table/rollback).
The rules, in order:

1. Every node's live table is read first. A node that cannot be reached
   stops the apply before any node changes (with --partial: it is reported
   failed and the others go on). A node already on the table is left alone.
2. The table is pushed to the other nodes at once, each push naming the
   version it was planned against: a node whose table changed meanwhile
   refuses (409). A node answers once every one of its workers serves the
   table, or after putting its previous table back itself (503).
3. A node whose answer was lost (a timeout, a reset, a 500) is asked what
   it serves: if the pushed table, it took it. A node that took it but whose
   global.ha.store write another node overtook follows that other table, so
   it counts as failed.
4. If every node took it, done. If one did not: without --partial, every node
   that took it is rolled back to the version it had, on the condition that
   it still serves the pushed one; with --partial they keep it. Either way the
   command fails and names the nodes that failed.

A node's dynamic pools keep their own API backends (as `lbc apply` does), so
a node's version can differ from the compiled one; rollbacks use the version
each node reported. Certificates, keys and secrets never travel: the table
names them by digest and each node reads its own copy at the same path.

The orchestration is pure over a client (`NodeApi`); `HttpNodeApi` is the
adapter that speaks HTTP.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from lbc import table as tablemod
from lbc.errors import LbcError
from lbc.plan import Plan, diff
from lbc.service import Compiled, with_dynamic
from lbc.table import RoutingTable

DEFAULT_PORT = 9900


class NodeError(LbcError):
    """A node's admin API did not answer, or answered with an error."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    url: str  # http://host:port

    def __str__(self) -> str:
        return self.name if self.name == self.url else f"{self.name} ({self.url})"


def targets(specs: Iterable[str], table: RoutingTable, all_nodes: bool = False) -> tuple[Target, ...]:
    """Where to apply: each spec is a URL, host:port, or the name of one of
    global.ha's nodes (its `admin` address); `all_nodes` adds every ha node."""
    ha = table.settings.ha
    names = [n.name for n in ha.nodes] if all_nodes and ha is not None else []
    if all_nodes and ha is None:
        raise LbcError("--all-nodes needs a global.ha section listing the nodes")
    out: dict[str, Target] = {}
    for spec in [*names, *specs]:
        node = ha.node(spec) if ha is not None else None
        if node is not None:
            if node.admin is None:
                raise LbcError(f"global.ha node {node.name!r} has no admin address to reach it by")
            target = Target(node.name, _url(node.admin))
        else:
            if "://" not in spec and ":" not in spec:
                known = f" (nodes: {', '.join(n.name for n in ha.nodes)})" if ha is not None else ""
                raise LbcError(f"--node {spec!r} is neither host:port, a URL, nor a global.ha node{known}")
            url = _url(spec)
            known = [n.name for n in ha.nodes if n.admin and _url(n.admin) == url] if ha is not None else []
            target = Target(known[0] if known else url, url)
        out.setdefault(target.url, target)
    if not out:
        raise LbcError("no node to apply to")
    return tuple(out.values())


def _url(spec: str) -> str:
    parsed = urllib.parse.urlsplit(spec if "://" in spec else f"http://{spec}")
    if parsed.scheme != "http" or not parsed.hostname or parsed.path not in ("", "/"):
        raise LbcError(f"--node {spec!r}: give host:port or http://host:port (the admin API speaks plain HTTP)")
    try:
        port = parsed.port or DEFAULT_PORT
    except ValueError:
        raise LbcError(f"--node {spec!r}: bad port") from None
    host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
    return f"http://{host}:{port}"


class NodeApi(Protocol):
    def live(self) -> tuple[str, RoutingTable]: ...
    def push(self, compiled: Compiled, expect: str, argv: str) -> dict[str, Any]: ...
    def rollback(self, version: str, expect: str, argv: str) -> dict[str, Any]: ...


# -- plan ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodePlan:
    target: Target
    plan: Plan | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class FleetPlan:
    """What applying the file would change on each node."""

    nodes: tuple[NodePlan, ...]

    def render_text(self) -> str:
        out = []
        for n in self.nodes:
            if n.plan is None:
                out.append(f"== node {n.target}: cannot plan: {n.error}\n")
            else:
                live = n.plan.base_version[:12] if n.plan.base_version else "nothing"
                out.append(f"== node {n.target}: live {live}\n{n.plan.render_text()}")
        lives = {n.plan.base_version for n in self.nodes if n.plan is not None}
        changed = sum(1 for n in self.nodes if n.plan is not None and not n.plan.empty)
        summary = f"{changed} of {len(self.nodes)} node{'s' if len(self.nodes) != 1 else ''} would change."
        if len(lives) > 1:
            summary += f" The nodes serve {len(lives)} different tables now (drift between nodes)."
        return "\n".join(out) + "\n" + summary + "\n"

    def exit_code(self, detailed: bool = False) -> int:
        if any(n.plan is None for n in self.nodes):
            return 1
        return 2 if detailed and any(not n.plan.empty for n in self.nodes) else 0

    def to_plain(self) -> dict[str, Any]:
        return {"nodes": [{"node": n.target.name, "url": n.target.url, "error": n.error,
                           "plan": n.plan.to_plain() if n.plan is not None else None} for n in self.nodes]}


def _plan_one(compiled: Compiled, live: tuple[str, RoutingTable]) -> tuple[Compiled, Plan]:
    version, table = live
    mine = with_dynamic(compiled, table)
    return mine, diff(table, mine.table, version, mine.version)


def plan(compiled: Compiled, nodes: tuple[Target, ...], api: Callable[[Target], NodeApi]) -> FleetPlan:
    def one(t: Target) -> NodePlan:
        try:
            return NodePlan(t, _plan_one(compiled, api(t).live())[1])
        except NodeError as e:
            return NodePlan(t, None, str(e))

    return FleetPlan(tuple(_each(one, nodes)))


# -- apply ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeOutcome:
    target: Target
    state: str  # unchanged, installed, failed, rolled back, rollback failed, kept (--partial), skipped
    plan: Plan | None = None
    detail: str = ""
    version: str | None = None  # what the node serves afterwards, when known

    @property
    def ok(self) -> bool:
        return self.state in ("unchanged", "installed", "kept")


@dataclass(frozen=True, slots=True)
class FleetApply:
    version: str
    nodes: tuple[NodeOutcome, ...]
    partial: bool

    def render_text(self) -> str:
        out = []
        for n in self.nodes:
            head = f"node {n.target}: "
            if n.plan is not None and not n.plan.empty:
                head += n.plan.summary() + " "
            word = {"unchanged": "already serves it", "installed": f"serves {_short(n.version)}",
                    "kept": f"serves {_short(n.version)} (kept: --partial)",
                    "rolled back": f"rolled back to {_short(n.version)}", "skipped": "not changed",
                    "failed": "FAILED", "rollback failed": "ROLLBACK FAILED"}[n.state]
            out.append(head + word + (f": {n.detail}" if n.detail else ""))
        failed = [n.target.name for n in self.nodes if n.state in ("failed", "rollback failed")]
        total = len(self.nodes)
        if not failed:
            out.append(f"\nTable {self.version[:12]} is live on all {total} node{'s' if total != 1 else ''}.")
        elif self.partial:
            kept = sum(1 for n in self.nodes if n.state in ("kept", "unchanged"))
            out.append(f"\nFailed on {', '.join(failed)}; {kept} of {total} nodes serve table {self.version[:12]} "
                       "(--partial).")
        else:
            out.append(f"\nFailed on {', '.join(failed)}; the other nodes were put back on their previous table.")
        return "\n".join(out) + "\n"

    def exit_code(self) -> int:
        return 0 if all(n.ok for n in self.nodes) else 1


def apply(compiled: Compiled, nodes: tuple[Target, ...], api: Callable[[Target], NodeApi], *, argv: str,
          partial: bool = False) -> FleetApply:
    # 1. every node's live table
    def read(t: Target) -> tuple[str, RoutingTable] | NodeError:
        try:
            return api(t).live()
        except NodeError as e:
            return e

    lives = dict(zip(nodes, _each(read, nodes), strict=True))
    down = [t for t, live in lives.items() if isinstance(live, NodeError)]
    if down and not partial:
        return FleetApply(compiled.version, tuple(
            NodeOutcome(t, "failed", detail=str(live)) if t in down else NodeOutcome(t, "skipped")
            for t, live in lives.items()), partial)

    # 2. push where it changes something
    def push(t: Target) -> NodeOutcome:
        live = lives[t]
        if isinstance(live, NodeError):
            return NodeOutcome(t, "failed", detail=str(live))
        mine, node_plan = _plan_one(compiled, live)
        if node_plan.empty:
            return NodeOutcome(t, "unchanged", node_plan, version=live[0])
        try:
            answer = api(t).push(mine, live[0], argv)
        except NodeError as e:
            if e.status is not None and e.status < 500 or e.status == 503:
                return NodeOutcome(t, "failed", node_plan, detail=str(e))  # refused, or put back by the node
            # No answer (a timeout, a reset) or an unexpected one: whether it took the table is unknown. Ask.
            try:
                now = api(t).live()[0]
            except NodeError as again:
                return NodeOutcome(t, "failed", node_plan, detail=f"{e}; and then {again}: it may serve "
                                   f"{_short(mine.version)}", version=mine.version)
            if now == mine.version:
                return NodeOutcome(t, "installed", node_plan, detail=f"{e}, but it serves it", version=now)
            return NodeOutcome(t, "failed", node_plan, detail=str(e), version=now)
        if answer.get("store") == "superseded":  # the node follows another node's table now
            return NodeOutcome(t, "failed", node_plan, detail=answer.get("shared", ""), version=answer["version"])
        return NodeOutcome(t, "installed", node_plan, detail=_warning(answer), version=answer["version"])

    pushed = list(_each(push, nodes))
    if all(n.ok for n in pushed):
        return FleetApply(compiled.version, tuple(pushed), partial)
    if partial:
        return FleetApply(compiled.version, tuple(
            NodeOutcome(n.target, "kept", n.plan, version=n.version) if n.state == "installed" else n
            for n in pushed), partial)

    # 3. roll back the nodes that took it
    def undo(n: NodeOutcome) -> NodeOutcome:
        if n.state != "installed":
            return n
        before = lives[n.target][0]
        try:
            answer = api(n.target).rollback(before, n.version, argv)
        except NodeError as e:
            return NodeOutcome(n.target, "rollback failed", n.plan, detail=f"it may still serve "
                               f"{_short(n.version)}: {e}", version=n.version)
        if answer.get("store") == "superseded":  # back here, but the group's store holds another table
            return NodeOutcome(n.target, "rollback failed", n.plan, detail=_warning(answer), version=before)
        return NodeOutcome(n.target, "rolled back", n.plan, detail=_warning(answer), version=before)

    return FleetApply(compiled.version, tuple(_each(undo, pushed)), partial)


def _warning(answer: dict[str, Any]) -> str:
    """A node's word that global.ha.store did not take what it installed."""
    shared = answer.get("shared") or ""
    return shared if shared.startswith("warning:") else ""


def _each(fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    """fn over items, all at once (one thread each: nodes are few, and slow)."""
    items = list(items)
    with ThreadPoolExecutor(max_workers=max(1, len(items))) as pool:
        return list(pool.map(fn, items))


def _short(version: str | None) -> str:
    return version[:12] if version else "?"


# -- the HTTP adapter ----------------------------------------------------------------------


class HttpNodeApi:
    """One node's admin API over HTTP, its errors as NodeError."""

    def __init__(self, target: Target, token: bytes | None, lock_timeout: float = 30.0,
                 wait_timeout: float = 10.0) -> None:
        self.target, self.token = target, token
        self.waits = {"lock_timeout": lock_timeout, "wait_timeout": wait_timeout}
        # a node may wait for its lock, then for its workers twice (the table, and a revert)
        self.timeout = lock_timeout + 2 * wait_timeout + 30
        parsed = urllib.parse.urlsplit(target.url)
        self.host, self.port = parsed.hostname, parsed.port

    def live(self) -> tuple[str, RoutingTable]:
        answer = self._call("GET", "/table")
        try:
            table = tablemod.from_plain(RoutingTable, answer["table"])
            if not isinstance(answer["version"], str):
                raise TypeError("no version")
        except (tablemod.TableError, KeyError, TypeError) as e:
            raise NodeError(f"its live table cannot be read here: {e} (another lbc version?)") from None
        return answer["version"], table

    def push(self, compiled: Compiled, expect: str, argv: str) -> dict[str, Any]:
        return self._installed(self._call("PUT", "/table", {
            "version": compiled.version, "table": tablemod.to_plain(compiled.table), "expect": expect,
            "files": compiled.files, "source": compiled.source, "source_sha256": compiled.source_sha256,
            "argv": argv, **self.waits}))

    def rollback(self, version: str, expect: str, argv: str) -> dict[str, Any]:
        return self._installed(self._call("POST", "/table/rollback", {"version": version, "expect": expect,
                                                                      "argv": argv, **self.waits}))

    @staticmethod
    def _installed(answer: Any) -> dict[str, Any]:
        if not isinstance(answer, dict) or not isinstance(answer.get("version"), str):
            raise NodeError(f"an answer that is not the API's: {str(answer)[:200]}", 500)
        return answer

    def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token.decode()}"
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as e:
            raise NodeError(f"{method} {path}: {getattr(e, 'strerror', None) or e}") from None
        finally:
            conn.close()
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = {"error": raw[:200].decode(errors="replace")}
        if response.status != 200:
            message = answer.get("error", "") if isinstance(answer, dict) else ""
            detail = answer.get("detail") if isinstance(answer, dict) else None
            if response.status == 401:
                message += " (give --token-file, or set global.admin.token_file)"
            raise NodeError(f"{response.status} {message}" + (f": {detail}" if detail else ""),
                                  response.status)
        return answer


def token(compiled: Compiled, token_file: str | None) -> bytes | None:
    """The bearer token: --token-file's first line, else the config's own
    global.admin.token_file (the same file every node reads), else none."""
    path = token_file
    admin = compiled.table.settings.admin
    if path is None and admin is not None and admin.token_sha256:
        path = compiled.files.get(admin.token_sha256)
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            first = f.readline().strip()
    except OSError as e:
        raise LbcError(f"cannot read the token file {path}: {e.strerror}") from None
    return first or None
