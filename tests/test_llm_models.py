"""llm_scale.models: every source builds offline, with the published module names, deterministically.

The tiny models stand in for RoBERTa-Large / Llama-2-7B / GPT-2 in every fast test, so their shapes are
checked here: LoRA-targeted matrices are non-square wherever the architecture allows it.
"""
import json
import time
from dataclasses import asdict

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from llm_scale import models
from llm_scale.models import ModelError, get_layers, load_model

TINY_VOCAB = 30522  # the MiniLM (BERT uncased) tokenizer the tiny models share


def _load(source, kind="classification", **kw):
    return load_model(source, kind=kind, num_labels=3 if kind == "classification" else None, **kw)


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("source,kind,family,targets,head,layers_attr", [
    ("tiny-roberta", "classification", "roberta", ("query", "value"), ("classifier",), "roberta.encoder.layer"),
    ("tiny-llama", "classification", "llama", ("q_proj", "v_proj"), ("score",), "model.layers"),
    ("tiny-llama", "causal", "llama", ("q_proj", "v_proj"), (), "model.layers"),
    ("tiny-gpt2", "classification", "gpt2", ("c_attn",), ("score",), "transformer.h"),
    ("tiny-gpt2", "causal", "gpt2", ("c_attn",), (), "transformer.h"),
])
def test_tiny_model_spec_and_forward(source, kind, family, targets, head, layers_attr):
    model, tok, spec = _load(source, kind)
    assert spec.source == source and spec.kind == kind and spec.family == family
    assert spec.default_targets == targets and spec.head_modules == head and spec.layers_attr == layers_attr
    assert spec.fan_in_fan_out == (family == "gpt2")
    assert spec.num_parameters == sum(p.numel() for p in model.parameters())
    json.dumps(asdict(spec))  # goes into a result file as is
    assert len(get_layers(model, spec)) == 2 and not model.training
    for name in head:
        assert isinstance(model.get_submodule(name), torch.nn.Module)
    assert len(tok) == TINY_VOCAB == model.config.vocab_size
    assert tok.pad_token_id == model.config.pad_token_id and tok.eos_token_id == model.config.eos_token_id
    batch = tok(["a short text", "a somewhat longer text to pad the first"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == ((2, 3) if kind == "classification" else (*batch["input_ids"].shape, TINY_VOCAB))
    assert torch.isfinite(logits).all()


def test_tiny_llama_kv_projections_are_non_square():
    model, _, spec = _load("tiny-llama", "causal")
    attn, mlp = get_layers(model, spec)[0].self_attn, get_layers(model, spec)[0].mlp
    assert attn.q_proj.weight.shape == (32, 32)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (16, 32)  # 2 kv heads × 8
    assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (48, 32)
    assert mlp.down_proj.weight.shape == (32, 48)


def test_tiny_gpt2_c_attn_is_transposed_conv1d():
    model, _, spec = _load("tiny-gpt2", "causal")
    c_attn = get_layers(model, spec)[0].attn.c_attn
    assert isinstance(c_attn, Conv1D) and spec.fan_in_fan_out
    assert c_attn.weight.shape == (32, 96)  # in × out: q, k, v fused, stored transposed


def test_tiny_roberta_mlp_is_non_square():
    model, _, spec = _load("tiny-roberta")
    layer = get_layers(model, spec)[0]
    assert layer.attention.self.value.weight.shape == (32, 32)  # square by architecture (all heads = hidden)
    assert layer.intermediate.dense.weight.shape == (48, 32) and layer.output.dense.weight.shape == (32, 48)


@pytest.mark.parametrize("source", ["tiny-roberta", "tiny-llama", "tiny-gpt2"])
def test_tiny_weights_follow_the_seed_and_leave_the_global_rng_alone(source):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, _, spec = _load(source, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    b, _, _ = _load(source, seed=7)
    c, _, _ = _load(source, seed=8)
    assert _same_weights(a, b)
    head = spec.head_modules[0]
    ha, hc = a.get_submodule(head).state_dict(), c.get_submodule(head).state_dict()
    assert any(not torch.equal(ha[k], hc[k]) for k in ha)
    la, lc = get_layers(a, spec)[0].state_dict(), get_layers(c, spec)[0].state_dict()
    assert any(not torch.equal(la[k], lc[k]) for k in la)  # the body is drawn from the seed too


def test_tiny_bf16_is_the_fp32_draw_cast():
    a, _, _ = _load("tiny-llama", "causal", seed=3)
    b, _, _ = _load("tiny-llama", "causal", seed=3, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in b.parameters())
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k].to(torch.bfloat16), sb[k]) for k in sa)


