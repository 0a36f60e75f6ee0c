"""A Flower app's run config (``[tool.flwr.app.config]``, overridden with ``flwr run -c``), checked.

Flower passes the run config through as whatever TOML type the user wrote: ``-c "rounds='3'"`` gives
the string ``'3'``. ``read_run_config`` checks every key against the app's declared types and answers
a wrong one with a single line naming the key and the type it needs, instead of a ``TypeError`` deep
in the tier. ``check_rule`` refuses, in the run config's own word (``rule``), what cannot run on
Flower: an unknown rule, a chained rule (its clients train one after another), ``centralised``.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..aggregators import get_rule, rule_names
from ..config import ConfigError

__all__ = ["RunConfigError", "read_run_config", "check_rule", "say_rule", "CENTRALISED"]

CENTRALISED = "centralised"
_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


class RunConfigError(ConfigError):
    """A run-config value that cannot be used; the message is one line naming the key."""


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__


def read_run_config(run_config: Mapping[str, Any], types: Mapping[str, type]) -> dict[str, Any]:
    """The run config as ``{key: value}`` of the declared ``types`` (``int``, ``float``, ``str``,
    ``bool``; an integer is accepted where a number is expected). A key the app does not declare, or
    missing, or of another type, raises ``RunConfigError`` with a one-line message."""
    unknown = sorted(set(run_config) - set(types))
    if unknown:
        raise RunConfigError(f"run config: unknown key {unknown[0]!r}; this app's keys are {', '.join(sorted(types))}")
    out = {}
    for key, want in types.items():
        if key not in run_config:
            raise RunConfigError(f"run config: {key!r} is missing; add it to [tool.flwr.app.config]")
        v = run_config[key]
        ok = (isinstance(v, want) and not (isinstance(v, bool) and want is not bool)) or \
             (want is float and isinstance(v, int) and not isinstance(v, bool))
        if not ok:
            hint = f" (write {key}={v}, without quotes)" if isinstance(v, str) and want in (int, float) else ""
            raise RunConfigError(f"run config: {key}={v!r} is {_kind(v)}; {key} must be {_NAMES[want]}{hint}")
        out[key] = float(v) if want is float else v
    return out


def check_rule(rule: str) -> str:
    """``rule`` if it runs on Flower; else ``RunConfigError`` saying why and what to do instead."""
    if rule == CENTRALISED:
        raise RunConfigError("run config: rule='centralised' is one client holding all the training data, the "
                             "in-process ceiling of every rule; it has no federated form on Flower: run it with "
                             "the tier's CLI (--method centralised)")
    if rule not in rule_names():
        raise RunConfigError(f"run config: rule={rule!r} is not a fedlora rule; choose one of "
                             f"{', '.join(r for r in rule_names() if not get_rule(r).chain)}")
    if get_rule(rule).chain:
        raise RunConfigError(f"run config: rule={rule!r} trains the clients one after another, each from the "
                             "previous client's result; Flower nodes train in parallel: run it in-process "
                             "with the tier's CLI, or choose an independent rule")
    return rule


def say_rule(err: Exception) -> str:
    """A tier config's error in the run config's words: its ``method`` is the run config's ``rule``."""
    return str(err).replace("method=", "rule=")
