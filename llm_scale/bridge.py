"""A peft-wrapped model ↔ the round loop's state ``{name: GlobalMatrix | Tensor}``, both ways.

The loop's state names every LoRA-targeted module by its path in the base model
(``bert.encoder.layer.3.attention.self.query``) and every dense head parameter by its parameter name
(``classifier.weight``). peft stores ``lora_A`` as ``r × in`` and ``lora_B`` as ``out × r`` for
``nn.Linear`` and for GPT-2's ``Conv1D`` alike, and adds ``scaling · B A`` (``fan_in_fan_out``
transposes it for ``Conv1D``), so the factors map one to one onto ``LoRAFactors``. The frozen weight
does not: ``nn.Linear.weight`` is ``out × in`` (SPEC's ``W0``) while ``Conv1D.weight`` is ``in × out``,
so every frozen-weight write here goes through ``_to_module``/``_from_module``, which transpose for
``fan_in_fan_out`` layers. That is the one place the published FedEx-LoRA code gets wrong.

One base model serves every client: a client's adapter tensors are copied in (``load``) and read
back (``read``); per-client ranks (FlexLoRA, FLoRA) use one extra peft adapter per distinct rank,
created on first use. The frozen-weight corrections (``GlobalMatrix.base``: FedEx-LoRA's residuals,
FLoRA's merged stacks) are written into the base weights as ``W0 + base`` once per round, from a
pristine copy of ``W0`` so that nothing accumulates float error across rounds.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fedlora import GlobalMatrix, LoRAFactors

__all__ = ["AdapterBridge", "BridgeError", "lora_scale"]

DEFAULT = "default"


class BridgeError(ValueError):
    """A state that does not fit the model (unknown name, wrong shape); the message names the fix."""


def lora_scale(alpha: float, rank: int, *, rslora: bool = False) -> float:
    """``s = α / r`` (Hu et al., 2021), or rsLoRA's ``α / √r`` (Kalajdzievski, 2023)."""
    return alpha / rank ** 0.5 if rslora else alpha / rank


def _lora_layers(peft_model) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    return {name: mod for name, mod in base.named_modules() if isinstance(mod, LoraLayer)}


def _head_wrappers(peft_model) -> dict[str, nn.Module]:
    from peft.utils.other import ModulesToSaveWrapper

    base = peft_model.get_base_model()
    return {name: mod for name, mod in base.named_modules() if isinstance(mod, ModulesToSaveWrapper)}


