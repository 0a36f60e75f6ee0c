"""The shipped experiment configs (``llm_scale/configs/*.toml``): each parses, names real LoRA targets and
layers of its model family, carries a header that says what it costs, and the RoBERTa-Large ones follow
the SPEC's RoLoRA setting with a sample budget whose stated arithmetic is right.

Models are built at tiny size with the published module names (``tiny-roberta`` for RoBERTa-Large,
``tiny-llama`` for Llama-2-7B and SmolLM2) and as many blocks as the config needs, so a wrong module
name or layer index fails here, in seconds, instead of on the GPU.
"""
import re

import peft
import pytest
from peft.tuners.lora import LoraLayer

from fedlora.config import ConfigError
from llm_scale.config import CONFIG_DIR, config_names, load_config
from llm_scale.models import get_layers, load_model

SHIPPED = {"cpu-minilm-tweets", "cpu-smollm-tweets", "llama2-7b-commonsense", "roberta-large-sst2",
           "roberta-large-qnli", "roberta-large-mnli", "roberta-large-qqp", "roberta-large-rte"}

# model field -> (the source built here, the real model's number of blocks)
FAMILY = {"minilm": ("minilm", 6), "smollm2": ("tiny-llama", 30), "roberta-large": ("tiny-roberta", 24),
          "llama-2-7b": ("tiny-llama", 32)}

# SPEC, "LLM scale": RoBERTa-Large adapts only the top layers, per task (0-based, of 24)
SPEC_LAYERS = {"glue-sst2": range(18, 24), "glue-qnli": range(15, 24), "glue-mnli": range(15, 24),
               "glue-qqp": range(15, 24), "glue-rte": range(16, 24)}
GLUE_TRAIN_ROWS = {"glue-sst2": 67_349, "glue-qnli": 104_743, "glue-mnli": 392_702, "glue-qqp": 363_846,
                   "glue-rte": 2_490}
ROBERTA = sorted(n for n in config_names() if n.startswith("roberta-large-"))
BUDGET_LINE = re.compile(r"(\d+) rounds × +(\d+) clients × (\d+) steps × batch (\d+) = ([\d,]+) samples")


def _family(model: str) -> tuple[str, int]:
    key = model.rstrip("/").rsplit("/", 1)[-1]
    assert key in FAMILY, f"model {model!r}: add its tiny stand-in and depth to FAMILY in this test"
    return FAMILY[key]


def _header(name: str) -> str:
    lines = (CONFIG_DIR / f"{name}.toml").read_text(encoding="utf-8").splitlines()
    head = []
    for line in lines:
        if not line.startswith("#"):
            break
        head.append(line.lstrip("# "))
    return "\n".join(head)


def test_the_shipped_configs_are_all_there():
    assert SHIPPED <= set(config_names())


@pytest.mark.parametrize("name", config_names())
def test_config_header_says_what_it_costs_and_cites(name):
    load_config(name)  # parses; an unknown key would raise ConfigError
    head = _header(name).lower()
    assert "hardware" in head or "takes" in head, f"{name}.toml: the header needs a time estimate"
    assert "arxiv:2409.02346" in head, f"{name}.toml: the header should cite the RoLoRA paper"


@pytest.mark.parametrize("name", config_names())
def test_config_targets_and_layers_exist_in_its_model(name):
    cfg = load_config(name)
    source, depth = _family(cfg.model)
    assert all(0 <= i < depth for i in cfg.layers), f"{name}: layers {cfg.layers} outside 0..{depth - 1}"
    tiny = {"num_hidden_layers": max(cfg.layers) + 1} if cfg.layers and source.startswith("tiny-") else None
    num_labels = 3 if cfg.kind == "classification" else None  # the head's width does not matter here
    model, _, spec = load_model(source, kind=cfg.kind, num_labels=num_labels, seed=0, tiny=tiny)
    targets = list(cfg.targets or spec.default_targets)
    adapted = len(cfg.layers) if cfg.layers else len(get_layers(model, spec))
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha,
                                                         target_modules=targets,
                                                         layers_to_transform=list(cfg.layers) or None))
    lora = [n for n, m in wrapped.named_modules() if isinstance(m, LoraLayer)]
    assert len(lora) == len(targets) * adapted, f"{name}: {len(lora)} LoRA layers: {lora}"


@pytest.mark.parametrize("name", ROBERTA)
def test_roberta_configs_follow_the_rolora_setting(name):
    cfg = load_config(name)
    assert cfg.layers == tuple(SPEC_LAYERS[cfg.task])
    assert cfg.targets == ("query", "value") and cfg.rank == 2 and cfg.clients == 3
    assert cfg.batch_size == (64 if cfg.task == "glue-sst2" else 32)
    assert (cfg.local_steps, cfg.optimizer, cfg.partition, cfg.max_length) == (20, "sgd", "shards", 128)
    assert 5e-4 <= cfg.lr <= 1e-1 and cfg.rounds > 0 and cfg.dtype == "bfloat16" and cfg.data_path


@pytest.mark.parametrize("name", ROBERTA)
def test_roberta_budget_arithmetic_in_the_header_is_right(name):
    """rounds × clients × local_steps × batch is the same at 3, 20 and 50 clients, the file's own values
    are the 3-client line, and the shards can hold total_samples."""
    cfg = load_config(name)
    lines = [tuple(int(x.replace(",", "")) for x in m) for m in BUDGET_LINE.findall(_header(name))]
    assert sorted(k for _, k, _, _, _ in lines) == [3, 20, 50], f"{name}: budget lines {lines}"
    for rounds, clients, steps, batch, stated in lines:
        assert rounds * clients * steps * batch == stated
    assert len({stated for *_, stated in lines}) == 1
    assert (cfg.rounds, cfg.clients, cfg.local_steps, cfg.batch_size) in {line[:4] for line in lines}
    budget = lines[0][4]
    assert 0 < cfg.total_samples <= GLUE_TRAIN_ROWS[cfg.task] and budget % cfg.total_samples == 0


def test_unknown_config_name_lists_the_shipped_ones():
    with pytest.raises(ConfigError) as e:
        load_config("no-such")
    assert all(n in str(e.value) for n in SHIPPED)


def test_unknown_key_in_a_toml_is_named(tmp_path):
    path = tmp_path / "typo.toml"
    path.write_text('model = "minilm"\nrnak = 4\n')
    with pytest.raises(ConfigError, match="rnak"):
        load_config(path)
