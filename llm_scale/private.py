"""DP-SGD for one client's local run on the peft model, through Opacus (``fedlora.dp`` has the math).

``dp_sgd`` attaches Opacus's per-sample-gradient hooks (``GradSampleModule``) to the modules that hold
the parameters trained this round -- the LoRA factors the rule trains (both, or RoLoRA's / FFA's one),
the dense weights for ``full``, the head when it is trained -- and wraps the client's optimiser in a
``DPOptimizer``; each ``step()`` then uses

    g = ( Σ_{i ∈ batch} g_i · min(1, C / (‖g_i‖ + 1e-6)) + N(0, σ² C² I) ) / batch_size

with ``g_i`` sample ``i``'s gradient over all the trained parameters together (one norm per sample)
and ``batch_size`` the *expected* batch ``q n`` (Poisson batches vary in size). Hooks go on the
modules whose own parameters require grad when the run starts, so a frozen factor or head gets
neither gradient nor noise. On leaving, the hooks and every attribute Opacus put on parameters and
modules are removed: the next client (or round) may train another factor, and evaluation runs bare.

Opacus's ``loss_reduction="mean"`` multiplies the backpropagated output gradients by the batch size:
the loss must be the *mean over samples* of per-sample losses for ``g_i`` to be sample ``i``'s own
gradient (``Federation.loss(per_sample=True)``).
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Iterator, Sequence

import torch
from torch import nn

from fedlora.dp import DPPlan

__all__ = ["dp_sgd", "noise_only_step", "DPSetupError"]

# The hooks fire when no input of a hooked module requires grad (a LoRA factor above frozen layers): that
# is the case here, and the per-sample gradient of the module's own weight is what is wanted.
_HOOK_WARNING = "Full backward hook is firing when gradients are computed with respect to module outputs"
_OPACUS_ATTRS = ("grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample", "summed_grad")
_MODULE_ATTRS = ("activations", "max_batch_len")


class DPSetupError(ValueError):
    """Opacus cannot compute per-sample gradients for what this run trains; the message names the fix."""


def _clip_norm(plan: DPPlan) -> float:
    """C for Opacus. No clipping (C = ∞) with σ = 0: the largest float32, so ``C / (‖g‖ + 1e-6)``
    still clamps to exactly 1 while the noise std ``σ · C`` stays 0 (Opacus would compute 0 · ∞ = nan)."""
    if math.isfinite(plan.max_grad_norm):
        return plan.max_grad_norm
    if plan.noise_multiplier:
        raise DPSetupError("DP noise needs a finite dp_max_grad_norm: the noise std is σ·C")
    return float(torch.finfo(torch.float32).max)


@contextlib.contextmanager
def dp_sgd(model: nn.Module, optimizer: torch.optim.Optimizer, plan: DPPlan, *, batch_size: int,
           seed: int) -> Iterator[torch.optim.Optimizer]:
    """Inside, ``model`` records per-sample gradients and the yielded optimiser takes DP-SGD steps
    (noise from a ``torch.Generator`` seeded with ``seed``); everything Opacus attached is gone after."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_HOOK_WARNING)
        try:
            gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
        except NotImplementedError as err:  # a trained module with buffers: its gradients are not per-sample
            _clean(model)
            raise DPSetupError(f"Opacus cannot give per-sample gradients for a module trained here ({err}); "
                               "train only LoRA factors, nn.Linear weights or the head under DP, or unset "
                               "dp_epsilon") from err
        try:
            device = next((p.device for g in optimizer.param_groups for p in g["params"]), torch.device("cpu"))
            noise = torch.Generator(device=device).manual_seed(seed)
            yield DPOptimizer(optimizer, noise_multiplier=plan.noise_multiplier, max_grad_norm=_clip_norm(plan),
                              expected_batch_size=batch_size, loss_reduction="mean", generator=noise)
        finally:
            gsm._close()  # removes the hooks and the per-parameter attributes
            _clean(model)


def noise_only_step(optimizer: torch.optim.Optimizer, params: Sequence[nn.Parameter]) -> None:
    """An empty Poisson batch: no sample, so no gradient, but the step still happens (the accountant
    counts it) and adds its noise: ``g = N(0, σ² C² I) / batch_size``."""
    for p in params:
        if p.requires_grad:
            p.grad_sample = p.new_zeros((0, *p.shape))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _clean(model: nn.Module) -> None:
    for p in model.parameters():
        for a in _OPACUS_ATTRS:
            if hasattr(p, a):
                delattr(p, a)
    for m in model.modules():
        for a in _MODULE_ATTRS:
            if a in m.__dict__:
                delattr(m, a)
    if hasattr(model, "autograd_grad_sample_hooks"):
        delattr(model, "autograd_grad_sample_hooks")
