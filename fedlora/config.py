"""Frozen config dataclasses; TOML files and overrides may only name fields that exist."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Type, TypeVar

__all__ = ["FedConfig", "from_mapping", "load_toml", "ConfigError"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class FedConfig:
    """The federated part of an experiment (the tier adds its own model/data config)."""

    rule: str = "fedavg"  # a registered rule name: fedlora.rule_names()
    rounds: int = 10
    num_clients: int = 10
    clients_per_round: float = 1.0  # a fraction in (0, 1], or an integer count > 1
    weighting: str = "samples"  # "samples" (p_k ∝ n_k, FedAvg's choice) or "uniform"
    seed: int = 0  # every draw (init, sampling, batches) derives from it
    eval_every: int = 1  # evaluate the global every this many rounds (and always at the end)
    checkpoint_every: int = 1

    def __post_init__(self) -> None:
        from .aggregators import rule_names

        if self.rule not in rule_names():
            raise ConfigError(f"rule={self.rule!r} is not registered; choose one of {', '.join(rule_names())}")
        if self.rounds < 1:
            raise ConfigError(f"rounds={self.rounds}; need at least 1")
        if self.num_clients < 1:
            raise ConfigError(f"num_clients={self.num_clients}; need at least 1")
        c = self.clients_per_round
        if not (0 < c <= 1 or (c > 1 and float(c).is_integer() and c <= self.num_clients)):
            raise ConfigError(f"clients_per_round={c}; give a fraction in (0, 1] or a whole count <= num_clients")
        if self.weighting not in ("samples", "uniform"):
            raise ConfigError(f"weighting={self.weighting!r}; use 'samples' or 'uniform'")
        if self.eval_every < 1 or self.checkpoint_every < 1:
            raise ConfigError("eval_every and checkpoint_every must be >= 1")

    def sampled_per_round(self) -> int:
        c = self.clients_per_round
        return int(c) if c > 1 else max(1, round(c * self.num_clients))


def from_mapping(cls: Type[T], data: Mapping[str, Any]) -> T:
    """Build ``cls`` from a mapping; unknown keys are errors that list the valid ones."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys {unknown}; valid keys: {sorted(names)}")
    return cls(**data)


def load_toml(cls: Type[T], path: str | Path, section: Optional[str] = None, **overrides) -> T:
    """Read ``cls`` from a TOML file (optionally one ``[section]``), then apply keyword overrides."""
    with open(path, "rb") as f:
        data = tomllib.load(f)
    if section is not None:
        data = data.get(section, {})
    data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    return from_mapping(cls, data)