def test_tiny_overrides_apply_and_bad_keys_name_the_fix():
    model, _, spec = _load("tiny-llama", "causal", tiny={"num_hidden_layers": 3})
    assert len(get_layers(model, spec)) == 3
    with pytest.raises(ModelError, match="not_a_field.*remove it"):
        _load("tiny-llama", "causal", tiny={"not_a_field": 1})
    with pytest.raises(ModelError, match="vocab_size"):
        _load("tiny-gpt2", "causal", tiny={"vocab_size": 100})


def test_minilm_classification_head_follows_the_seed():
    before = torch.get_rng_state()
    a, tok, spec = _load("minilm", seed=0)
    assert torch.equal(torch.get_rng_state(), before)
    b, _, _ = _load("minilm", seed=0)
    c, _, _ = _load("minilm", seed=1)
    assert spec.family == "bert" and spec.source == "minilm" and spec.head_modules == ("classifier",)
    assert len(get_layers(a, spec)) == 6 and a.config.hidden_size == 384
    assert a.classifier.weight.shape == (3, 384) and tok.padding_side == "right" and tok.pad_token == "[PAD]"
    assert _same_weights(a, b)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    body = lambda m: {k: v for k, v in m.state_dict().items() if not k.startswith("classifier")}  # noqa: E731
    assert all(torch.equal(v, body(c)[k]) for k, v in body(a).items())  # pretrained: only the head is drawn


@pytest.mark.parametrize("source", ["minilm", "tiny-roberta"])
def test_encoders_refuse_causal_with_the_fix(source):
    with pytest.raises(ModelError, match="no causal LM head; use kind='classification'"):
        load_model(source, kind="causal")


@pytest.mark.parametrize("kw,match", [
    (dict(kind="regression"), "kind='regression'; use one of"),
    (dict(kind="classification"), "num_labels >= 2"),
    (dict(kind="classification", num_labels=1), "num_labels >= 2"),
    (dict(kind="causal", num_labels=3), "drop num_labels"),
    (dict(kind="causal", dtype=torch.int8), "dtype=torch.int8; use one of"),
    (dict(kind="causal", tiny={"num_hidden_layers": 1}, source="minilm"), "drop it for 'minilm'"),
])
def test_bad_options_name_the_fix(kw, match):
    source = kw.pop("source", "tiny-llama")
    with pytest.raises(ModelError, match=match):
        load_model(source, **kw)


def test_missing_local_folder_names_the_path_and_the_builtins(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError) as err:
        load_model(str(missing), kind="causal")
    msg = str(err.value)
    assert str(missing) in msg and "does not exist" in msg and "\n" not in msg
    assert all(name in msg for name in models.BUILTIN_SOURCES)
    with pytest.raises(ModelError, match="has no config.json"):
        load_model(str(tmp_path), kind="causal")


def test_local_folder_loads_and_is_recorded_relative(tmp_path, monkeypatch):
    ref, tok, _ = _load("tiny-llama", "causal", seed=5)
    ref.save_pretrained(tmp_path / "my-model")
    tok.save_pretrained(tmp_path / "my-model")
    monkeypatch.chdir(tmp_path)
    model, tok2, spec = load_model(str(tmp_path / "my-model"), kind="causal")
    assert spec.source == "my-model" and spec.family == "llama" and _same_weights(ref, model)
    assert tok2("a text").input_ids == tok("a text").input_ids


