"""Sample-level differential privacy for a client's local training (DP-SGD, Abadi et al. 2016).

One client, one local step: each of its ``n`` samples joins the batch independently with probability
``q = batch / n`` (Poisson sampling, the sampling the accountant below is exact for); every sample's
gradient ``g_i`` over the parameters trained this round is clipped to norm ``C``; the step uses

    g = ( Σ_i g_i · min(1, C / (‖g_i‖ + 1e-6)) + N(0, σ² C² I) ) / (q n)

(Opacus's clipping and scaling, so the two implementations agree to float tolerance). ``σ`` is the
smallest noise multiplier whose privacy loss over the client's whole participation -- ``steps`` =
local steps × rounds it takes part in -- is at most the target ``(ε, δ)`` under the Rényi-DP accountant
(Mironov 2017; Mironov, Talwar, Zhang 2019), as Opacus computes it. ε = ∞ means no DP. The guarantee is
per client, about its own samples; the server and the other clients see only the noised factors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np

__all__ = ["DPPlan", "plan", "epsilon_spent", "noise_multiplier", "poisson_batches", "clip_factors",
           "CLIP_EPS"]

CLIP_EPS = 1e-6  # the stabiliser in min(1, C / (‖g‖ + ε)), as in Opacus


@dataclass(frozen=True)
class DPPlan:
    """One client's DP-SGD setting for a whole run."""

    epsilon: float  # the target (math.inf: no DP)
    delta: float
    max_grad_norm: float  # C (math.inf: no clipping)
    noise_multiplier: float  # σ: the noise std is σ·C on the summed clipped gradient
    sample_rate: float  # q = batch / n
    steps: int  # the client's local steps over the whole run

    @property
    def active(self) -> bool:
        return math.isfinite(self.epsilon) or self.noise_multiplier > 0 or math.isfinite(self.max_grad_norm)

    @property
    def noise_std(self) -> float:
        """Std of the noise on the *summed* clipped gradient; the step divides by ``q n`` after."""
        return self.noise_multiplier * self.max_grad_norm if self.noise_multiplier else 0.0

    def spent(self, steps: Optional[int] = None, delta: Optional[float] = None) -> float:
        """ε actually spent after ``steps`` local steps (default: the planned ones)."""
        return epsilon_spent(self.noise_multiplier, self.sample_rate, self.steps if steps is None else steps,
                             self.delta if delta is None else delta)


