"""Telling a local folder from a hub id, so that a missing folder is reported as a missing folder.

    check_model_location("runs/x-hf", "EvalConfig.mod")   # raises MissingPathError if runs/ exists but x-hf not

A value is taken as a local path when it exists, or when it cannot be a hub id: absolute, starting
with '.', '~' or a drive, with a backslash, more than one '/', characters a hub id never has, or a
first component that is an existing local folder ('runs/x' when ./runs exists).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from mod_train.errors import ConfigError

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class MissingPathError(FileNotFoundError, ConfigError):
    """A local file or folder named by a setting does not exist; the message names the setting."""


def looks_local(value: str) -> bool:
    """True if `value` can only be a local path (never a hub repo id)."""
    v = str(value)
    if os.path.exists(os.path.expanduser(v)):
        return True
    if v.startswith((".", "~", "/")) or "\\" in v or re.match(r"^[A-Za-z]:", v) or not _HUB_ID.match(v):
        return True
    return "/" in v and os.path.isdir(v.split("/", 1)[0])


def check_model_location(value, field: str) -> None:
    """Raise MissingPathError naming `field` if `value` is a local folder that does not exist."""
    v = str(value)
    p = Path(os.path.expanduser(v))
    if looks_local(v) and not p.is_dir():
        what = "is a file, not a folder" if p.is_file() else "does not exist"
        raise MissingPathError(f"{field} = {v!r}: the local folder {what} (resolved: {p.resolve()}); "
                               "give an existing model directory, or a hub id like 'org/name'")
