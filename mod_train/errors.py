"""The error types every layer raises, at the bottom of the package (it imports nothing of mod_train).

    from mod_train.errors import ConfigError     # also importable as mod_train.config.ConfigError

`mod_train.paths` (which checks model locations) and `mod_train.config` (which validates settings) both raise
them, so they live here rather than in either: config imports paths, paths imports only this module.
"""
from __future__ import annotations


class UserError(Exception):
    """A problem its message fully explains (a bad setting or input, a refused resume, a diverged run): the
    launchers print it as one line and exit non-zero, with the traceback only under --debug (mod_train.cli)."""


class ConfigError(UserError, ValueError):
    """A setting is invalid; the message names the field, the value and the fix."""
