"""The frozen-layer cache: when LoRA sits only in blocks ``L0…`` of an encoder, blocks ``0…L0−1`` and
the embeddings compute the same hidden states for a row in every round, so they run once per row.

Like the MNIST toy's frozen-feature cache, one level up. Exactness: the cached rows are computed in
eval mode (no dropout in the frozen blocks; the adapted blocks above keep theirs), and a row's hidden
states at its real tokens do not depend on how far its batch is padded, so a cached forward equals
the full forward at every real position (tested to float tolerance).

Mechanics: the base model's ``embeddings`` module is swapped for a lookup that returns the cached
batch, and its block list for the blocks ``L0…``; the whole model's forward (masks, pooler, head)
runs unchanged. ``active()`` switches this on only for the duration of a forward.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["FrozenLayerCache", "CausalLayerCache", "cache_eligible"]


def cache_eligible(*, kind: str, layers: Sequence[int], family: str) -> bool:
    """LoRA only from block ``min(layers) > 0`` on, in an encoder (BERT, RoBERTa) classifier or a
    Llama-architecture causal LM scoring choices."""
    if not layers or min(layers) == 0:
        return False
    return (kind == "classification" and family in ("bert", "roberta")) or (kind == "causal" and family == "llama")


class _Lookup(nn.Module):
    """Stands in for the embeddings: returns the hidden states ``set`` for the current batch."""

    def __init__(self):
        super().__init__()
        self.current: Tensor | None = None

    def forward(self, *args, **kwargs) -> Tensor:
        return self.current


class _LayerCache:
    """What both caches share: the digest of the frozen weights the cached states depend on, and
    handing the cached states to another copy of the model whose frozen part is the same."""

    L0: int
    dtype: torch.dtype

    def _frozen_modules(self) -> list[nn.Module]:  # the embeddings and the blocks below L0
        raise NotImplementedError

    def fingerprint(self) -> str:
        """A digest of every weight the cached rows depend on: the embeddings and blocks ``< L0``."""
        import hashlib

        h = hashlib.sha256()
        for mod in self._frozen_modules():
            for name, p in mod.state_dict().items():
                h.update(name.encode())
                h.update(p.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def for_model(self, base_model: nn.Module):
        """The same cached rows serving another copy of the model, when its frozen part is the same
        (a pretrained model under another seed: only the head and the adapters differ); ``None``
        when it is not (a random model of another seed), and the caller builds its own."""
        other = type(self)(base_model, first_adapted=self.L0, dtype=self.dtype)
        if not hasattr(self, "_digest"):
            self._digest = self.fingerprint()
        if other.fingerprint() != self._digest:
            return None
        other.rows, other._digest = self.rows, self._digest
        return other


class FrozenLayerCache(_LayerCache):
    def __init__(self, base_model: nn.Module, *, first_adapted: int, dtype: torch.dtype = torch.float32):
        self.encoder_model = getattr(base_model, base_model.base_model_prefix)  # e.g. model.bert
        self.L0 = first_adapted
        self.dtype = dtype
        self.rows: dict[str, list[Tensor]] = {}  # split -> per-row (T_i, H) hidden states entering block L0
        self._lookup = _Lookup()

    @torch.no_grad()
    def build(self, split: str, batches, *, progress: bool = False) -> None:
        """Run the frozen blocks once over ``batches`` (dicts from ``collate_classification`` plus
        ``rows``) in eval mode and keep each row's hidden states at its real tokens."""
        m = self.encoder_model
        was = m.training
        m.eval()
        out: dict[int, Tensor] = {}
        it = batches
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(batches, desc=f"cache {split}", leave=False)
        for b in it:
            kw = {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in b}
            hs = self._run_frozen(kw)  # (b, T, H)
            for i, row in enumerate(b["rows"].tolist()):
                n = int(b["attention_mask"][i].sum())
                out[row] = hs[i, :n].to(self.dtype).clone()
        m.train(was)
        self.rows[split] = [out[i] for i in range(len(out))]

    def _run_frozen(self, kw) -> Tensor:
        layers = self.encoder_model.encoder.layer
        self.encoder_model.encoder.layer = nn.ModuleList(list(layers)[:self.L0])
        try:
            return self.encoder_model(**kw).last_hidden_state
        finally:
            self.encoder_model.encoder.layer = layers

    def _frozen_modules(self) -> list[nn.Module]:
        m = self.encoder_model
        return [m.embeddings, *list(m.encoder.layer)[:self.L0]]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for rows in self.rows.values() for t in rows)

    def batch(self, split: str, rows: np.ndarray, T: int) -> Tensor:
        hs = self.rows[split]
        H = hs[rows[0]].shape[-1]
        out = torch.zeros(len(rows), T, H, dtype=torch.float32)  # (b, T, H); padded positions are masked keys
        for i, r in enumerate(rows):
            h = hs[r]
            out[i, :h.shape[0]] = h
        return out

    @contextmanager
    def active(self, split: str, rows: np.ndarray, T: int, device):
        """Inside, a forward of the model reads blocks ``< L0`` from the cache for these rows."""
        m = self.encoder_model
        emb, layers = m.embeddings, m.encoder.layer
        self._lookup.current = self.batch(split, rows, T).to(device)
        m.embeddings, m.encoder.layer = self._lookup, nn.ModuleList(list(layers)[self.L0:])
        try:
            yield
        finally:
            m.embeddings, m.encoder.layer = emb, layers
            self._lookup.current = None