def test_get_layers_unwraps_peft_and_rejects_other_models():
    from peft import LoraConfig, get_peft_model

    model, _, spec = _load("tiny-llama")
    blocks = get_layers(model, spec)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=list(spec.default_targets)))
    assert get_layers(wrapped, spec) is blocks
    with pytest.raises(ModelError, match="has no 'model.layers'"):
        get_layers(torch.nn.Linear(2, 2), spec)


def _fake_convert(calls):
    """Stands in for the 30 s GGUF dequantisation: writes a tiny Llama checkpoint the same way."""
    def convert(gguf, out):
        calls.append(gguf.name)
        model, tok, _ = _load("tiny-llama", "causal", seed=11)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return convert


def test_smollm2_cache_is_built_once_atomically_and_reused(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert(calls))
    cache = tmp_path / "cache" / "smollm2"
    a, _, spec = load_model("smollm2", kind="causal", cache_dir=cache)
    b, _, _ = load_model("smollm2", kind="causal", cache_dir=cache)
    assert len(calls) == 1 and calls[0].endswith(".gguf") and spec.source == "smollm2"
    assert _same_weights(a, b) and (cache / models.STAMP).is_file()
    assert [p.name for p in cache.parent.iterdir()] == ["smollm2"]  # no temporary folder left behind


def test_smollm2_failed_conversion_leaves_no_cache(tmp_path, monkeypatch):
    def crash(gguf, out):
        (out / "config.json").write_text("{}")  # half-written
        raise RuntimeError("killed mid-conversion")
    monkeypatch.setattr(models, "_convert_gguf", crash)
    with pytest.raises(RuntimeError, match="killed"):
        load_model("smollm2", kind="causal", cache_dir=tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


def test_smollm2_foreign_cache_is_refused_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert([]))
    load_model("smollm2", kind="causal", cache_dir=tmp_path / "c")
    stamp = json.loads((tmp_path / "c" / models.STAMP).read_text())
    (tmp_path / "c" / models.STAMP).write_text(json.dumps({**stamp, "gguf_bytes": 1}))
    with pytest.raises(ModelError, match="delete the folder and load again"):
        load_model("smollm2", kind="causal", cache_dir=tmp_path / "c")


@pytest.mark.slow  # dequantising the GGUF took 30 s, and its tokenizer 9 s more, on this machine
def test_smollm2_from_gguf_then_from_cache(tmp_path, monkeypatch):
    cache = tmp_path / "smollm2"
    start = time.perf_counter()
    model, tok, spec = load_model("smollm2", kind="causal", cache_dir=cache)
    first = time.perf_counter() - start
    assert spec.family == "llama" and spec.default_targets == ("q_proj", "v_proj")
    assert len(get_layers(model, spec)) == 30 and tok.pad_token == tok.eos_token
    assert get_layers(model, spec)[0].self_attn.k_proj.weight.shape == (192, 576)
    with torch.no_grad():
        logits = model(**tok(["The capital of France is"], return_tensors="pt")).logits
    assert logits.shape[-1] == 49152 and torch.isfinite(logits).all()

    def refuse(gguf, out):
        raise AssertionError("the second load must read the cache, not the GGUF")
    monkeypatch.setattr(models, "_convert_gguf", refuse)
    start = time.perf_counter()
    again, _, _ = load_model("smollm2", kind="causal", cache_dir=cache)
    cached = time.perf_counter() - start
    assert _same_weights(model, again) and cached < first / 5


def test_decoder_without_pad_id_gets_the_tokenizers_for_classification(tmp_path):
    ref, tok, _ = _load("tiny-llama", "causal")
    ref.config.pad_token_id = None  # as Llama-2's config ships: the last non-pad token cannot be found
    ref.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model, tok2, spec = load_model(str(tmp_path / "m"), kind="classification", num_labels=2)
    assert model.config.pad_token_id == tok2.pad_token_id is not None and spec.head_modules == ("score",)
    with torch.no_grad():
        logits = model(**tok2(["short", "a longer text here"], return_tensors="pt", padding=True)).logits
    assert logits.shape == (2, 2)