class AdapterBridge:
    """Moves LoRA factors, dense weights and head parameters between the loop's state and a peft model.

    ``head_mode``: ``"federated"`` (head parameters are dense entries of the state, trained and
    averaged), ``"local"`` (trained, kept by each client: ``ClientTask.local``), ``"frozen"`` (never
    trained). ``targets`` of the state are every peft ``LoraLayer`` of the model.
    """

    def __init__(self, peft_model, *, lora_config, head_mode: str = "federated"):
        if head_mode not in ("federated", "local", "frozen"):
            raise BridgeError(f"head_mode={head_mode!r}; use 'federated', 'local' or 'frozen'")
        self.model = peft_model
        self.config = lora_config  # the peft LoraConfig of the "default" adapter; others copy it at their rank
        self.head_mode = head_mode
        self.layers = _lora_layers(peft_model)
        if not self.layers:
            raise BridgeError("the peft model has no LoRA layers; check target_modules / layers_to_transform")
        self.fan_in_fan_out = bool(lora_config.fan_in_fan_out)
        self.rank_adapters = {int(lora_config.r): DEFAULT}
        self.active = DEFAULT
        self._w0: dict[str, Tensor] = {}  # pristine frozen weights (out × in), kept once a base is merged
        self._merged: dict[str, object] = {}  # name -> the base object whose W0 + base is in the model now
        self._heads = _head_wrappers(peft_model)
        self.initial_head = {k: v.detach().clone() for k, v in self.head_params().items()}

    # ---- names and shapes -------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.layers)

    def shape(self, name: str) -> tuple[int, int]:
        """``(m, n) = (out, in)`` of a targeted matrix."""
        w = self.layers[name].get_base_layer().weight
        return (w.shape[1], w.shape[0]) if self.fan_in_fan_out else tuple(w.shape)

    def _to_module(self, W: Tensor) -> Tensor:
        return W.T if self.fan_in_fan_out else W  # (out, in) -> the module's layout

    def _from_module(self, w: Tensor) -> Tensor:
        return w.T if self.fan_in_fan_out else w  # the module's layout -> (out, in)

    def frozen_weight(self, name: str) -> Tensor:
        """The module's current frozen weight as ``out × in``."""
        return self._from_module(self.layers[name].get_base_layer().weight.detach())

    def pristine_weight(self, name: str) -> Tensor:
        """``W0`` (out × in) as loaded, before any base was merged."""
        return self._w0[name] if name in self._w0 else self.frozen_weight(name)

    # ---- head --------------------------------------------------------------------------------
    def head_params(self) -> dict[str, nn.Parameter]:
        """The active adapter's copy of every ``modules_to_save`` parameter, by base-model parameter name."""
        out = {}
        for wname, wrapper in self._heads.items():
            mod = wrapper.modules_to_save[self.active]
            for pname, p in mod.named_parameters():
                out[f"{wname}.{pname}"] = p
        return out

    def _set_head(self, values: Mapping[str, Tensor], trainable: bool) -> None:
        params = self.head_params()
        for name, p in params.items():
            with torch.no_grad():
                p.copy_(values[name])
            p.requires_grad_(trainable)

    # ---- adapters per rank ---------------------------------------------------------------------
    def _adapter_for(self, rank: int) -> str:
        if rank not in self.rank_adapters:
            name = f"r{rank}"
            cfg = replace(self.config, r=rank, lora_alpha=rank)  # the scale is set per load anyway
            with torch.random.fork_rng(devices=[]):  # its (overwritten) init must not move the global stream
                self.model.add_adapter(name, cfg)
            self.layers = _lora_layers(self.model)
            self.rank_adapters[rank] = name
        return self.rank_adapters[rank]

    def _activate(self, adapter: str) -> None:
        if adapter != self.active or self.model.active_adapter != adapter:
            self.model.base_model.set_adapter(adapter)
            self.active = adapter

    # ---- frozen weights ------------------------------------------------------------------------
    def merge_bases(self, state: Mapping[str, Union[GlobalMatrix, Tensor]]) -> int:
        """Write ``W0 + base`` into every targeted module whose ``base`` changed; returns how many.

        Called once per round (the loop's ``on_round_start``) and before evaluation; a client whose
        view carries the same base object costs nothing.
        """
        n = 0
        for name in self.names:
            g = state.get(name)
            base = g.base if isinstance(g, GlobalMatrix) else None
            if base is self._merged.get(name) or (base is None and name not in self._merged):
                continue
            if name not in self._w0:
                self._w0[name] = self.frozen_weight(name).clone()
            W = self._w0[name] if base is None else self._w0[name] + base.dense().to(self._w0[name].dtype)
            self._write_frozen(name, W)
            if base is None:
                self._merged.pop(name, None)
            else:
                self._merged[name] = base
            n += 1
        return n

    def _write_frozen(self, name: str, W: Tensor) -> None:
        w = self.layers[name].get_base_layer().weight
        with torch.no_grad():
            w.copy_(self._to_module(W))

    # ---- state in / out --------------------------------------------------------------------------
    def load(self, state: Mapping[str, Union[GlobalMatrix, Tensor]], *, trains: str,
             local: Optional[Mapping[str, Tensor]] = None) -> list[nn.Parameter]:
        """Put ``state`` into the model and return the parameters to train this round.

        ``trains``: ``"A"``, ``"B"``, ``"AB"`` (the other factor frozen) or ``"W"`` (the targeted dense
        weights; the adapter contributes nothing). Every targeted module must be in ``state``; the
        adapter of the state's rank becomes active and its scaling is set to the state's ``s``.
        """
        missing = [n for n in self.names if n not in state]
        if missing:
            raise BridgeError(f"the state has no entry for {len(missing)} targeted modules (first: {missing[0]!r}); "
                              "build it with the same target_modules and layers")
        self.merge_bases(state)
        ranks = {state[n].lora.rank for n in self.names if state[n].lora is not None}
        if len(ranks) > 1:
            raise BridgeError(f"targeted modules have different ranks {sorted(ranks)} in one state; "
                              "use one rank per client")
        adapter = self._adapter_for(ranks.pop()) if ranks else DEFAULT
        self._activate(adapter)
        trainable: list[nn.Parameter] = []
        for name in self.names:
            g, layer = state[name], self.layers[name]
            A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight  # (r, in), (out, r)
            with torch.no_grad():
                if g.W is not None:  # a full-weight rule: W is the whole weight, the adapter is off (B = 0)
                    if name not in self._w0:  # keep W0 before the first overwrite
                        self._w0[name] = self.frozen_weight(name).clone()
                    self._write_frozen(name, g.W)
                    self._merged[name] = ("W", g.W)
                    B.zero_()
                elif g.lora is not None:
                    if tuple(g.lora.A.shape) != tuple(A.shape) or tuple(g.lora.B.shape) != tuple(B.shape):
                        raise BridgeError(f"{name}: state factors A {tuple(g.lora.A.shape)}, B {tuple(g.lora.B.shape)} "
                                          f"do not fit the module's A {tuple(A.shape)}, B {tuple(B.shape)}")
                    A.copy_(g.lora.A)
                    B.copy_(g.lora.B)
                    layer.scaling[adapter] = float(g.lora.scale)
                else:  # no adapter (FLoRA's merged global): contribute nothing
                    B.zero_()
            A.requires_grad_("A" in trains and g.W is None)
            B.requires_grad_("B" in trains and g.W is None)
            base_w = layer.get_base_layer().weight
            base_w.requires_grad_(trains == "W")
            trainable += [p for p in ((base_w,) if trains == "W" else (A, B)) if p.requires_grad]
        if self.head_mode == "federated":
            head = {k: state[k] for k in self.head_params() if k in state}
            if len(head) != len(self.head_params()):
                raise BridgeError("head_mode='federated' but the state lacks the head parameters; "
                                  "build the state with AdapterBridge.init_head()")
            self._set_head(head, trainable=True)
        elif self.head_mode == "local":
            self._set_head(local if local else self.initial_head, trainable=True)
        else:
            self._set_head(self.initial_head, trainable=False)
        trainable += [p for p in self.head_params().values() if p.requires_grad]
        return trainable

    def read(self, trains: str, state: Mapping[str, Union[GlobalMatrix, Tensor]]) -> dict[str, Union[LoRAFactors, Tensor]]:
        """What the client trained, as the loop's params: ``LoRAFactors`` (or the dense W) per module,
        plus the head tensors when the head is federated."""
        out: dict = {}
        adapter = self.active
        for name in self.names:
            layer = self.layers[name]
            if trains == "W":
                out[name] = self.frozen_weight(name).clone()
            else:
                out[name] = LoRAFactors(A=layer.lora_A[adapter].weight.detach().clone(),
                                        B=layer.lora_B[adapter].weight.detach().clone(),
                                        scale=float(layer.scaling[adapter]))
        if self.head_mode == "federated":
            out.update({k: p.detach().clone() for k, p in self.head_params().items()})
        return out

    def local_head(self) -> dict[str, Tensor]:
        return {k: p.detach().clone() for k, p in self.head_params().items()} if self.head_mode == "local" else {}

    def init_head(self) -> dict[str, Tensor]:
        """The head's dense state entries (``head_mode='federated'``), from the model's seeded init."""
        return {k: v.clone() for k, v in self.initial_head.items()} if self.head_mode == "federated" else {}

    def restore_frozen(self, names: Optional[Sequence[str]] = None) -> None:
        """Put the pristine ``W0`` back (after a full-weight client or before exporting)."""
        for name in names or self.names:
            if name in self._w0:
                self._write_frozen(name, self._w0[name])
            self._merged.pop(name, None)

    def keep_pristine(self) -> None:
        """Copy every targeted ``W0`` now (full-weight rules overwrite the module weights)."""
        for name in self.names:
            if name not in self._w0:
                self._w0[name] = self.frozen_weight(name).clone()
