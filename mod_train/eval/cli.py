"""Command-line arguments generated from a config dataclass: one `--field-name` option per field, its
help the field's one-line doc. Lists are comma-separated, dicts JSON, booleans take true/false."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json


def field_docs(cls) -> dict[str, str]:
    """The docstring under each dataclass field (the project's one-line-doc convention)."""
    src = inspect.getsource(cls)
    tree = ast.parse(src)
    body = tree.body[0].body
    out = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(getattr(b, "value", None), ast.Constant):
            out[a.target.id] = str(b.value.value)
    return out


def _parser_for(ann: str):
    ann = str(ann)
    if ann.startswith("list"):
        def p(s):
            return [_num(x) for x in s.split(",") if x]
        return p
    if ann.startswith("dict"):
        return json.loads
    if ann.startswith("bool"):
        return lambda s: s.lower() in ("1", "true", "yes", "on")
    if ann.startswith("int"):
        return lambda s: None if s.lower() in ("none", "null") else int(s)
    if ann.startswith("float"):
        return lambda s: None if s.lower() in ("none", "null") else float(s)
    return lambda s: None if s.lower() in ("none", "null") and "None" in ann else s


def _num(x: str):
    for t in (int, float):
        try:
            return t(x)
        except ValueError:
            pass
    return x


def add_dataclass_args(ap: argparse.ArgumentParser, cls, skip=(), aliases: dict | None = None) -> None:
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore
        names = [f"--{f.name.replace('_', '-')}"] + list((aliases or {}).get(f.name, []))
        ap.add_argument(*names, dest=f.name, type=_parser_for(f.type), default=default,
                        required=f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
                        help=f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%"))


def to_config(cls, ns: argparse.Namespace):
    return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)})
