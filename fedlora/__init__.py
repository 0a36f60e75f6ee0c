"""fedlora: federated fine-tuning with LoRA — server rules, round loop, accounting, checkpoints."""
from .factors import ClientUpdate, DenseBase, GlobalMatrix, LoRAFactors, LowRank, init_lora, stack_clients
from .aggregators import RULES, Aggregated, RoundContext, Rule, aggregate, get_rule, rule_names
from .validation import NonFiniteUpdateError, UpdateError

__version__ = "0.1.0"
