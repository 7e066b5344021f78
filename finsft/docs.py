"""The recipe reference in Markdown, generated from the JSON Schema (one table per section).

``python -m finsft.docs`` prints it; ``python -m finsft.docs README.md`` rewrites the part of README.md between
the ``<!-- recipe-reference:start -->`` and ``<!-- recipe-reference:end -->`` markers; add ``--check`` to only
report (exit 1) whether that part is out of date.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from finsft.recipe import required_keys, schema

START = "<!-- recipe-reference:start -->"
END = "<!-- recipe-reference:end -->"
COMMAND = "python -m finsft.docs README.md"
LIBRARY = "x-library"  # a key generated from a library class (finsft/library_schema.py)
EXCLUDED = "x-excluded"  # library fields finsft sets itself, with the reason
TYPE_NAMES = {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean",
              "null": "null", "object": "object", "array": "list"}


def _code(value: Any, raw: bool = False) -> str:
    """A JSON value (or with ``raw``, a string as is) as a Markdown code span that is safe in a table cell."""
    text = str(value) if raw else json.dumps(value, ensure_ascii=False)
    fence = "``" if "`" in text else "`"
    pad = " " if "`" in text else ""
    return f"{fence}{pad}{text}{pad}{fence}".replace("|", "\\|")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _bounds(sch: Mapping[str, Any]) -> str:
    parts = []
    for key, op in (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<")):
        if key in sch:
            parts.append(f"{op} {sch[key]}")
    if isinstance(sch.get("not"), Mapping) and "const" in sch["not"]:
        parts.append(f"≠ {json.dumps(sch['not']['const'])}")
    return ", ".join(parts)


def describe_type(sch: Mapping[str, Any], plural: bool = False) -> str:
    """Type and allowed values of a property, as Markdown (``plural``: of the items of a list)."""
    if "enum" in sch:
        return ", ".join(_code(v) for v in sch["enum"])
    if "const" in sch:
        return _code(sch["const"])
    if "anyOf" in sch:
        return " or ".join(describe_type(s) for s in sch["anyOf"])
    kind = sch.get("type")
    if isinstance(kind, list):
        return " or ".join(describe_type({**sch, "type": k}) for k in kind)
    if kind == "array":
        items = sch.get("items", {})
        text = "list"
        if items:
            text += f" of {describe_type(items, plural=True)}"
        extra = []
        if sch.get("minItems"):
            extra.append(f"at least {sch['minItems']}")
        if sch.get("uniqueItems"):
            extra.append("unique")
        return text + (f" ({', '.join(extra)})" if extra else "")
    if kind == "object":
        extra_schema = sch.get("additionalProperties")
        if isinstance(extra_schema, Mapping):
            return f"object of {describe_type(extra_schema)} values"
        return "object"
    s = "s" if plural else ""
    if kind in ("integer", "number"):
        bounds = _bounds(sch)
        return TYPE_NAMES[kind] + s + (f" {bounds}" if bounds else "")
    if kind == "string":
        if "pattern" in sch:
            return f"string{s} matching {_code(sch['pattern'], raw=True)}"
        return f"non-empty string{s}" if sch.get("minLength") else f"string{s}"
    return TYPE_NAMES.get(str(kind), "any") + (s if kind else "")


def _default(sub: Mapping[str, Any], required: bool) -> str:
    if required:
        return "**required**"
    return _code(sub["default"]) if "default" in sub else ""


def _examples(sub: Mapping[str, Any]) -> str:
    return "<br>".join(_code(e) for e in sub.get("examples", []))


def _table(node: Mapping[str, Any], prefix: str, link_sections: bool) -> list[str]:
    required = set(required_keys(node))
    lines = ["| Key | Type / allowed values | Default | Description | Example |", "|---|---|---|---|---|"]
    for key, sub in node["properties"].items():
        name = f"`{key}`"
        if link_sections and "properties" in sub:
            name = f"[`{key}`](#{_anchor(prefix + key)})"
        lines.append(f"| {name} | {describe_type(sub)} | {_default(sub, key in required)} | "
                     f"{_cell(sub.get('description', ''))} | {_examples(sub) if 'properties' not in sub else ''} |")
    return lines


def _first_sentence(text: str, limit: int = 200) -> str:
    """The first sentence of a library's help text (at least 30 characters, at most about ``limit``)."""
    text = " ".join(text.split())
    end = next((m for m in range(30, len(text)) if text[m] == "." and text[m + 1:m + 2] in (" ", "")), None)
    if end is not None and end < limit:
        return text[:end + 1]
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " …"


