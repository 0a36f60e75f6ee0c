"""Issue 22: the bench's two arms on the same batches, no per-client work that changes numbers, the
compute dtype (``dtype = "auto"``: bf16 where the CPU has it natively, detected from its flags), and a
resume / sweep that refuses another dtype."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from fedlora.config import ConfigError  # noqa: E402
from fedlora.loop import ClientTask  # noqa: E402
from llm_scale import hardware  # noqa: E402
from llm_scale.config import load_config  # noqa: E402
from llm_scale.engine import Federation  # noqa: E402
from test_llm_scale import _cfg, table  # noqa: E402,F401  (the module fixture: a small learnable CSV)

X86_AVX2 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n"


def _cpuinfo(tmp_path, text, name="cpuinfo"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# ---- dtype resolution ------------------------------------------------------------------------------
def test_auto_is_bf16_only_where_the_cpu_flags_say_so(tmp_path):
    amx = _cpuinfo(tmp_path, X86_AVX2.replace("avx2", "avx2 amx_bf16 amx_tile"), "amx")
    avx512 = _cpuinfo(tmp_path, X86_AVX2.replace("avx2", "avx2 avx512f avx512_bf16"), "avx512")
    avx2 = _cpuinfo(tmp_path, X86_AVX2, "avx2")
    assert hardware.resolve_dtype("auto", "cpu", cpuinfo=amx) == "bfloat16"
    assert hardware.resolve_dtype("auto", "cpu", cpuinfo=avx512) == "bfloat16"
    assert hardware.resolve_dtype("auto", "cpu", cpuinfo=avx2) == "float32"
    # unreadable flags (not Linux): never guessed
    assert hardware.resolve_dtype("auto", "cpu", cpuinfo=str(tmp_path / "missing")) == "float32"
    assert hardware.cpu_bf16(str(tmp_path / "missing"))["native_bf16"] is None
    assert hardware.cpu_bf16(avx512)["flags"] == ["avx512_bf16"]
    # an explicit dtype is used as configured, whatever the CPU
    assert hardware.resolve_dtype("bfloat16", "cpu", cpuinfo=avx2) == "bfloat16"
    assert hardware.resolve_dtype("float32", "cpu", cpuinfo=amx) == "float32"
    with pytest.raises(ValueError, match="dtype='fp16'"):
        hardware.resolve_dtype("fp16", "cpu")


def test_dtype_config_values_and_presets_pinned():
    from llm_scale.sweep import PRESETS

    with pytest.raises(ConfigError, match="dtype='half'"):
        load_config(None, dtype="half")
    assert load_config("cpu-minilm-tweets").dtype == "auto" and load_config("cpu-smollm-tweets").dtype == "auto"
    assert load_config("roberta-large-mnli").dtype == "bfloat16"
    for name, sweep in PRESETS.items():  # every cell of a committed study computes in float32, on any machine
        assert sweep.config_for("fedavg", 3, "iid", 2, lr=1e-3, seed=0, role="eval").dtype == "float32", name


def test_bf16_autocasts_the_forward_and_the_record_says_so(table, tmp_path):
    from llm_scale.run import run

    f32 = Federation(_cfg(table, "tiny-roberta", "fedavg", dtype="float32"))
    b16 = Federation(_cfg(table, "tiny-roberta", "fedavg", dtype="bfloat16"))
    rows = np.arange(8)
    assert f32.loss("train", rows).dtype == torch.float32
    from llm_scale.batches import collate_classification

    batch = collate_classification(b16.encoded["train"], rows, pad_id=b16.pad_id)
    assert b16._forward("train", rows, batch).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in b16.model.parameters())  # weights stay float32
    rec = run(b16.cfg, federation=b16, progress=False)
    assert rec["dtype"] == "bfloat16" and rec["config"]["dtype"] == "bfloat16"
    assert rec["hardware"]["cpu"]["source"] in ("/proc/cpuinfo", "unknown (no /proc/cpuinfo)")
    assert np.isfinite(rec["rounds"][-1]["train_loss"])


def test_resume_refuses_a_checkpoint_of_another_resolved_dtype(table, tmp_path, monkeypatch):
    """``dtype="auto"`` is the same config on two machines but not the same computation: the checkpoint
    fingerprint carries the resolved dtype."""
    import llm_scale.engine as engine
    from llm_scale.run import run

    cfg = _cfg(table, "tiny-roberta", "fedavg", dtype="auto", rounds=3)
    monkeypatch.setattr(engine, "resolve_dtype", lambda d, dev: "float32")
    run(cfg, checkpoint_dir=tmp_path / "ck", stop_after=1, progress=False)
    monkeypatch.setattr(engine, "resolve_dtype", lambda d, dev: "bfloat16")
    with pytest.raises(ConfigError, match="dtype"):
        run(cfg, checkpoint_dir=tmp_path / "ck", resume=True, progress=False)
    monkeypatch.setattr(engine, "resolve_dtype", lambda d, dev: "float32")
    rec = run(cfg, checkpoint_dir=tmp_path / "ck", resume=True, progress=False)
    assert rec["rounds_done"] == 3 and rec["dtype"] == "float32"


def test_sweep_refuses_to_resume_in_another_dtype(tmp_path):
    from llm_scale.sweep import PRESETS, _check_existing, check_dtype, record_dtype

    sweep = PRESETS["quick"]
    cfg = sweep.config_for("fedavg", 3, "iid", 2, lr=2e-3, seed=0, role="eval")
    assert record_dtype({"config": {"bf16": False}}) == "float32"  # records from before the dtype field
    assert record_dtype({"config": {"bf16": True}}) == "bfloat16"
    check_dtype({"dtype": "float32", "config": {}}, cfg, "x.json")  # same: fine
    folder = tmp_path / "llm_scale" / sweep.name / "iid_c3_r2"
    folder.mkdir(parents=True)
    (folder / "fedavg_old.json").write_text(json.dumps({"method": "fedavg", "complete": True, "dtype": "bfloat16",
                                                         "config": {"dtype": "auto"}}))
    with pytest.raises(ConfigError, match="computed in bfloat16, this sweep would compute in float32"):
        _check_existing(sweep, tmp_path)


# ---- the engine: no per-client work that changes numbers --------------------------------------------
def test_local_training_after_an_evaluation_runs_in_train_mode(table):
    """A client after an evaluation trains exactly as one before it, dropout on. ``local_train`` walks
    every module into train mode for each client (≈2 ms of a ≈400 ms MiniLM step): skipping the walk
    when the root module already says ``training`` changed the first client's numbers here (submodules
    left in eval mode), so the walk stays."""
    fed = Federation(_cfg(table, "tiny-roberta", "fedavg", lora_dropout=0.5))
    state = fed.init_state()
    task = ClientTask(client=0, round=0, start=state, trains="AB", seed=5)
    first = fed.local_train(task)
    fed.evaluate(0, state)
    assert not fed.model.training
    again = fed.local_train(task)
    assert fed.model.training
    names = fed.bridge.names
    assert first.metrics == again.metrics, (first.metrics, again.metrics)
    assert all(torch.equal(first.params[n].B, again.params[n].B) for n in names)
    # had dropout been off, the same client would have trained otherwise
    no_dropout = Federation(_cfg(table, "tiny-roberta", "fedavg", lora_dropout=0.0)).local_train(task)
    assert not all(torch.equal(first.params[n].B, no_dropout.params[n].B) for n in names)


def test_bench_arms_train_on_the_same_batches(table):
    """``make bench-llm``'s 1 client × S steps and S clients × 1 step see the very same batches."""
    from llm_scale.bench import use_shared_plan

    S = 6
    one = use_shared_plan(Federation(_cfg(table, "tiny-roberta", "fedavg", clients=1, local_steps=S)), S)
    many = use_shared_plan(Federation(_cfg(table, "tiny-roberta", "fedavg", clients=S, local_steps=1)), S)
    task = lambda c: ClientTask(client=c, round=0, start={}, trains="AB", seed=c)  # noqa: E731
    a = one._batches(task(0), one.parts[0])
    b = [x for c in range(S) for x in many._batches(task(c), many.parts[c])]
    assert len(a) == len(b) == S and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_reproduce_summary_prints_each_steps_wall_and_cpu_time(tmp_path, monkeypatch, capsys):
    from fedlora import reproduce

    monkeypatch.setattr(reproduce, "STEPS", [("tiny", "json.tool", ["json.tool", "--help"])])
    assert reproduce.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("tiny"))
    assert "ok" in line and line.rstrip().endswith("s") and "CPU" in line
    assert "all steps" in out
