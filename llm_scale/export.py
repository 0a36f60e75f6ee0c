"""Export the final global model so that ``PeftModel.from_pretrained(base, folder)`` reproduces it.

A global's effective weight is ``W0 + base + s B A`` (``GlobalMatrix``). peft can load only an adapter,
so the frozen-weight correction is folded into it, exactly:
``base + s B A = [s B, U_b] [A; V_b]`` (``base = U_b V_b``; a dense base is factored by its SVD first).
Each module gets its own rank (peft's ``rank_pattern``) and scale 1 (``alpha_pattern`` = the rank).
Full-weight rules have no adapter: the model itself is saved (``save_pretrained``) with the averaged
weights in place.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from fedlora import DenseBase, GlobalMatrix

__all__ = ["export_global", "exact_factors"]


def exact_factors(g: GlobalMatrix) -> tuple[Tensor, Tensor]:
    """``(B, A)`` with ``B A = base + s B A`` of ``g`` (scale 1), float32."""
    Bs, As = [], []
    if g.lora is not None:
        Bs.append(g.lora.B.float() * g.lora.scale)
        As.append(g.lora.A.float())
    if isinstance(g.base, DenseBase):
        U, S, Vt = torch.linalg.svd(g.base.M.double(), full_matrices=False)
        keep = S > S[0] * max(g.base.M.shape) * torch.finfo(torch.float32).eps if S.numel() and S[0] > 0 else S > 0
        Bs.append((U[:, keep] * S[keep]).float())
        As.append(Vt[keep].float())
    elif g.base is not None:
        Bs.append(g.base.U.float())
        As.append(g.base.V.float())
    m, n = g.shape
    if not Bs or sum(b.shape[1] for b in Bs) == 0:
        return torch.zeros(m, 1), torch.zeros(1, n)
    return torch.cat(Bs, dim=1), torch.cat(As, dim=0)  # (m, q), (q, n)


def export_global(fed, state: Mapping, folder: Path) -> Path:
    """Write the global of ``fed`` (an ``engine.Federation``) under ``folder``; returns the folder."""
    from peft import get_peft_model

    from .models import load_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg, bridge = fed.cfg, fed.bridge
    num_labels = None if cfg.kind == "causal" else len(fed.splits.train.label_names)
    base, _, _ = load_model(cfg.model, kind=cfg.kind, num_labels=num_labels, seed=_model_seed(cfg),
                            tiny=getattr(fed, "tiny", None))
    head = {k: v for k, v in state.items() if isinstance(v, Tensor)} or bridge.initial_head
    if fed.rule.startswith("full"):
        params = dict(base.named_parameters())
        with torch.no_grad():
            for name in bridge.names:
                w = params[f"{name}.weight"]
                w.copy_(bridge._to_module(state[name].W).to(w.dtype))
            for name, t in head.items():
                params[name].copy_(t)
        base.save_pretrained(folder)
        fed.tokenizer.save_pretrained(folder)
        return folder
    factors = {name: exact_factors(state[name]) for name in bridge.names}
    ranks = {name: B.shape[1] for name, (B, A) in factors.items()}
    r = max(ranks.values())
    pcfg = replace(fed.lora_config, r=r, lora_alpha=r, use_rslora=False, lora_dropout=0.0,
                   rank_pattern={n: q for n, q in ranks.items()}, alpha_pattern={n: q for n, q in ranks.items()})
    model = get_peft_model(base, pcfg)
    layers = {n: mod for n, mod in model.get_base_model().named_modules() if n in factors}
    with torch.no_grad():
        for name, (B, A) in factors.items():
            layer = layers[name]
            layer.lora_A["default"].weight.copy_(A)
            layer.lora_B["default"].weight.copy_(B)
            assert abs(layer.scaling["default"] - 1.0) < 1e-12, (name, layer.scaling["default"])
        if head:
            from peft.utils.other import ModulesToSaveWrapper

            for wname, wrapper in model.get_base_model().named_modules():
                if isinstance(wrapper, ModulesToSaveWrapper):
                    for pname, p in wrapper.modules_to_save["default"].named_parameters():
                        p.copy_(head[f"{wname}.{pname}"])
    model.save_pretrained(folder)
    fed.tokenizer.save_pretrained(folder)
    return folder


def _model_seed(cfg) -> int:
    from fedlora.seeding import derive_seed

    return derive_seed(cfg.seed, "model")
