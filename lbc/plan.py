"""Two routing tables -> a Plan: what changes and what the change does. Pure.

A Plan lists changes per resource (global settings, listener, route, pool,
backend) with field-level old -> new values, and the effect of the change:
each backend's share of traffic before -> after, the fraction of hash keys
that move to another backend (measured by running a fixed sample of keys
through both tables with the workers' own hash functions), and the listeners
that bind, re-bind or close.

The Plan object owns its wording (`Plan: N to add, M to change, K to
remove.` / `No changes.`) and its exit code, as Black's Report does.

Routes are ordered, so they are matched with a sequence diff: inserting a
route shows one addition, not every later route changed.

Drift: changes made through the admin API are marked in the live table
(backends with `origin: api`, pools' `set_by_api`). A plan from a file that
undoes them marks those changes as drift; the file wins when applied. The
API's backends of `dynamic_backends` pools are not drift: the service layer
keeps them in the new table (lbc.mutate.keep_dynamic), and the plan lists
them.
"""

from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from lbc import hashing
from lbc.config.units import format_ms
from lbc.table import HASHING, Listener, Pool, Route, RoutingTable, to_plain

ADD, CHANGE, REMOVE = "add", "change", "remove"
_SYMBOL = {ADD: "+", CHANGE: "~", REMOVE: "-"}
KEY_SAMPLE = 10_000
WEIGHTED = frozenset({"weighted_round_robin", "weighted_least_connections", "random"})


@dataclass(frozen=True, slots=True)
class FieldChange:
    name: str  # dotted path inside the resource, e.g. "timeouts.idle_ms"
    old: Any
    new: Any


@dataclass(frozen=True, slots=True)
class Change:
    action: str  # add, change, remove
    kind: str  # global, listener, route, pool, backend
    name: str  # resource name; routes: "<listener>[<index>]"
    parent: str | None  # the listener of a route, the pool of a backend
    summary: str  # one line describing the resource (for adds and removes)
    fields: tuple[FieldChange, ...] = ()
    drift: bool = False  # undoes a change made through the admin API

    def __post_init__(self) -> None:
        if self.action not in _SYMBOL:
            raise ValueError(f"bad action {self.action!r}")
        if self.action == CHANGE and not self.fields:
            raise ValueError("a change needs changed fields")


@dataclass(frozen=True, slots=True)
class Share:
    backend: str
    before: float | None  # None: not in the pool (or disabled) before
    after: float | None


@dataclass(frozen=True, slots=True)
class PoolEffect:
    pool: str
    shares: tuple[Share, ...]
    moved: float | None = None  # hashing pools: fraction of sample keys that move
    note: str | None = None


@dataclass(frozen=True, slots=True)
class Rebind:
    listener: str
    before: str | None  # "http 127.0.0.1:8080"; None: newly bound
    after: str | None  # None: closed


@dataclass(frozen=True, slots=True)
class Plan:
    base_version: str | None  # the live table the plan was made against
    version: str  # the table it would install
    changes: tuple[Change, ...]
    effects: tuple[PoolEffect, ...] = ()
    rebinds: tuple[Rebind, ...] = ()
    dynamic: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (pool, API backend ids kept)
    counts: dict[str, int] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        counts = {ADD: 0, CHANGE: 0, REMOVE: 0}
        for c in self.changes:
            counts[c.action] += 1
        object.__setattr__(self, "counts", counts)
        if (self.base_version == self.version) != (not self.changes):
            raise ValueError("a plan has changes exactly when its versions differ")

    @property
    def empty(self) -> bool:
        return not self.changes

    def summary(self) -> str:
        if self.empty:
            return "No changes."
        c = self.counts
        return f"Plan: {c[ADD]} to add, {c[CHANGE]} to change, {c[REMOVE]} to remove."

    @property
    def drift(self) -> int:
        return sum(1 for c in self.changes if c.drift)

    def exit_code(self, detailed: bool = False) -> int:
        """0 on success; with detailed (terraform's -detailed-exitcode), 2 when
        there are changes."""
        return 2 if detailed and not self.empty else 0

    def render_text(self) -> str:
        return "\n".join(_render(self)) + "\n"

    def to_plain(self) -> dict[str, Any]:
        return {
            "base_version": self.base_version,
            "version": self.version,
            "summary": dict(self.counts),
            "changes": [to_plain(c) for c in self.changes],
            "effects": [to_plain(e) for e in self.effects],
            "rebinds": [to_plain(r) for r in self.rebinds],
            "drift": self.drift,
            "dynamic": [{"pool": p, "backends": list(ids)} for p, ids in self.dynamic],
        }


