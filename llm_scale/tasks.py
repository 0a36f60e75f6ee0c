"""A config's data: train / validation / test splits, seeded, from the loaders in ``data`` and
``commonsense``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .commonsense import MultipleChoice, load_commonsense
from .config import LLMConfig
from .data import TextClassification, load_glue, load_table, load_tweets, stratified_split

__all__ = ["Splits", "load_splits"]

Dataset = Union[TextClassification, MultipleChoice]


@dataclass(frozen=True)
class Splits:
    train: Dataset
    test: Dataset
    val: Optional[Dataset]  # held out of training (learning-rate tuning), or None

    def labels(self) -> np.ndarray:
        d = self.train
        return d.labels if isinstance(d, TextClassification) else d.answers

    def summary(self) -> dict:
        return {"train_rows": len(self.train), "test_rows": len(self.test),
                "val_rows": len(self.val) if self.val is not None else 0, "source": self.train.source}


def _random_split(ds: MultipleChoice, fraction: float, seed: int) -> tuple[MultipleChoice, MultipleChoice]:
    perm = np.random.default_rng(seed).permutation(len(ds))
    k = max(1, round(fraction * len(ds)))
    return ds.subset(np.sort(perm[k:])), ds.subset(np.sort(perm[:k]))


def _holdout(ds: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    if isinstance(ds, TextClassification):
        return stratified_split(ds, fraction=fraction, seed=seed)
    return _random_split(ds, fraction, seed)


def _cap(ds: Dataset, n: int, seed: int) -> Dataset:
    if not n or n >= len(ds):
        return ds
    return ds.subset(np.sort(np.random.default_rng(seed).permutation(len(ds))[:n]))


def load_splits(cfg: LLMConfig) -> Splits:
    """Train / test (and validation, with ``val_fraction``) for ``cfg.task``; every draw from
    ``cfg.data_seed`` (``split_seed``, or ``seed`` when unset).

    tweets and tables: a stratified test split; GLUE: the dev set is the test set (the papers' practice);
    commonsense: a random test split of the one JSONL file.
    """
    path = str(Path(cfg.data_path).expanduser()) if cfg.data_path else None
    seed = cfg.data_seed
    if cfg.task == "tweets":
        train, test = load_tweets(test_fraction=cfg.test_fraction, seed=seed)
    elif cfg.task == "table":
        full = load_table(path, text_column=cfg.text_column, label_column=cfg.label_column,
                          text_b_column=cfg.text_b_column or None, label_map=cfg.label_map)
        train, test = stratified_split(full, fraction=cfg.test_fraction, seed=seed)
    elif cfg.task.startswith("glue-"):
        train, test = load_glue(cfg.task[len("glue-"):], data_dir=path)
    else:
        train, test = _random_split(load_commonsense(cfg.commonsense_task, path), cfg.test_fraction, seed)
    val = None
    if cfg.val_fraction > 0:
        train, val = _holdout(train, cfg.val_fraction, seed + 1)
    train = _cap(train, cfg.train_subset, seed + 2)
    test = _cap(test, cfg.test_subset, seed + 3)
    if val is not None:
        val = _cap(val, cfg.test_subset, seed + 4)
    return Splits(train=train, test=test, val=val)
