"""The one command-line syntax of every launcher: a config dataclass, typed YAML/JSON, `--section.key` overrides.

    cfg = parse(RunConfig, argv, prog="adapt.py", description=__doc__)

- `--config file.yaml` (or .json) holds any part of the dataclass; values are typed by its fields (`lr: 1e-4`
  is a float) and choice fields (`Literal[...]`) are checked; later `--section.key value` arguments win.
- `--help` lists every field with its one-line doc (the attribute docstrings of mod_train/config.py).
- An unknown key, in a file or on the command line, is refused with the closest valid one ("did you mean").
- `main(fn)` runs a launcher: a bad setting is one line `prog: error: ...` on stderr and exit code 2 (the
  traceback only with `--debug`), before any model is loaded.

Built on jsonargparse (its `ArgumentParser` over dataclasses, as litgpt does); no other parser in the project.
"""
from __future__ import annotations

import difflib
import os
import re
import sys
from typing import Callable, Sequence, TypeVar

from mod_train.config import ConfigError, UserError

T = TypeVar("T")


def parser_for(cls, *, prog: str | None = None, description: str | None = None,
               positional: Sequence[str] = (), skip: Sequence[str] = ()):
    """A jsonargparse parser of dataclass `cls`: fields as `--name` / `--section.key`, plus `--config`.
    Fields named in `positional` are positional arguments instead (in that order)."""
    from jsonargparse import ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    ap = ArgumentParser(prog=prog, description=description, exit_on_error=False, default_env=False,
                        allow_abbrev=False)
    ap.add_argument("--config", action="config", help="YAML or JSON file with any of the settings below")
    for name in positional:
        ap.add_argument(name, help=f"{cls.__name__}.{name}")
    ap.add_class_arguments(cls, nested_key=None, skip=set(positional) | set(skip), fail_untyped=True)
    return ap


def parse(cls: type[T], argv: Sequence[str] | None = None, *, prog: str | None = None,
          description: str | None = None, positional: Sequence[str] = (), skip: Sequence[str] = ()) -> T:
    """Parse `argv` (default: sys.argv[1:]) into a validated `cls` instance; raises ConfigError (one line)."""
    from jsonargparse import ArgumentError

    argv = [a for a in (sys.argv[1:] if argv is None else list(argv)) if a != "--debug"]
    argv = [a for a in argv if not a.startswith("--local_rank")]  # the deepspeed launcher adds it
    ap = parser_for(cls, prog=prog, description=description, positional=positional, skip=skip)
    try:
        ns = ap.parse_args(argv)
        cfg = cls(**{k: v for k, v in vars(ap.instantiate(ns)).items() if k != "config" and k not in skip})
    except ArgumentError as e:
        raise ConfigError(_explain(str(e), ap)) from None
    except (TypeError, ValueError) as e:  # dataclass __post_init__ validation
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(_first_line(str(e))) from None
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def _first_line(msg: str) -> str:
    lines = [ln.strip() for ln in msg.strip().splitlines() if ln.strip()]
    return " ".join(lines[:3]) if lines else msg


def _valid_keys(ap) -> list[str]:
    keys = []
    for action in ap._actions:  # the parser's own option table, flattened dotted keys
        keys += [o[2:] for o in action.option_strings if o.startswith("--")]
    return keys


def _explain(msg: str, ap) -> str:
    """jsonargparse's message as one line, with the closest valid key for an unknown one."""
    unknown = None
    m = re.search(r"Group '([\w.]+)' does not accept nested key '([\w.]+)'", msg) or \
        re.search(r"Group '([\w.]+)' does not accept option '([\w.]+)'", msg)
    if m:
        unknown = f"{m.group(1)}.{m.group(2)}"
    else:
        m = re.search(r"unrecognized arguments: --([\w.\-]+)", msg) or \
            re.search(r"Key '([\w.]+)' is not expected", msg) or \
            re.search(r"Option '([\w.]+)' is not accepted", msg) or \
            re.search(r"[Uu]nexpected key[s]?[: ]+'?([\w.]+)", msg)
        if m:
            unknown = m.group(1)
    line = _first_line(msg)
    if unknown:
        hint = difflib.get_close_matches(unknown, _valid_keys(ap), n=1, cutoff=0.6)
        line = f"unknown setting {unknown!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "") + \
            "; see --help for every setting"
    return line


def main(fn: Callable[[list[str]], int | None], prog: str | None = None) -> None:
    """Run launcher entry `fn(argv)` and exit with its code; configuration errors become one line."""
    argv = sys.argv[1:]
    prog = prog or os.path.basename(sys.argv[0])
    debug = "--debug" in argv
    try:
        code = fn(argv)
    except UserError as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code or 0)
