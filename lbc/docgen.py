"""Generate the README's config reference (from schemas/pool.schema.json) and
CLI reference (from the Typer app), so the docs cannot drift from the code.

    python -m lbc.docgen --write README.md   # regenerate in place
    python -m lbc.docgen --check README.md   # exit 1 if stale (a test runs this)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import typer

from lbc.config.schema import pool_schema, resolve

# Where each object of the config appears, in reading order: (title, schema pointer).
SECTIONS = (
    ("Top level", "#"),
    ("global", "#/$defs/global"),
    ("global.admin", "#/$defs/admin"),
    ("global.access_log", "#/$defs/access_log"),
    ("global.ha", "#/$defs/ha"),
    ("global.ha.nodes[]", "#/$defs/ha/properties/nodes/items"),
    ("listeners[]", "#/$defs/listener"),
    ("listeners[].routes[]", "#/$defs/route"),
    ("listeners[].routes[].match", "#/$defs/match"),
    ("listeners[].tls", "#/$defs/listener_tls"),
    ("listeners[].timeouts", "#/$defs/timeouts"),
    ("listeners[].limits", "#/$defs/limits"),
    ("pools[]", "#/$defs/pool"),
    ("pools[].health_check", "#/$defs/health_check"),
    ("pools[].outlier_detection", "#/$defs/outlier_detection"),
    ("pools[].sticky", "#/$defs/sticky"),
    ("pools[].tls", "#/$defs/upstream_tls"),
    ("pools[].backends[]", "#/$defs/backend"),
)
_NAMED_TYPES = {
    "#/$defs/duration": "duration",
    "#/$defs/size": "size",
    "#/$defs/name": "name",
    "#/$defs/header_map": "map: header -> value",
    "#/$defs/header_name": "header name",
    "#/$defs/method": "HTTP method",
}
_SECTION_OF = {pointer: title for title, pointer in SECTIONS}


def _node(pointer: str) -> dict[str, Any]:
    node: Any = pool_schema()
    for part in pointer.removeprefix("#").strip("/").split("/"):
        if part:
            node = node[part]
    return node


def _type(prop: dict[str, Any]) -> str:
    ref = prop.get("$ref")
    if ref in _NAMED_TYPES:
        return _NAMED_TYPES[ref]
    if ref in _SECTION_OF:
        return f"object ({_SECTION_OF[ref]})"
    node = resolve(prop)
    if "enum" in node:
        return " | ".join(f"`{v}`" for v in node["enum"])
    if "const" in node:
        return f"`{node['const']}`"
    if node.get("type") == "array":
        items = node["items"]
        return f"list of {_type(items)}"
    if "anyOf" in node:
        return " or ".join(_type(alt) for alt in node["anyOf"])
    kind = node.get("type", "any")
    bounds = []
    if "minimum" in node:
        bounds.append(f">= {node['minimum']}")
    if "maximum" in node:
        bounds.append(f"<= {node['maximum']}")
    return kind + (f" ({', '.join(bounds)})" if bounds else "")


def _default(prop: dict[str, Any]) -> str:
    if "default" in prop:
        value = prop["default"]
    elif "default" in resolve(prop):
        value = resolve(prop)["default"]
    else:
        return ""
    if value == {}:
        return ""
    return f"`{json.dumps(value)}`" if not isinstance(value, str) else f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_reference() -> str:
    schema = pool_schema()
    out = [schema["description"], ""]
    for title, pointer in SECTIONS:
        node = _node(pointer)
        required = set(node.get("required", ()))
        out.append(f"#### `{title}`")
        out.append("")
        if pointer != "#" and node.get("description"):
            out += [node["description"], ""]
        out.append("| key | type | default | meaning |")
        out.append("|---|---|---|---|")
        for name, prop in node["properties"].items():
            desc = prop.get("description") or resolve(prop).get("description", "")
            req = " (required)" if name in required else ""
            out.append(f"| `{name}`{req} | {_cell(_type(prop))} | {_cell(_default(prop))} | {_cell(desc)} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def cli_reference() -> str:
    from lbc.cli import app

    group = typer.main.get_command(app)
    ctx = typer.Context(group, info_name="lbc")
    out = []
    commands = []
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        if hasattr(cmd, "list_commands"):  # a group: `lbc export keepalived`
            inner = typer.Context(cmd, info_name=name, parent=ctx)
            commands += [(f"{name} {sub}", cmd.get_command(inner, sub), inner) for sub in cmd.list_commands(inner)]
        else:
            commands.append((name, cmd, ctx))
    for name, cmd, parent in commands:
        sub = typer.Context(cmd, info_name=name, parent=parent)
        usage = re.sub(r"\{(\w+)\}", lambda m: m.group(1).upper(), " ".join(cmd.collect_usage_pieces(sub)))
        out += [f"#### `lbc {name} {usage}`".replace("  ", " "), "", (cmd.help or "").strip(), ""]
        rows = []
        for param in cmd.params:
            if param.param_type_name == "option":
                names = ", ".join(f"`{o}`" for o in param.opts)
                default = "" if param.default in (None, False) or param.is_flag else f" (default: `{param.default}`)"
                env = f" (env `{param.envvar}`)" if param.envvar else ""
                rows.append(f"- {names}: {param.help or ''}{default}{env}")
        out += rows + ([""] if rows else [])
    return "\n".join(out).rstrip() + "\n"


_BLOCKS = {"config-reference": config_reference, "cli-reference": cli_reference}


def render(text: str) -> str:
    for name, make in _BLOCKS.items():
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"missing <!-- BEGIN {name} --> ... <!-- END {name} --> markers")
        text = pattern.sub(lambda m, make=make: m.group(1) + make() + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("readme", type=Path)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    current = args.readme.read_text()
    fresh = render(current)
    if args.write:
        args.readme.write_text(fresh)
        return 0
    if fresh != current:
        print(f"{args.readme} is stale: run `make docs`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
