"""Closed-form analyses of federated LoRA on a linear model, each checked by a federated simulation
that runs the core's server rules (SPEC, "Theory to implement"). Run ``python -m linear_theory``."""
from .analyses import FULL, NAMES, QUICK, Settings, run_all
from .model import LinearProblem, population, sample

__all__ = ["FULL", "NAMES", "QUICK", "Settings", "run_all", "LinearProblem", "population", "sample"]
