"""The config reference page (`docs/config.md`), generated from `bclib/config.py` itself.

Every key of every section with its type, default, allowed values or range and its meaning. The meaning is
the comment beside the field (or the comment lines right above it) in config.py, so the page cannot drift
from the code: `python -m bclib.config_reference` rewrites the page, and a test fails when the page is stale
or a key has no comment. Pure: reads config.py's source with `ast` and `tokenize`, imports nothing else.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import sys
import tokenize
import typing
from pathlib import Path
from typing import Optional

from bclib import config as config_module

PAGE = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def _comments(source: str) -> dict[int, str]:
    """Line number -> the text of the comment on that line (without '#')."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _field_docs(source: str) -> dict[str, dict[str, str]]:
    """Class name -> field name -> its comment: the one on the field's line, else the comment lines right above."""
    comments = _comments(source)
    lines = source.splitlines()
    out: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        docs = {}
        for item in node.body:
            if not (isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name)):
                continue
            text = comments.get(item.end_lineno, "")
            if not text or not lines[item.end_lineno - 1].split("#")[0].strip():
                above, n = [], item.lineno - 1
                while n >= 1 and lines[n - 1].strip().startswith("#"):
                    above.insert(0, comments.get(n, ""))
                    n -= 1
                text = " ".join(above)
            docs[item.target.id] = text
        out[node.name] = docs
    return out


def _type_name(hint) -> str:
    """A type hint as the page shows it: `int`, `str or null`, `one of "a", "b"`, `list[int]`, ..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(f'"{a}"' for a in args)
    if origin is typing.Union:
        parts = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(hint, "__name__", str(hint))


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    return "`null`" if value is None else f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def _range(dotted: str) -> str:
    low, high = config_module._BOUNDS.get(dotted, (None, None))
    if low is None and high is None:
        return ""
    return f"{'' if low is None else low} .. {'' if high is None else high}".strip()


def keys() -> list[tuple[str, str, str, str, str]]:
    """(dotted key, type, default, range, meaning) of every config key, in the order config.py defines them."""
    docs = _field_docs(Path(config_module.__file__).read_text())
    hints = typing.get_type_hints(config_module.JobConfig)
    rows = []
    for top in dataclasses.fields(config_module.JobConfig):
        cls = hints[top.name]
        if dataclasses.is_dataclass(cls):
            section_hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                dotted = f"{top.name}.{f.name}"
                rows.append((dotted, _type_name(section_hints[f.name]), _default(f), _range(dotted),
                             docs.get(cls.__name__, {}).get(f.name, "")))
        else:
            rows.append((top.name, _type_name(cls), _default(top), "", docs["JobConfig"].get(top.name, "")))
    return rows


def undocumented() -> list[str]:
    """The keys whose field has no comment in config.py (the test requires none)."""
    return [k for k, _, _, _, meaning in keys() if not meaning]


def render() -> str:
    """The page's Markdown text."""
    out = ["# Configuration reference", "",
           "Generated from `bclib/config.py` by `python -m bclib.config_reference` (do not edit by hand; a test "
           "fails when this page is stale). Keys are given as `section.key`; set them in the YAML file, or per run "
           "with `--set section.key=value`. Unknown keys and values of the wrong type or out of range are refused "
           "with `ConfigError` (exit 2) naming the key.", ""]
    section: Optional[str] = None
    for dotted, kind, default, bounds, meaning in keys():
        head = dotted.split(".")[0] if "." in dotted else "top level"
        if head != section:
            section = head
            out += [f"## {section}", "", "| key | type | default | range | meaning |", "|---|---|---|---|---|"]
        cell = meaning.replace("|", "\\|")
        out.append(f"| `{dotted}` | {kind.replace('|', chr(92) + '|')} | {default} | {bounds} | {cell} |")
    for i in range(len(out) - 1, 0, -1):  # a blank line after each table
        if out[i].startswith("## ") and out[i - 1] != "":
            out.insert(i, "")
    return "\n".join(out) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    """Write docs/config.md (`--check`: exit 1 when it differs from what config.py gives)."""
    args = list(sys.argv[1:] if argv is None else argv)
    text = render()
    if "--check" in args:
        current = PAGE.read_text() if PAGE.exists() else ""
        if current != text:
            print(f"{PAGE} is stale: run python -m bclib.config_reference", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE} ({len(keys())} keys)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