def _library_tables(sub: Mapping[str, Any]) -> list[str]:
    """The long tail of a section: the library's other fields in a compact table, then the fields finsft sets."""
    lib = {k: v for k, v in sub["properties"].items() if LIBRARY in v}
    source = sub.get(LIBRARY + "-class", "the library")
    out: list[str] = []
    if lib:
        out += ["", f"Every other field of `{source}` ({len(lib)}), passed through unchanged when set (absent: the "
                    "library's default, shown here). Description: the library's help, first sentence "
                    "(`finsft schema` has it in full).", "",
                "| Key | Type / allowed values | Default | Description |", "|---|---|---|---|"]
        out += [f"| `{k}` | {describe_type(v)} | {_code(v['default'])} | {_cell(_first_sentence(v['description']))} |"
                for k, v in lib.items()]
    excluded: dict[str, list[str]] = {}
    for key, reason in sub.get(EXCLUDED, {}).items():
        excluded.setdefault(reason, []).append(key)
    if excluded:
        out += ["", f"Fields of `{source}` that finsft sets itself (an error in a recipe, with the reason):", ""]
        out += [f"- {', '.join(f'`{k}`' for k in keys)}: {_cell(reason)}" for reason, keys in excluded.items()]
    return out


def _anchor(dotted: str) -> str:
    """GitHub's anchor of a heading "`dotted`"."""
    return "".join(c for c in dotted.lower() if c.isalnum() or c in "-_ ").replace(" ", "-")


def _sections(node: Mapping[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    required = set(required_keys(node))
    for key, sub in node["properties"].items():
        if "properties" not in sub:
            continue
        dotted = prefix + key
        kind = sub.get("type")
        if key in required:
            status = " **Required.**"
        elif isinstance(kind, list) and "null" in kind:
            status = ""  # the description says what null means
        else:
            status = " Optional: every key has a default."
        out += ["", f"### `{dotted}`", "", f"{sub.get('description', '')}{status}", ""]
        own = {k: v for k, v in sub["properties"].items() if LIBRARY not in v}
        out += _table({**sub, "properties": own}, dotted + ".", link_sections=False)
        out += _library_tables(sub)
        for example in sub.get("examples", [])[:1]:
            out += ["", "Example:", "", "```json", json.dumps({key: example}, indent=2), "```"]
        out += _sections(sub, dotted + ".")
        out += _entry_sections(sub, dotted + ".")
    return out


def _entry_sections(node: Mapping[str, Any], prefix: str) -> list[str]:
    """A table for the entries of a list of objects (``data.datasets[]``) or of a map of named objects
    (``evaluation.sets.<name>``)."""
    out: list[str] = []
    for key, sub in node.get("properties", {}).items():
        for entry, dotted in ((sub.get("items"), f"{prefix}{key}[]"),
                              (sub.get("additionalProperties"), f"{prefix}{key}.<name>")):
            if isinstance(entry, Mapping) and "properties" in entry:
                out += ["", f"### `{dotted}`", "", f"Each entry of `{prefix}{key}`.", ""]
                out += _table(entry, dotted + ".", link_sections=False)
    return out


def render(sch: Mapping[str, Any] | None = None) -> str:
    """The recipe reference as Markdown (without the markers)."""
    sch = schema() if sch is None else sch
    lines = [
        f"<!-- Generated from finsft/schemas/recipe.schema.json by `{COMMAND}`; do not edit by hand. -->",
        "",
        f"{sch.get('description', '')} `finsft schema` prints the JSON Schema; `finsft validate` checks recipes "
        "against it and against the cross-field rules; `finsft show RECIPE.json` prints a recipe with every "
        "finsft default filled in (a library key appears when the recipe sets it; absent, it keeps the library's "
        "default).",
        "",
        "### Top level",
        "",
        *_table(sch, "", link_sections=True),
        *_sections(sch),
    ]
    return "\n".join(lines) + "\n"


def replace_section(text: str, rendered: str) -> str:
    """``text`` with the part between the markers replaced by ``rendered``."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        raise ValueError(f"expected one '{START}' followed by one '{END}'")
    head, rest = text.split(START)
    _, tail = rest.split(END)
    return f"{head}{START}\n{rendered}{END}{tail}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finsft.docs", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("file", nargs="?", help="Markdown file whose recipe-reference section to rewrite "
                                                "(default: print the reference)")
    parser.add_argument("--check", action="store_true", help="only check that FILE is up to date (exit 1 if not)")
    args = parser.parse_args(argv)
    rendered = render()
    if args.file is None:
        sys.stdout.write(rendered)
        return 0
    path = Path(args.file)
    text = path.read_text(encoding="utf-8")
    try:
        new = replace_section(text, rendered)
    except ValueError as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return 2
    if new == text:
        print(f"{path}: recipe reference is up to date")
        return 0
    if args.check:
        print(f"{path}: recipe reference is out of date; run `{COMMAND}`", file=sys.stderr)
        return 1
    path.write_text(new, encoding="utf-8")
    print(f"{path}: recipe reference updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
