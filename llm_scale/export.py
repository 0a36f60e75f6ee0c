"""Export the final global model so that ``PeftModel.from_pretrained(base, folder)`` reproduces it.

A global's effective weight is ``W0 + base + s B A`` (``GlobalMatrix``). peft can load only an adapter,
so the frozen-weight correction is folded into it, exactly:
``base + s B A = [s B, U_b] [A; V_b]`` (``base = U_b V_b``; a dense base is factored by its SVD first).
Each module gets its own rank (peft's ``rank_pattern``) and scale 1 (``alpha_pattern`` = the rank).
Full-weight rules have no adapter: the model itself is saved (``save_pretrained``) with the averaged
weights in place.

The folder is self-describing: ``config.json`` (the base model's config) holds the classes
(``id2label``, ``label2id``, ``num_labels``), ``adapter_config.json`` the ``task_type`` (``SEQ_CLS`` or
``CAUSAL_LM``) and a ``base_model_name_or_path`` that is never a machine path: the Hugging Face id of
a built-in model that is a hub model (``minilm``), else the project's model name (``smollm2``,
``tiny-roberta``: build it with ``llm_scale.models.load_model``) or the local model folder relative to
the current directory, the repository or ``~``, as the run named it. ``export_run`` exports a finished
run from its checkpoint (``python -m llm_scale export``). Everything is safetensors + JSON.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import Tensor

from fedlora import DenseBase, GlobalMatrix

__all__ = ["export_global", "exact_factors", "export_run", "HUB_NAMES"]

# built-in models that are a Hugging Face hub model, byte for byte (the package ships its snapshot)
HUB_NAMES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2"}
SEQ_CLS_HEADS = ("classifier", "score")  # what peft's SEQ_CLS task type saves by itself (modules_to_save)


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
    _label_config(base.config, fed.splits.train)
    base.name_or_path = base.config._name_or_path = HUB_NAMES.get(fed.spec.source, fed.spec.source)  # peft copies it
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
                   rank_pattern={n: q for n, q in ranks.items()}, alpha_pattern={n: q for n, q in ranks.items()},
                   base_model_name_or_path=None,  # get_peft_model sets the portable name (base.name_or_path)
                   task_type="CAUSAL_LM" if cfg.kind == "causal" else "SEQ_CLS",  # SEQ_CLS saves classifier/score
                   modules_to_save=[m for m in fed.lora_config.modules_to_save or () if m not in SEQ_CLS_HEADS] or None)
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
    model.save_pretrained(folder, save_embedding_layers=False)  # frozen: the base has them; no hub lookup
    base.config.save_pretrained(folder)  # the labels, beside the adapter
    fed.tokenizer.save_pretrained(folder)
    return folder


def _label_config(config, train) -> None:
    """The classes into the model config: ``id2label`` in index order (``num_labels`` follows)."""
    names = getattr(train, "label_names", None)
    if names:
        config.id2label = {i: name for i, name in enumerate(names)}
        config.label2id = {name: i for i, name in enumerate(names)}


def _checkpoint_dir(source: Path) -> Path:
    """The checkpoint folder of ``source``: the folder itself, or the one a run record JSON names."""
    from fedlora.config import ConfigError

    from .data import relative_source

    source = Path(source).expanduser()
    if source.is_dir():
        if not (source / "checkpoint.json").is_file():
            raise ConfigError(f"{relative_source(source)} holds no checkpoint.json; pass the run's --checkpoint-dir "
                              f"or its run JSON")
        return source
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such checkpoint directory or run JSON")
    if source.name == "checkpoint.json":
        return source.parent
    named = json.loads(source.read_text()).get("checkpoint_dir")
    if not named:
        raise ConfigError(f"{source.name} records no checkpoint (the run had no --checkpoint-dir); re-run its "
                          f"command with --export DIR, or with --checkpoint-dir DIR and then export DIR")
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        folder = (base / Path(named).expanduser()).resolve()
        if (folder / "checkpoint.json").is_file():
            return folder
    raise ConfigError(f"{source.name} names checkpoint directory {named!r}, which is not here; pass that "
                      f"directory itself")


def export_run(source: Path, out: Path, *, data_path: Optional[Path] = None,
               progress: bool = False) -> tuple[Path, dict]:
    """Export a finished run's final global from its checkpoint to ``out``; ``(folder, summary)``.

    The run's config comes from the checkpoint; its fingerprint (data content hash, model, every
    setting) must match what is rebuilt here, so the adapter is the run's. ``data_path``: where the
    data file is now, if it moved."""
    import dataclasses

    from fedlora.checkpoint import fingerprint_diff, load_checkpoint
    from fedlora.config import ConfigError

    from .config import load_config
    from .engine import Federation
    from .run import run_fingerprint

    folder = _checkpoint_dir(source)
    state, info = load_checkpoint(folder, restore_rng=False)
    if "llm_config" not in info:
        raise ConfigError(f"the checkpoint in {folder.name} was not written by llm_scale; export it with its own tier")
    done, rounds = info["round_done"] + 1, info["config"]["rounds"]
    if done < rounds:
        raise ConfigError(f"the run in {folder.name} stopped after round {done} of {rounds}: finish it first (its "
                          f"command with --checkpoint-dir {folder.name} --resume), then export")
    cfg = load_config(None, **{**info["llm_config"], **({"data_path": str(data_path)} if data_path else {})})
    fed = Federation(dataclasses.replace(cfg, cache_frozen_layers=False), progress=progress)
    moved = ("config.data_path",)  # the file may move; its content (data.sha256) may not change
    diff = [d for d in fingerprint_diff(info.get("fingerprint") or {}, run_fingerprint(cfg, fed))
            if not d.startswith(moved)]
    if diff:
        raise ConfigError(f"the checkpoint in {folder.name} does not match what is here ({'; '.join(diff)}); "
                          f"export on the data and model the run used (--data PATH if the file moved)")
    export_global(fed, state, Path(out))
    names = getattr(fed.splits.train, "label_names", ())
    return Path(out), {"method": cfg.method, "model": fed.spec.source, "task": cfg.task, "rounds_done": done,
                       "labels": {"names": list(names)}}


def _model_seed(cfg) -> int:
    from fedlora.seeding import derive_seed

    return derive_seed(cfg.seed, "model")
