"""The toy experiment's config: one frozen dataclass; TOML files and CLI flags override it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fedlora.config import ConfigError
from fedlora import rule_names

__all__ = ["ToyConfig", "PARTITIONS", "METHODS", "CENTRALISED"]

CENTRALISED = "centralised"  # one client holding all training data: the ceiling
PARTITIONS = ("labels", "dirichlet", "iid")
# full-galore needs galore-torch's projector; on a 64×784 weight it is not a meaningful setting here.
# full-galore needs the LLM tier's optimizer; head-only needs a trained head (the toy's W_out is fixed)
METHODS = tuple(r for r in rule_names() if r not in ("full-galore", "head-only")) + (CENTRALISED,)


@dataclass(frozen=True)
class ToyConfig:
    """``f(x) = W_out ReLU((W0 + s B A) x + c)``: the RoLoRA paper's toy (W0 = 0, c = 0) in SPEC notation.

    Only the adapted ``hidden`` matrix (h × 784) learns; ``W_out`` (10 × h) is fixed.
    """

    method: str = "fedavg"  # a fedlora rule, or "centralised"
    partition: str = "labels"  # "labels" (each client holds labels_per_client whole classes), "dirichlet", "iid"
    clients: int = 10
    labels_per_client: int = 1  # 10 clients × 1 label and 5 clients × 2 labels are the two label-skew settings
    dirichlet_alpha: float = 0.5
    rank: int = 16
    lora_alpha: Optional[float] = None  # s = lora_alpha / rank; None means s = 1 (the paper's toy has no scale)
    hidden: int = 64  # h: the probe in SPEC used 64
    base: str = "zero"  # "zero": the paper's toy (W0 = 0); "pretrained": W0, W_out trained centrally first
    pretrain_size: int = 2000  # samples held out of the clients to pretrain W0 and W_out (base="pretrained")
    pretrain_epochs: int = 5
    bias: str = "none"  # "none" (paper) or "frozen": a fixed random hidden bias c lifts the rank-1 two-class cap
    rounds: int = 100
    local_steps: int = 20  # used when local_epochs == 0
    local_epochs: int = 0  # > 0: every client makes this many passes over its shard per round
    batch_size: int = 64
    optimizer: str = "sgd"  # "sgd" (plain, as in the paper) or "adam"; state is reset every round
    lr: float = 0.05
    seed: int = 0
    val_size: int = 5000  # held out of the training set; the lr grid is tuned on it, never on the test set
    train_subset: int = 0  # > 0: use only this many training samples (tests)
    test_subset: int = 0  # > 0: evaluate on only this many test samples (tests)
    eval_every: int = 1
    engine: str = "batched"  # "batched" (all clients at once), "sequential" (same math, one client at a time),
    #                          "reference" (autograd + torch.optim, one client at a time: the slow, plain check)
    feature_cache: bool = True  # compute x A (A frozen) and x W_frozen once per local run, not per step
    threads: int = 1  # torch threads; 1 is fastest for these small ops on a shared 2-core machine
    dtype: str = "float32"
    # Sample-level DP-SGD per client (fedlora.dp): None = no DP; inf = the DP code path with no noise
    dp_epsilon: Optional[float] = None
    dp_delta: float = 1e-5
    dp_max_grad_norm: Optional[float] = 1.0  # C; None = no clipping (only with dp_epsilon = inf)
    dp_sampling: str = "poisson"  # "poisson" (what the accountant assumes) or "shuffle" (the non-DP batches)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r}; choose one of {', '.join(METHODS)}")
        if self.partition not in PARTITIONS:
            raise ConfigError(f"partition={self.partition!r}; choose one of {', '.join(PARTITIONS)}")
        if self.partition == "labels" and (self.clients * self.labels_per_client) % 10:
            raise ConfigError(f"{self.clients} clients × {self.labels_per_client} labels must be a multiple of "
                              "the 10 classes (e.g. 10 × 1 or 5 × 2)")
        if self.rank < 1 or self.hidden < 1 or self.clients < 1 or self.rounds < 1 or self.batch_size < 1:
            raise ConfigError("rank, hidden, clients, rounds and batch_size must be >= 1")
        if self.local_epochs < 0 or (self.local_epochs == 0 and self.local_steps < 1):
            raise ConfigError("set local_steps >= 1, or local_epochs >= 1 (which overrides local_steps)")
        for name, val, ok in (("base", self.base, ("zero", "pretrained")), ("bias", self.bias, ("none", "frozen")),
                              ("optimizer", self.optimizer, ("sgd", "adam")),
                              ("engine", self.engine, ("batched", "sequential", "reference")),
                              ("dtype", self.dtype, ("float32", "float64"))):
            if val not in ok:
                raise ConfigError(f"{name}={val!r}; choose one of {', '.join(ok)}")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr}; must be > 0")
        if self.threads < 1:
            raise ConfigError(f"threads={self.threads}; must be >= 1")
        if self.dp_epsilon is not None:
            self._check_dp()

    @property
    def dp(self) -> bool:
        return self.dp_epsilon is not None

    def _check_dp(self) -> None:
        import math

        if not self.dp_epsilon > 0:
            raise ConfigError(f"dp_epsilon={self.dp_epsilon}; must be > 0 (e.g. 1, 3, 8), inf for the DP path "
                              "without noise, or unset for no DP")
        if self.dp_max_grad_norm is None and math.isfinite(self.dp_epsilon):
            raise ConfigError("dp_epsilon is finite but dp_max_grad_norm is unset: the noise is calibrated to the "
                              "clipping norm; set dp_max_grad_norm (e.g. 1.0)")
        if self.dp_max_grad_norm is not None and not self.dp_max_grad_norm > 0:
            raise ConfigError(f"dp_max_grad_norm={self.dp_max_grad_norm}; must be > 0")
        if self.dp_sampling not in ("poisson", "shuffle"):
            raise ConfigError(f"dp_sampling={self.dp_sampling!r}; choose poisson or shuffle")
        if self.local_epochs:
            raise ConfigError("DP counts local steps: set local_steps (and local_epochs=0) with dp_epsilon")

    @property
    def scale(self) -> float:
        return 1.0 if self.lora_alpha is None else self.lora_alpha / self.rank

    @property
    def local_work(self) -> str:
        """A label for the amount of local work, used to group results: '20 steps', '5 epochs'."""
        if self.local_epochs:
            return f"{self.local_epochs} epoch" + ("s" if self.local_epochs > 1 else "")
        return f"{self.local_steps} steps"

    @property
    def setting(self) -> str:
        if self.method == CENTRALISED:
            return "centralised"
        if self.partition == "labels":
            return f"{self.clients}x{self.labels_per_client} labels"
        if self.partition == "dirichlet":
            return f"{self.clients} clients Dir({self.dirichlet_alpha:g})"
        return f"{self.clients} clients iid"
