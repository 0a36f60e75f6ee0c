"""Checkpoints as safetensors (tensors) + JSON (everything else), written atomically.

Client updates and checkpoints are untrusted data: no pickle anywhere. A checkpoint is committed
when ``checkpoint.json`` is renamed into place; it names the tensor file it belongs to.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import random

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from torch import Tensor

from .factors import DenseBase, GlobalMatrix, LoRAFactors, LowRank

__all__ = ["save_checkpoint", "load_checkpoint", "state_to_tensors", "state_from_tensors", "atomic_write_json",
           "fingerprint_diff", "file_sha256"]

_SEP = "::"
_RNG = "__rng__::"  # tensor-name prefix of the global generator states
_LOCAL = "__client__::"  # tensor-name prefix of the clients' local state (``__client__::<id>::<name>``)


def atomic_write_json(path: Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    """The content hash of a data file: a resumed run must read the same bytes, whatever the file is called."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: list(obj) if isinstance(obj, tuple) else obj}


def fingerprint_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``["lr: 0.001 -> 0.01", ...]``: every (dotted) key whose value differs between two run fingerprints
    (JSON-able dicts of everything that shapes a run: its config, the data's content hash, the model)."""
    a, b = _flatten(json.loads(json.dumps(old))), _flatten(json.loads(json.dumps(new)))
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "(absent)") != b.get(k, "(absent)")]


def state_to_tensors(state: Mapping[str, GlobalMatrix | Tensor]) -> tuple[dict, dict]:
    """Flatten a model state into ``{name::part: tensor}`` plus JSON metadata (scales, parts).
    A plain tensor in the state is a dense parameter (``name::dense``)."""
    tensors, meta = {}, {}
    for name, g in state.items():
        if _SEP in name:
            raise ValueError(f"matrix name {name!r} contains {_SEP!r}; rename it")
        if isinstance(g, Tensor):
            tensors[f"{name}{_SEP}dense"] = g.contiguous()
            meta[name] = {"dense": True}
            continue
        m: dict[str, Any] = {}
        if g.lora is not None:
            tensors[f"{name}{_SEP}lora.A"] = g.lora.A.contiguous()
            tensors[f"{name}{_SEP}lora.B"] = g.lora.B.contiguous()
            m["scale"] = g.lora.scale
        if isinstance(g.base, DenseBase):
            tensors[f"{name}{_SEP}base.M"] = g.base.M.contiguous()
        elif g.base is not None:
            tensors[f"{name}{_SEP}base.U"] = g.base.U.contiguous()
            tensors[f"{name}{_SEP}base.V"] = g.base.V.contiguous()
        if g.W is not None:
            tensors[f"{name}{_SEP}W"] = g.W.contiguous()
        meta[name] = m
    return tensors, meta


def state_from_tensors(tensors: Mapping, meta: Mapping) -> dict[str, GlobalMatrix | Tensor]:
    out = {}
    for name, m in meta.items():
        t = lambda part: tensors.get(f"{name}{_SEP}{part}")  # noqa: E731
        if m.get("dense"):
            out[name] = t("dense")
            continue
        lora = LoRAFactors(A=t("lora.A"), B=t("lora.B"), scale=m["scale"]) if t("lora.A") is not None else None
        base = LowRank(U=t("base.U"), V=t("base.V")) if t("base.U") is not None else None
        base = DenseBase(M=t("base.M")) if t("base.M") is not None else base
        out[name] = GlobalMatrix(lora=lora, base=base, W=t("W"))
    return out


def global_rng_state() -> tuple[dict, dict]:
    """The process-global generators (torch, numpy, random) as tensors + JSON.

    fedlora's own draws derive from the seed (``fedlora.seeding``); these cover a tier that also
    draws from a global generator (e.g. dropout inside a model), so a resumed run matches anyway.
    """
    np_state = np.random.get_state()
    tensors = {f"{_RNG}torch": torch.get_rng_state(), f"{_RNG}numpy": torch.from_numpy(np_state[1].astype(np.int64))}
    meta = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}
    return tensors, meta


def set_global_rng_state(tensors: Mapping, meta: Mapping) -> None:
    if f"{_RNG}torch" not in tensors:
        return
    torch.set_rng_state(tensors[f"{_RNG}torch"])
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors[f"{_RNG}numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(directory: Path, *, state: Mapping[str, GlobalMatrix | Tensor], round_done: int,
                    info: Mapping[str, Any], client_state: Optional[Mapping[Any, Mapping[str, Tensor]]] = None) -> Path:
    """Write the state after round ``round_done`` (0-based), the global RNG states, ``info``
    (history, config, seeds) and the clients' local state (``client_state``: id -> {name: tensor},
    e.g. a head each client keeps to itself)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, meta = state_to_tensors(state)
    for c, local in (client_state or {}).items():
        for name, t in local.items():
            tensors[f"{_LOCAL}{c}{_SEP}{name}"] = t.contiguous()
    rng_tensors, rng_meta = global_rng_state()
    tensors.update(rng_tensors)
    fname = f"state_round{round_done:06d}.safetensors"
    tmp = directory / (fname + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, directory / fname)
    atomic_write_json(directory / "checkpoint.json",
                      {"round_done": round_done, "tensors": fname, "matrices": meta, "global_rng": rng_meta, **info})
    for old in directory.glob("state_round*.safetensors"):  # the JSON rename above committed the new one
        if old.name != fname:
            old.unlink(missing_ok=True)
    return directory / "checkpoint.json"


def load_checkpoint(directory: Path, *, restore_rng: bool = True) -> Optional[tuple[dict[str, GlobalMatrix], dict]]:
    """Return ``(state, info)`` from the last committed checkpoint, or ``None`` if there is none;
    with ``restore_rng`` the process-global generators are set back to where they were. The clients'
    local state, if any was saved, is ``info["client_state"]`` ({client id (int): {name: tensor}})."""
    path = Path(directory) / "checkpoint.json"
    if not path.exists():
        return None
    with open(path) as f:
        info = json.load(f)
    tensors = load_file(str(Path(directory) / info["tensors"]))
    if restore_rng and "global_rng" in info:
        set_global_rng_state(tensors, info["global_rng"])
    tensors = {k: v for k, v in tensors.items() if not k.startswith(_RNG)}
    local: dict = {}
    for key in [k for k in tensors if k.startswith(_LOCAL)]:
        c, _, name = key[len(_LOCAL):].partition(_SEP)
        local.setdefault(int(c), {})[name] = tensors.pop(key)
    if local:
        info["client_state"] = local
    return state_from_tensors(tensors, info["matrices"]), info
