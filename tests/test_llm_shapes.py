"""Issue 22: the GPU configs at their real layer shapes on the CPU (slow tier; README "LLM scale").

RoBERTa-Large at full size and Llama-2-7B's layer shapes (blocks cut to 2) with random weights, one
round of 2 clients × 1 step of every rule: no shape error, FedEx-LoRA / FLoRA merges equal to the dense
formula, the export loading in plain peft, peak memory against the config header. ≈4 and ≈10 minutes."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedlora import rule_names  # noqa: E402
from llm_scale.config import load_config  # noqa: E402
from llm_scale.shapecheck import ARCH, shape_check  # noqa: E402


def _published_size(report):
    return report["memory"]["parameters_full_model"]


def _check(report, rules):
    assert report["ok"], {k: v.get("error", v) for k, v in report["rules"].items() if not v["ok"]}
    assert sorted(report["rules"]) == sorted(rules)
    for rule in ("fedex", "flora"):
        assert report["rules"][rule]["merge_max_abs_error"] <= 1e-5
    for rule, r in report["rules"].items():
        if not rule.startswith("full"):
            assert r["export_max_abs_logit_error"] <= 1e-3


@pytest.mark.slow
def test_roberta_large_mnli_at_full_size(tmp_path):
    cfg = load_config("roberta-large-mnli")
    report = shape_check(cfg, workdir=tmp_path, progress=False)
    _check(report, rule_names())
    assert report["blocks_built"] == 24 and report["target_shapes"] == {"query": [1024, 1024], "value": [1024, 1024]}
    m = report["memory"]
    assert m["parameters_built"] == m["parameters_full_model"]
    assert abs(_published_size(report) - 355.36e6) / 355.36e6 < 1e-3  # RoBERTa-Large with a 3-way head
    assert m["peak_gb_lora_rules"] < 3 * m["header_estimate_gb_full_model"]  # weights + Python, torch, activations


@pytest.mark.slow
def test_llama2_7b_commonsense_at_its_layer_shapes(tmp_path):
    cfg = load_config("llama2-7b-commonsense")
    report = shape_check(cfg, workdir=tmp_path, progress=False)
    _check(report, [r for r in rule_names() if r != "head-only"])  # head-only needs a classification head
    assert report["adapted_blocks"] == [1] and report["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert report["target_shapes"] == {t: [4096, 4096] for t in report["targets"]}
    assert ARCH["llama"][1]["num_key_value_heads"] == ARCH["llama"][1]["num_attention_heads"]  # 7B: no GQA
    assert _published_size(report) == 6_738_415_616  # Llama-2-7B, once the cut blocks are added back
    m = report["memory"]
    # the header's 27 GB (fp32 weights) holds for the LoRA rules once the cut blocks are added back
    assert m["extrapolated_peak_gb_full_model_lora_rules"] < 1.25 * m["header_estimate_gb_full_model"]