def diff(old: RoutingTable | None, new: RoutingTable, old_version: str | None, new_version: str) -> Plan:
    if old_version == new_version:
        return Plan(old_version, new_version, ())
    changes: list[Change] = []
    settings = _plain_settings(new)
    if old is None:
        summary = ", ".join(f"{k} {v}" for k, v in settings.items() if k not in ("format", "hash"))
        changes.append(Change(ADD, "global", "global", None, summary))
    elif fields := _field_changes(_plain_settings(old), settings):
        changes.append(Change(CHANGE, "global", "global", None, "global settings", tuple(fields)))
    changes += _diff_listeners(old.listeners if old else (), new.listeners)
    changes += _diff_pools(old.pools if old else (), new.pools)
    return Plan(
        old_version,
        new_version,
        tuple(changes),
        effects=tuple(_effects(old, new)) if old else (),
        rebinds=tuple(_rebinds(old.listeners if old else (), new.listeners)),
        dynamic=tuple((p.name, ids) for p in new.pools if p.dynamic_backends
                      and (ids := tuple(b.id for b in p.backends if b.origin == "api"))),
    )


def _plain_settings(t: RoutingTable) -> dict[str, Any]:
    return {**to_plain(t.settings), "format": t.format, "hash": t.hash}


# -- resource diffs -------------------------------------------------------------