def _check(epsilon: float, delta: float, max_grad_norm: float, sample_rate: float, steps: int) -> None:
    if not (epsilon > 0):
        raise ValueError(f"dp_epsilon={epsilon}; must be > 0 (None or inf for no DP; 1, 3, 8 are usual targets)")
    if not (0 < delta < 1):
        raise ValueError(f"dp_delta={delta}; must be in (0, 1), well below 1/samples (1e-5 is usual)")
    if not (max_grad_norm > 0):
        raise ValueError(f"dp_max_grad_norm={max_grad_norm}; must be > 0 (the per-sample clipping norm C)")
    if not (0 < sample_rate <= 1):
        raise ValueError(f"sample rate {sample_rate} = batch / samples must be in (0, 1]: a client needs at "
                         "least as many samples as the batch size under DP")
    if steps < 1:
        raise ValueError(f"steps={steps}; a client must take at least one step")


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float, *,
                  orders: Optional[tuple] = None) -> float:
    """ε after ``steps`` Poisson-subsampled Gaussian steps: Opacus's RDP accountant (its default
    orders unless ``orders`` is given; fewer orders can only give a larger ε); ∞ without noise."""
    if noise_multiplier <= 0:
        return math.inf
    if steps == 0:
        return 0.0
    import warnings

    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    orders = list(orders or RDPAccountant.DEFAULT_ALPHAS)
    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=steps, orders=orders)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": the bound is valid, only looser
        warnings.simplefilter("ignore")
        return float(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


def _integer_orders() -> tuple:
    """The integer orders among Opacus's defaults: exact closed forms, ≈4× faster than the fractional
    ones, and (a subset) an upper bound on the full accountant's ε -- so a σ found with them is safe."""
    from opacus.accountants import RDPAccountant

    return tuple(a for a in RDPAccountant.DEFAULT_ALPHAS if float(a).is_integer())


def _round_up(q: float, digits: int = 3) -> float:
    """``q`` rounded *up* to ``digits`` significant figures: calibrating σ for a larger sample rate
    only lowers the ε spent, and lets clients of similar size share one search."""
    e = math.floor(math.log10(q)) - digits + 1
    return min(1.0, math.ceil(q / 10 ** e - 1e-9) * 10 ** e)


def _bisect(epsilon: float, delta: float, q: float, steps: int, tol: float, lo: float, hi: float, orders) -> float:
    """The smallest σ in [lo, hi] (to ``tol`` in ε) with ε(σ) ≤ target, given ε(lo) > target ≥ ε(hi)."""
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        eps = epsilon_spent(mid, q, steps, delta, orders=orders)
        if eps > epsilon:
            lo = mid
        else:
            hi = mid
            if epsilon - eps < tol:
                break
    return hi


@lru_cache(maxsize=4096)
def _sigma(epsilon: float, delta: float, q: float, steps: int, tol: float) -> float:
    """Two stages: bisect on the integer orders (fast; their ε bounds the full accountant's from above,
    so the σ found is enough), then refine downwards on all of Opacus's orders."""
    fast = _integer_orders()
    lo, hi = 0.0, 1.0
    while epsilon_spent(hi, q, steps, delta, orders=fast) > epsilon:  # grow until the target is met
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            raise ValueError(f"no noise multiplier below 1e4 reaches ε={epsilon} at q={q}, {steps} steps")
    hi = _bisect(epsilon, delta, q, steps, tol, lo, hi, fast)
    lo = 0.8 * hi
    while lo > 1e-3 and epsilon_spent(lo, q, steps, delta) <= epsilon:  # all orders: σ may go lower
        hi, lo = lo, 0.8 * lo
    return _bisect(epsilon, delta, q, steps, tol, lo, hi, None)


def noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int, *, tol: float = 0.01) -> float:
    """A σ with ε_RDP(σ, q, steps, δ) ≤ ``epsilon`` and within ``tol`` of it (Opacus's tolerance) on
    the integer orders, calibrated for ``q`` rounded up to 3 significant figures: both only make σ
    larger, so the ε spent (all orders, the true q) stays ≤ the target."""
    if math.isinf(epsilon):
        return 0.0
    return _sigma(float(epsilon), float(delta), _round_up(sample_rate), int(steps), tol)


def plan(*, epsilon: Optional[float], delta: float, max_grad_norm: Optional[float], batch_size: int,
         samples: int, steps: int) -> DPPlan:
    """The DP setting of a client with ``samples`` samples taking ``steps`` local steps in all.

    ``epsilon=None`` (or inf) with ``max_grad_norm=None``: no DP (σ = 0, no clipping) -- the plain run.
    ``epsilon=None`` with a clipping norm: clipping only (σ = 0), e.g. to separate clipping from noise.
    """
    eps = math.inf if epsilon is None else float(epsilon)
    clip = math.inf if max_grad_norm is None else float(max_grad_norm)
    q = batch_size / samples if samples else math.inf
    if math.isfinite(eps):
        _check(eps, delta, clip, q, steps)
        if math.isinf(clip):
            raise ValueError("DP needs a finite dp_max_grad_norm: noise is calibrated to the clipping norm")
    sigma = noise_multiplier(eps, float(delta), float(q), int(steps)) if math.isfinite(eps) else 0.0
    return DPPlan(epsilon=eps, delta=float(delta), max_grad_norm=clip, noise_multiplier=sigma, sample_rate=min(q, 1.0),
                  steps=int(steps))


def poisson_batches(n: int, sample_rate: float, steps: int, seed: int) -> list[np.ndarray]:
    """``steps`` batches of indices into ``n`` samples, each sample in each batch with probability
    ``sample_rate`` independently (so batch sizes vary; an empty batch is a noise-only step)."""
    rng = np.random.default_rng(seed)
    return [np.flatnonzero(rng.random(n) < sample_rate) for _ in range(steps)]


def clip_factors(norms, max_grad_norm: float):
    """``min(1, C / (‖g_i‖ + 1e-6))`` per sample (tensor or array in, same type out); 1 when C = ∞."""
    if math.isinf(max_grad_norm):
        return norms * 0 + 1
    return (max_grad_norm / (norms + CLIP_EPS)).clip(max=1.0)
