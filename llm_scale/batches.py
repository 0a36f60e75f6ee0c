"""Token ids for every row once, seeded batch plans, and padded batches.

Two shapes of task:

- **classification** (an encoder or any model with a sequence-classification head): one sequence per
  row (``text`` or the pair ``text, text_b``), the label an index; loss = cross-entropy of the head.
- **scored choices** (a causal LM): a context and its candidate continuations per row; a choice's
  score is ``Σ log p(choice tokens | context)``. A text-classification set becomes one with the label
  words as choices (``"<text>\\nAnswer:"`` + ``" negative"`` …), a commonsense set is one already.
  Training maximises the gold choice's log-likelihood.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["Encoded", "encode_classification", "encode_choices", "batch_plan", "collate_classification",
           "collate_choices", "PROMPT_SUFFIX"]

PROMPT_SUFFIX = "\nAnswer:"


@dataclass(frozen=True)
class Encoded:
    """Token ids per row: ``ids[i]`` for classification; ``ids[i]`` the context and ``choices[i][j]``
    the continuation ids for scored choices."""

    ids: list[list[int]]
    labels: np.ndarray  # (N,) int64: class index, or gold choice index
    choices: Optional[list[list[list[int]]]] = None
    type_ids: Optional[list[list[int]]] = None  # BERT's segment ids for sentence pairs

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> np.ndarray:
        if self.choices is None:
            return np.array([len(x) for x in self.ids])
        return np.array([len(x) + max(len(c) for c in cs) for x, cs in zip(self.ids, self.choices)])


def encode_classification(tokenizer, texts: Sequence[str], texts_b: Optional[Sequence[str]], labels,
                          *, max_length: int) -> Encoded:
    enc = tokenizer(list(texts), list(texts_b) if texts_b is not None else None, truncation=True,
                    max_length=max_length, padding=False)
    type_ids = enc.get("token_type_ids")
    return Encoded(ids=enc["input_ids"], labels=np.asarray(labels, dtype=np.int64),
                   type_ids=type_ids if texts_b is not None else None)


def encode_choices(tokenizer, contexts: Sequence[str], choices: Sequence[Sequence[str]], labels,
                   *, max_length: int) -> Encoded:
    """Context ids (left-truncated so context + the longest choice fit ``max_length``) and the ids of
    each ``" " + choice`` continuation."""
    bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
    ctx_ids, ch_ids = [], []
    for ctx, chs in zip(contexts, choices):
        conts = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in chs]
        room = max(1, max_length - max(len(c) for c in conts) - len(bos))
        ids = tokenizer(ctx, add_special_tokens=False)["input_ids"][-room:]
        ctx_ids.append(bos + ids)
        ch_ids.append(conts)
    return Encoded(ids=ctx_ids, labels=np.asarray(labels, dtype=np.int64), choices=ch_ids)


def batch_plan(rows: np.ndarray, *, steps: int, batch_size: int, seed: int, lengths: Optional[np.ndarray] = None,
               group: int = 8, stream: Optional[np.ndarray] = None) -> list[np.ndarray]:
    """``steps`` batches of row indices from a stream of seeded permutations of ``rows`` (fresh ones
    drawn from ``seed``), or from ``stream`` when given (its first ``steps × batch`` rows: a client's
    persistent stream, ``fedlora.streams``).

    With ``lengths`` (length grouping), each window of ``group`` batches is sorted by length before it
    is cut, and the window's batches are shuffled: similar lengths share a batch (less padding) while
    every row is still visited once per pass, in a seeded order.
    """
    rng = np.random.default_rng(seed)
    b = min(batch_size, len(rows))
    need = steps * b
    if stream is None:
        stream = np.concatenate([rng.permutation(rows) for _ in range(-(-need // len(rows)))])
    elif len(stream) < need:
        raise ValueError(f"a stream of {len(stream)} rows cannot fill {steps} batches of {b}")
    stream = stream[:need]
    batches = [stream[i * b:(i + 1) * b] for i in range(steps)]
    if lengths is None:
        return batches
    out = []
    for w in range(0, steps, group):
        window = np.concatenate(batches[w:w + group])
        window = window[np.argsort(lengths[window], kind="stable")]
        chunk = [window[i * b:(i + 1) * b] for i in range(len(window) // b)]
        out += [chunk[i] for i in rng.permutation(len(chunk))]
    return out


def _pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.as_tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask  # (b, T), (b, T)


def collate_classification(enc: Encoded, rows: np.ndarray, *, pad_id: int) -> dict[str, Tensor]:
    ids, mask = _pad([enc.ids[i] for i in rows], pad_id)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.as_tensor(enc.labels[rows])}
    if enc.type_ids is not None:
        batch["token_type_ids"] = _pad([enc.type_ids[i] for i in rows], 0)[0]
    return batch


def collate_choices(enc: Encoded, rows: np.ndarray, *, pad_id: int, gold_only: bool) -> dict[str, Tensor]:
    """One sequence per (row, choice) — or per row with its gold choice when ``gold_only`` — with
    ``target`` = the token to predict at each position (``-100`` outside the choice).

    Sequences are padded on the left, with ``position_ids`` counting real tokens only, so every
    choice ends at the last position: the scored tokens all sit in the last ``keep`` positions, and
    the model need only produce logits there (``logits_to_keep``; the LM head over a 49k vocabulary
    at every position was most of the cost). ``targets`` hold just those ``keep`` positions.
    """
    seqs, targets, owner = [], [], []
    for i in rows:
        picks = [int(enc.labels[i])] if gold_only else range(len(enc.choices[i]))
        for j in picks:
            ctx, ch = enc.ids[i], enc.choices[i][j]
            seqs.append(ctx + ch)
            targets.append(ch)  # predicted by the len(ch) positions before the last token, and the last
            owner.append((int(i), j))
    T = max(len(s) for s in seqs)
    keep = max(len(t) for t in targets) + 1
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    tgt = torch.full((len(seqs), keep), -100, dtype=torch.long)
    for k, (seq, t) in enumerate(zip(seqs, targets)):
        ids[k, T - len(seq):] = torch.as_tensor(seq, dtype=torch.long)
        mask[k, T - len(seq):] = 1
        # position T-1-len(t)+q predicts choice token q; the last position predicts nothing
        tgt[k, keep - 1 - len(t):keep - 1] = torch.as_tensor(t, dtype=torch.long)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "targets": tgt,
            "owner": torch.as_tensor(owner), "keep": keep}


def choice_logprob(logits: Tensor, targets: Tensor) -> Tensor:
    """``Σ_t log p(target_t)`` per sequence over the positions whose target is not ``-100``: (S,)."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (S, T, V)
    keep = targets != -100
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (S, T)
    return (picked * keep).sum(-1)
