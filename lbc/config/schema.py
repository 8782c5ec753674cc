"""JSON Schema validation of a parsed document, with jsonschema's errors
translated into located diagnostics, and the schema's defaults filled in.

The schema (schemas/pool.schema.json) is the one source of the config
language: its `default` keywords are the defaults lbc applies, and a schema
node may carry `x-error`, the message shown when a value fails that node.
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import re
from collections.abc import Iterator
from importlib.resources import files
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from lbc.config.diagnostics import Diagnostic
from lbc.config.loader import Document


@functools.cache
def pool_schema() -> dict[str, Any]:
    return json.loads(files("lbc.schemas").joinpath("pool.schema.json").read_text(encoding="utf-8"))


@functools.cache
def _validator() -> Draft202012Validator:
    # jsonschema looks every $ref up through `referencing` each time it is
    # used, about a third of a check's time; the schema has no recursion (a
    # recursive $ref would make _inline recurse without end), so the validator
    # gets a copy with the references inlined, built once.
    return Draft202012Validator(_inline(pool_schema()))


def _inline(node: Any) -> Any:
    """A copy of `node` with every local $ref replaced by what it points to.
    A node's own keys (description, default, x-error) win over the target's,
    and the target's keys take the $ref's place, so jsonschema visits keywords
    in the same order and `error.schema` still carries the x-error."""
    if isinstance(node, list):
        return [_inline(v) for v in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "$ref":
            out.update((k, v) for k, v in _inline(resolve(node)).items() if k not in node)
        else:
            out[key] = _inline(value)
    return out


def check(doc: Document) -> list[Diagnostic]:
    out: set[Diagnostic] = set()
    for error in _validator().iter_errors(doc.data):
        out.update(_translate(error, doc))
    return sorted(out)


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    """Follow a local $ref (one level; the schema does not chain them)."""
    ref = node.get("$ref")
    if ref is None:
        return node
    target: Any = pool_schema()
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    return target


def fill_defaults(data: Any, schema: dict[str, Any] | None = None) -> None:
    """Fill the schema's defaults into `data` in place. Tolerates data that did
    not validate: only dicts are filled and only lists are descended."""
    node = resolve(schema if schema is not None else pool_schema())
    if isinstance(data, dict):
        for name, sub in node.get("properties", {}).items():
            if name not in data:
                default = sub["default"] if "default" in sub else resolve(sub).get("default", _MISSING)
                if default is _MISSING:
                    continue
                data[name] = copy.deepcopy(default)
            if isinstance(data[name], (dict, list)):  # scalars have nothing to fill
                fill_defaults(data[name], sub)
    elif isinstance(data, list) and "items" in node:
        for item in data:
            fill_defaults(item, node["items"])


_MISSING = object()


def _translate(error: ValidationError, doc: Document) -> Iterator[Diagnostic]:
    path = tuple(error.absolute_path)
    schema = error.schema if isinstance(error.schema, dict) else {}
    kind = error.validator
    if "propertyNames" in error.absolute_schema_path:
        # jsonschema reports a bad key at the mapping's path; point at the key.
        key_path = path + (error.instance,)
        message = schema.get("x-error", "is not an allowed name")
        yield doc.diagnostic(key_path, f"key {error.instance!r} {message}", key=True)
        return
    if kind == "additionalProperties" and isinstance(error.instance, dict):
        known = list(schema.get("properties", {}))
        for key in error.instance:
            if key in known:
                continue
            hint = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            suffix = f"; did you mean '{hint[0]}'?" if hint else f"; expected one of: {', '.join(known)}"
            yield doc.diagnostic(path + (key,), f"unknown key '{key}'{suffix}", key=True)
        return
    if kind == "required":
        m = re.match(r"^'(.+)' is a required property$", error.message)
        missing = m.group(1) if m else str(error.validator_value)
        yield doc.diagnostic(path, f"missing required key '{missing}'")
        return
    if kind in ("anyOf", "oneOf") and error.context:
        # A branch that failed inside the value (a list item, say) says more than
        # the node's x-error; so does any branch when there is no x-error.
        inner = [e for e in error.context if e.path]
        if inner or "x-error" not in schema:
            yield from _translate(best_match(inner or error.context), doc)
            return
    if "x-error" in schema and kind != "type":
        yield doc.diagnostic(path, f"{schema['x-error']} (got {_show(error.instance)})")
        return
    yield doc.diagnostic(path, _message(error))


_TYPE_NAMES = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "nothing",
}


def _message(error: ValidationError) -> str:
    kind, expected, got = error.validator, error.validator_value, error.instance
    if kind == "type":
        names = expected if isinstance(expected, list) else [expected]
        return f"expected {' or '.join(_TYPE_NAMES.get(n, n) for n in names)}, got {_describe(got)}"
    if kind == "enum":
        hint = ""
        if isinstance(got, str):
            choices = {str(v).lower(): str(v) for v in expected}
            close = difflib.get_close_matches(got.lower(), list(choices), n=1, cutoff=0.6)
            hint = f"; did you mean '{choices[close[0]]}'?" if close else ""
        return f"must be one of: {', '.join(str(v) for v in expected)} (got {_show(got)}){hint}"
    if kind == "const":
        return f"must be {_show(expected)} (got {_show(got)})"
    if kind == "minimum":
        return f"must be at least {expected} (got {_show(got)})"
    if kind == "maximum":
        return f"must be at most {expected} (got {_show(got)})"
    if kind == "minItems":
        return "must not be empty" if expected == 1 else f"must have at least {expected} items"
    if kind == "minProperties":
        return "must not be empty"
    if kind == "minLength":
        return "must not be empty" if expected == 1 else f"must be at least {expected} characters"
    if kind == "maxLength":
        return f"must be at most {expected} characters"
    if kind == "uniqueItems":
        return "must not list the same item twice"
    if kind == "pattern":
        return f"{_show(got)} does not match the pattern {expected}"
    return error.message


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    kind = {str: "string", int: "integer", float: "number"}.get(type(value), type(value).__name__)
    return f"{kind} {_show(value)}"


def _show(value: Any) -> str:
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return repr(text)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    return repr(value)