def _field_changes(old: Any, new: Any, prefix: str = "") -> list[FieldChange]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            out += _field_changes(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [FieldChange(prefix.rstrip("."), old, new)]


def _by_name(items: tuple[Any, ...], attr: str = "name") -> dict[str, Any]:
    return {getattr(i, attr): i for i in items}


def _diff_listeners(old: tuple[Listener, ...], new: tuple[Listener, ...]) -> Iterator[Change]:
    before, after = _by_name(old), _by_name(new)
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a is None:
            yield Change(ADD, "listener", name, None, _listener_summary(b))
            for i, r in enumerate(b.routes):
                yield Change(ADD, "route", f"{name}[{i}]", name, _route_summary(r))
        elif b is None:
            yield Change(REMOVE, "listener", name, None, _listener_summary(a))
        elif a != b:  # most are unchanged: one comparison, no plain dicts
            fields = _field_changes(_plain_without(a, "name", "routes"), _plain_without(b, "name", "routes"))
            if fields:
                yield Change(CHANGE, "listener", name, None, _listener_summary(b), tuple(fields))
            yield from _diff_routes(name, a.routes, b.routes)


def _diff_routes(listener: str, old: tuple[Route, ...], new: tuple[Route, ...]) -> Iterator[Change]:
    # Routes are frozen dataclasses: hashable, as the matcher needs, and equal
    # exactly when their canonical JSON is.
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes():
        if op == "equal":
            continue
        paired = min(i2 - i1, j2 - j1) if op == "replace" else 0
        for k in range(paired):
            a, b = old[i1 + k], new[j1 + k]
            fields = _field_changes(to_plain(a), to_plain(b))
            yield Change(CHANGE, "route", f"{listener}[{j1 + k}]", listener, _route_summary(b), tuple(fields))
        for i in range(i1 + paired, i2):
            yield Change(REMOVE, "route", f"{listener}[{i}]", listener, _route_summary(old[i]))
        for j in range(j1 + paired, j2):
            yield Change(ADD, "route", f"{listener}[{j}]", listener, _route_summary(new[j]))


def _diff_pools(old: tuple[Pool, ...], new: tuple[Pool, ...]) -> Iterator[Change]:
    before, after = _by_name(old), _by_name(new)
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a is None:
            yield Change(ADD, "pool", name, None, _pool_summary(b))
            for backend in b.backends:
                yield Change(ADD, "backend", backend.id, name, _backend_summary(backend))
            continue
        if b is None:
            yield Change(REMOVE, "pool", name, None, _pool_summary(a))
            continue
        if a == b:  # most are unchanged: one comparison, no plain dicts
            continue
        fields = _field_changes(_plain_without(a, "name", "backends"), _plain_without(b, "name", "backends"))
        old_ids, new_ids = [x.id for x in a.backends], [x.id for x in b.backends]
        kept_old = [i for i in old_ids if i in new_ids]
        kept_new = [i for i in new_ids if i in old_ids]
        if kept_old != kept_new:
            fields.append(FieldChange("backend_order", kept_old, kept_new))
        if fields:
            yield Change(CHANGE, "pool", name, None, _pool_summary(b), tuple(fields), drift=bool(a.set_by_api))
        ob, nb = _by_name(a.backends, "id"), _by_name(b.backends, "id")
        for bid in old_ids:
            if bid not in nb:
                yield Change(REMOVE, "backend", bid, name, _backend_summary(ob[bid]), drift=ob[bid].origin == "api")
        for bid in new_ids:
            if bid not in ob:
                yield Change(ADD, "backend", bid, name, _backend_summary(nb[bid]))
            else:
                fields = _field_changes(_plain_without(ob[bid], "id"), _plain_without(nb[bid], "id"))
                if fields:
                    yield Change(CHANGE, "backend", bid, name, _backend_summary(nb[bid]), tuple(fields))


def _plain_without(obj: Any, *names: str) -> dict[str, Any]:
    plain = to_plain(obj)
    for n in names:
        plain.pop(n)
    return plain


def _listener_summary(x: Listener) -> str:
    return f"{x.protocol} {x.bind}"


def _route_summary(r: Route) -> str:
    if r.match is None:
        return f"default -> pool {r.pool}"
    m = r.match
    parts = []
    if m.host:
        parts.append(f"host={m.host}")
    if m.path_prefix:
        parts.append(f"path_prefix={m.path_prefix}")
    if m.path_regex:
        parts.append(f"path_regex={m.path_regex}")
    if m.methods:
        parts.append(f"method={','.join(m.methods)}")
    parts += [f"header {n}={v}" for n, v in m.headers]
    return f"{' '.join(parts)} -> pool {r.pool}"


def _pool_summary(p: Pool) -> str:
    return f"{p.algorithm}, {len(p.backends)} backend{'s' if len(p.backends) != 1 else ''}"


def _backend_summary(b: Any) -> str:
    host = f"[{b.address}]" if ":" in b.address else b.address
    extra = "" if b.enabled else ", disabled"
    return f"{host}:{b.port} weight {b.weight}{extra}"


# -- effects --------------------------------------------------------------------


def sample_keys(hash_key: str) -> tuple[bytes, ...]:
    """A fixed sample: IPv4 addresses for source_ip, opaque strings otherwise."""
    if hash_key == "source_ip":
        out = []
        for i in range(KEY_SAMPLE):
            h = hashing.hash64(i.to_bytes(4, "big"), b"sample")
            out.append(f"{h >> 24 & 255}.{h >> 16 & 255}.{h >> 8 & 255}.{h & 255}".encode())
        return tuple(out)
    return tuple(f"key-{i}".encode() for i in range(KEY_SAMPLE))


@functools.cache
def _sample_hashes(hash_key: str) -> tuple[int, ...]:
    # Built and hashed once per hash key, not once per table of every changed
    # hashing pool: hashing the sample was most of the time a plan took.
    return tuple(hashing.hash64(k) for k in sample_keys(hash_key))


def _key_map(pool: Pool, hashes: tuple[int, ...]) -> list[str]:
    backends = pool.enabled_backends()
    ids = [b.id for b in backends]
    table = hashing.lookup_table(pool.algorithm, ids, [b.weight for b in backends])
    return [ids[i] for i in hashing.pick_indexes(table, hashes)] if table else []


def _shares(pool: Pool, key_map: list[str] | None) -> dict[str, float]:
    backends = pool.enabled_backends()
    if not backends:
        return {}
    if key_map is not None:
        counts: dict[str, int] = {b.id: 0 for b in backends}
        for bid in key_map:
            counts[bid] += 1
        return {bid: n / len(key_map) for bid, n in counts.items()}
    if pool.algorithm in WEIGHTED:
        total = sum(b.weight for b in backends)
        return {b.id: b.weight / total for b in backends}
    return {b.id: 1 / len(backends) for b in backends}


def _effects(old: RoutingTable, new: RoutingTable) -> Iterator[PoolEffect]:
    before = _by_name(old.pools)
    for b in new.pools:
        a = before.get(b.name)
        if a is None or a == b:
            continue
        hashed = a.algorithm in HASHING and b.algorithm in HASHING
        moved, note = None, None
        map_a = map_b = None
        if hashed and a.hash_key == b.hash_key:
            hashes = _sample_hashes(b.hash_key)
            map_a, map_b = _key_map(a, hashes), _key_map(b, hashes)
            if map_a and map_b:
                moved = sum(x != y for x, y in zip(map_a, map_b, strict=False)) / len(hashes)
        elif hashed:
            note = f"hash key changes ({a.hash_key} -> {b.hash_key}): any client may move"
        sa = _shares(a, map_a if a.algorithm in HASHING and map_a else None)
        sb = _shares(b, map_b if b.algorithm in HASHING and map_b else None)
        if sa == sb and moved in (None, 0.0) and note is None:
            continue
        order = dict.fromkeys([x.id for x in a.backends] + [x.id for x in b.backends])
        shares = tuple(Share(bid, sa.get(bid), sb.get(bid)) for bid in order if bid in sa or bid in sb)
        yield PoolEffect(b.name, shares, moved, note)


def _rebinds(old: tuple[Listener, ...], new: tuple[Listener, ...]) -> Iterator[Rebind]:
    before, after = _by_name(old), _by_name(new)
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        sa = f"{a.protocol} {a.bind}" if a else None
        sb = f"{b.protocol} {b.bind}" if b else None
        if sa != sb:
            yield Rebind(name, sa, sb)


# -- text -----------------------------------------------------------------------


def _render(plan: Plan) -> Iterator[str]:
    if plan.empty:
        yield plan.summary()
        return
    yield f"Changes from {_short(plan.base_version)} to {_short(plan.version)}:"
    yield ""
    # Changes come grouped (a listener, then its routes; a pool, then its
    # backends). A child whose parent did not change gets the parent as context.
    parent: tuple[str, str | None] | None = None
    for c in plan.changes:
        if c.kind in ("route", "backend"):
            owner = ("listener" if c.kind == "route" else "pool", c.parent)
            if owner != parent:
                yield f'    {owner[0]} "{owner[1]}"'
                parent = owner
            yield from _render_change(c, "    ")
        else:
            parent = (c.kind, c.name)
            yield from _render_change(c, "")
    if plan.effects or plan.rebinds:
        yield ""
        yield "Effect:"
    for e in plan.effects:
        yield f"  pool \"{e.pool}\":"
        for s in e.shares:
            yield f"      {s.backend}: {_pct(s.before)} -> {_pct(s.after)}"
        if e.moved is not None:
            yield f"      {e.moved * 100:.1f}% of keys move to another backend (sample of {KEY_SAMPLE})"
        if e.note:
            yield f"      {e.note}"
    for r in plan.rebinds:
        if r.before is None:
            yield f"  listener \"{r.listener}\": binds {r.after}"
        elif r.after is None:
            yield f"  listener \"{r.listener}\": closes {r.before} (its connections drain)"
        else:
            yield f"  listener \"{r.listener}\": re-binds {r.before} -> {r.after}"
    if plan.dynamic:
        yield ""
        yield "Kept (backends the admin API added to dynamic_backends pools):"
        for pool, ids in plan.dynamic:
            yield f"  pool \"{pool}\": {', '.join(ids)}"
    yield ""
    yield plan.summary()
    if plan.drift:
        n = plan.drift
        yield (f"{n} of these change{'s undo' if n != 1 else ' undoes'} drift: what was changed through the "
               "admin API goes back to the file's intent (the file wins).")


def _render_change(c: Change, indent: str) -> Iterator[str]:
    if c.kind == "global":
        title = "global"
    elif c.kind == "route":
        title = f"route [{c.name.rsplit('[', 1)[1]}"
    else:
        title = f'{c.kind} "{c.name}"'
    drift = "   # drift: set through the admin API" if c.drift else ""
    if c.action == CHANGE:
        yield f"{indent}  ~ {title}{drift}"
        for f in c.fields:
            fname, old, new = _display_field(f)
            yield f"{indent}      ~ {fname}: {old} -> {new}"
    else:
        yield f"{indent}  {_SYMBOL[c.action]} {title}: {c.summary}{drift}"


def _display_field(f: FieldChange) -> tuple[str, str, str]:
    if f.name.endswith("_ms") and all(isinstance(v, int) for v in (f.old, f.new) if v is not None):
        name = f.name[: -len("_ms")]
        return name, *(format_ms(v) if v is not None else "(none)" for v in (f.old, f.new))
    return f.name, _value(f.old), _value(f.new)


def _value(v: Any) -> str:
    if v is None:
        return "(none)"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list) and v and all(isinstance(x, dict) and "not_after" in x for x in v):
        return "[" + "; ".join(f"{x['subject']} {','.join(x['names'])} until {x['not_after'][:10]}" for x in v) + "]"
    return json.dumps(v, separators=(", ", ": "))


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def _short(version: str | None) -> str:
    return "(empty state)" if version is None else version[:12]
