"""How much of the data ``max_length`` cuts, measured once at load on the tokenised rows.

A row is *cut* when its whole input does not fit ``max_length`` tokens: the text (and its pair) with the
tokenizer's special tokens for classification; BOS + context + prompt + the longest label word / choice
for the causal path (``batches.encode_choices`` then drops the context's start). Above ``WARN_SHARE``
of all rows cut, the run prints one warning line with the share and the length that keeps 95% whole.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .batches import PROMPT_SUFFIX
from .commonsense import MultipleChoice

__all__ = ["WARN_SHARE", "KEEP_WHOLE", "full_lengths", "truncation_summary", "truncation_warning"]

WARN_SHARE = 0.05  # warn when more than this share of the rows is cut
KEEP_WHOLE = 0.95  # ... and name the max_length that keeps this share whole


def _classification_lengths(tokenizer, ds) -> list[int]:
    texts_b = list(ds.texts_b) if ds.texts_b is not None else None
    enc = tokenizer(list(ds.texts), texts_b, truncation=False, padding=False, verbose=False)
    return [len(ids) for ids in enc["input_ids"]]


def _choice_lengths(tokenizer, contexts: list[str], choices: list) -> list[int]:
    bos = 1 if getattr(tokenizer, "bos_token_id", None) is not None else 0
    ctx = tokenizer(contexts, add_special_tokens=False, verbose=False)["input_ids"]
    words = sorted({c for cs in choices for c in cs})
    word_len = dict(zip(words, (len(ids) for ids in tokenizer([" " + w for w in words],
                                                               add_special_tokens=False)["input_ids"])))
    return [bos + len(c) + max(word_len[w] for w in cs) for c, cs in zip(ctx, choices)]


def full_lengths(tokenizer, ds, *, kind: str) -> np.ndarray:
    """Each row's untruncated input length in tokens, as the engine would encode it."""
    if isinstance(ds, MultipleChoice):
        return np.array(_choice_lengths(tokenizer, list(ds.contexts), [list(cs) for cs in ds.choices]))
    if kind == "causal":
        texts = ds.texts if ds.texts_b is None else [f"{a}\n{b}" for a, b in zip(ds.texts, ds.texts_b)]
        return np.array(_choice_lengths(tokenizer, [t + PROMPT_SUFFIX for t in texts], [ds.label_names] * len(ds)))
    return np.array(_classification_lengths(tokenizer, ds))


def truncation_summary(tokenizer, splits, *, kind: str, max_length: int) -> dict:
    """JSON-able: rows, rows cut, their share, the longest row and the length keeping 95% of rows whole,
    over train, test and validation together."""
    parts = [s for s in (splits.train, splits.test, splits.val) if s is not None]
    lengths = np.concatenate([full_lengths(tokenizer, ds, kind=kind) for ds in parts])
    n = int(lengths.size)
    cut = int((lengths > max_length).sum())
    keep = int(np.sort(lengths)[max(0, math.ceil(KEEP_WHOLE * n) - 1)]) if n else 0
    return {"max_length": max_length, "rows": n, "rows_cut": cut, "share_cut": cut / n if n else 0.0,
            "longest": int(lengths.max()) if n else 0, "length_keeping_95pct": keep}


def truncation_warning(summary: dict) -> Optional[str]:
    """One line when more than ``WARN_SHARE`` of the rows are cut, else ``None``."""
    if summary["share_cut"] <= WARN_SHARE:
        return None
    return (f"warning: max_length={summary['max_length']} cuts {summary['share_cut']:.0%} of the rows "
            f"({summary['rows_cut']} of {summary['rows']}, the longest {summary['longest']} tokens); "
            f"--max-length {summary['length_keeping_95pct']} would keep 95% of them whole")