class CausalLayerCache(_LayerCache):
    """The same, one level over a Llama-architecture causal LM that scores choices: the hidden state
    entering decoder block ``L0`` of every (row, choice) sequence, computed once.

    A causal block's output at a token depends only on the tokens before it, and the sequences are
    padded on the left with ``position_ids`` counting real tokens (``batches.collate_choices``), so a
    sequence's states at its real tokens do not depend on its batch: the cached forward feeds them as
    ``inputs_embeds`` to the blocks ``L0…`` (masks and rotary positions are computed as usual) and
    equals the full forward at every real position (tested). Keyed by ``(row, choice)``: training
    uses the gold choice, scoring uses every choice.
    """

    def __init__(self, base_model: nn.Module, *, first_adapted: int, dtype: torch.dtype = torch.float32):
        self.decoder = base_model.model  # LlamaModel: embed_tokens, layers, norm, rotary_emb
        self.L0 = first_adapted
        self.dtype = dtype
        self.rows: dict[str, dict[tuple[int, int], Tensor]] = {}

    @torch.no_grad()
    def build(self, split: str, batches, *, progress: bool = False) -> None:
        """``batches``: dicts from ``collate_choices`` (``input_ids``, ``attention_mask``,
        ``position_ids``, ``owner``); run in eval mode through blocks ``< L0``."""
        d = self.decoder
        was = d.training
        d.eval()
        out = self.rows.setdefault(split, {})
        it = batches
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(batches, desc=f"cache {split}", leave=False)
        layers, norm = d.layers, d.norm
        d.layers, d.norm = nn.ModuleList(list(layers)[:self.L0]), nn.Identity()
        try:
            for b in it:
                hs = d(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                       use_cache=False).last_hidden_state  # (S, T, H), before the final norm
                for i, (row, j) in enumerate(b["owner"].tolist()):
                    n = int(b["attention_mask"][i].sum())
                    out[(row, j)] = hs[i, hs.shape[1] - n:].to(self.dtype).clone()
        finally:
            d.layers, d.norm = layers, norm
            d.train(was)

    def _frozen_modules(self) -> list[nn.Module]:
        return [self.decoder.embed_tokens, *list(self.decoder.layers)[:self.L0]]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for rows in self.rows.values() for t in rows.values())

    def has(self, split: str, owner: Tensor) -> bool:
        rows = self.rows.get(split, {})
        return all((int(r), int(j)) in rows for r, j in owner.tolist())

    def batch(self, split: str, owner: Tensor, T: int) -> Tensor:
        """Left-padded ``(S, T, H)`` states for the sequences ``owner`` (``(S, 2)``: row, choice)."""
        hs = self.rows[split]
        seqs = [hs[(int(r), int(j))] for r, j in owner.tolist()]
        out = torch.zeros(len(seqs), T, seqs[0].shape[-1], dtype=torch.float32)
        for i, h in enumerate(seqs):
            out[i, T - h.shape[0]:] = h
        return out

    @contextmanager
    def active(self, split: str, owner: Tensor, T: int, device):
        """Inside, the model runs blocks ``L0…`` only; feed it the yielded ``inputs_embeds``."""
        d = self.decoder
        layers = d.layers
        d.layers = nn.ModuleList(list(layers)[self.L0:])
        try:
            yield self.batch(split, owner, T).to(device)
        finally:
            d.layers = layers
