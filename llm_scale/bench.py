"""``make bench-llm``: memory and speed of the LLM tier on MiniLM, as ratios measured in one run.

- ``memory_ratio_50_vs_1`` per rule: peak resident memory of a process that runs one 50-client round
  (one local step each) over that of one running a 1-client round of 50 local steps: the same steps
  on the same batches (one shared plan), so the ratio isolates what the number of clients costs (each
  in a fresh process, since peak RSS only grows).
- ``client_switch_ratio`` per rule: the CPU time of that 50-client round over the 1-client one, on
  the same batches, interleaved in one process: what 50 client views, loads, optimizers, uploads and
  server folds cost beside the steps.
- ``dtype``: the step time of bf16 autocast over float32 on this CPU, with its bf16 capability beside
  it (``llm_scale/hardware.py``), and a short run's test accuracy in both, seed by seed.
- ``step_ratio_vs_peft``: one local step of our engine over one step of a plain peft training loop
  (``get_peft_model`` + AdamW) on the same model, batches, dtype and thread count, interleaved.
- ``client_steps_per_minute``: a 3-client round of the engine, end to end.
- ``cache_gain``: steps a minute with LoRA on the top 3 of 6 blocks, frozen-layer cache on over off.

    python -m llm_scale.bench --out results/bench [--quick] [--only memory|switch|dtype|speed]

``--only`` runs one part and merges it into an existing ``llm.json`` (each part records when, at which
commit and on what machine it was measured).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RULES = ("fedavg", "ffa", "rolora", "rolora-chain", "fedex", "flexlora", "flora", "full", "full-galore")
COMMON = dict(train_subset=2000, test_subset=64, batch_size=16, max_length=64, threads=1, dtype="float32")


def _cfg(**kw):
    from .config import load_config

    return load_config("cpu-minilm-tweets", **{**COMMON, **kw})


def _shared_plan(fed, steps: int) -> list:
    """The bench's batches: one seeded, length-grouped plan of ``steps`` batches over all the training
    rows, so that 1 client × ``steps`` steps and ``steps`` clients × 1 step train on the very same
    batches (client ``c`` of ``K`` takes batches ``c·steps/K …``). Without it the 1-client arm's batches
    are length-grouped over windows of 8 batches while each one-step client pads a random batch of its
    own 40 rows: the 50-client arm then did ≈1.6× the padded tokens, which was the whole of the 1.54×."""
    from .batches import batch_plan

    rows = np.sort(np.concatenate(fed.parts))
    return batch_plan(rows, steps=steps, batch_size=fed.cfg.batch_size, seed=0, lengths=fed.encoded["train"].lengths())


def use_shared_plan(fed, total_steps: int):
    """Make client ``c`` of ``fed`` train on batches ``c·steps … (c+1)·steps − 1`` of the shared plan."""
    plan, steps = _shared_plan(fed, total_steps), fed.cfg.local_steps
    fed._batches = lambda task, rows: plan[task.client * steps:(task.client + 1) * steps]
    return fed


def _federation(rule: str, clients: int, steps: int, *, total_steps: int, splits=None):
    """A Federation for one bench round whose clients take their batches from the shared plan."""
    from .engine import Federation

    cfg = _cfg(method=rule, clients=clients, rounds=1, local_steps=steps,
               client_ranks=(8, 4) if rule in ("flexlora", "flora") else ())
    return use_shared_plan(Federation(cfg, splits=splits), total_steps)


def _round(fed) -> float:
    """One round of the loop on ``fed`` (no evaluation); its wall time."""
    from fedlora.config import FedConfig
    from fedlora.loop import run_federated

    ranks, scales = fed.client_ranks()
    t0 = time.perf_counter()
    run_federated(FedConfig(rule=fed.rule, rounds=1, num_clients=fed.num_clients, seed=0), init=fed.init_state(),
                  local_train=fed.local_train, client_ranks=ranks, client_scales=scales,
                  on_round_start=fed.on_round_start, local_optimizers=("default", "galore"), progress=False)
    return time.perf_counter() - t0


def memory_child(rule: str, clients: int, steps: int) -> dict:
    """One round of ``rule`` with ``clients`` clients × ``steps`` steps on the shared plan, in this
    process; returns peak RSS."""
    from .run import peak_rss_mib

    fed = _federation(rule, clients, steps, total_steps=clients * steps)
    before = peak_rss_mib()
    seconds = _round(fed)
    return {"rule": rule, "clients": clients, "peak_rss_mib": peak_rss_mib(), "rss_before_round_mib": before,
            "round_seconds": seconds}


def switch_child(rule: str, clients: int, steps: int) -> dict:
    """``client_switch_ratio``: one round of ``clients`` clients × 1 step over one of 1 client ×
    ``steps`` steps (``steps == clients``) on the same batches, timed interleaved in one process in the
    order 1, K, K, 1 (a linear drift of the machine's load cancels), after one untimed warm-up round
    of each. The ratio is of this process's CPU time (``time.process_time``: what the rounds computed,
    not how long they waited for a core on a shared machine); the wall-clock ratio is recorded beside it."""
    assert clients == steps
    one = _federation(rule, 1, steps, total_steps=steps)
    many = _federation(rule, clients, 1, total_steps=steps, splits=one.splits)
    _round(one), _round(many)  # warm-up: first-call allocations, lazily built per-rank adapters
    cpu, wall = {"1": [], "K": []}, {"1": [], "K": []}
    for arm in ("1", "K", "K", "1"):
        c0 = time.process_time()
        wall[arm].append(_round(one if arm == "1" else many))
        cpu[arm].append(time.process_time() - c0)
    return {"rule": rule, "client_switch_ratio": sum(cpu["K"]) / sum(cpu["1"]),
            "client_switch_ratio_wall": sum(wall["K"]) / sum(wall["1"]), "cpu_seconds_1": cpu["1"],
            "cpu_seconds_K": cpu["K"], "wall_seconds_1": wall["1"], "wall_seconds_K": wall["K"],
            "clients": clients, "steps": steps}


def dtype_steps(steps: int) -> dict:
    """bf16 autocast against float32 on one model and the same batches: the median CPU time of a
    training step in each, interleaved (fp32, bf16, fp32, …), with the CPU's bf16 capability beside it."""
    import torch

    from .engine import Federation
    from .hardware import capability

    fed = Federation(_cfg(method="fedavg", clients=1, dtype="float32"))
    params = fed.bridge.load(fed.init_state(), trains="AB")
    opt = torch.optim.AdamW(params, lr=1e-4)
    fed.model.train()
    times: dict = {"float32": [], "bfloat16": []}
    for i, rows in enumerate(_shared_plan(fed, steps + 2)):
        for dtype in ("float32", "bfloat16"):
            fed.dtype = dtype  # what Federation._autocast reads
            c0 = time.process_time()
            loss = fed.loss("train", rows)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 2:  # warm-up
                times[dtype].append(time.process_time() - c0)
    f32, b16 = float(np.median(times["float32"])), float(np.median(times["bfloat16"]))
    return {"step_cpu_seconds_float32": f32, "step_cpu_seconds_bfloat16": b16, "bf16_over_fp32_step": b16 / f32,
            "steps_timed": len(times["float32"]), "hardware": capability("cpu")}


def dtype_accuracy(seeds=(0, 1), rounds: int = 3) -> dict:
    """A short run (3 IID clients × ``rounds`` rounds × 10 steps, 300 test tweets) in float32 and in bf16
    for each seed: the test accuracies, and the bf16 − fp32 gap beside the seed-to-seed spread."""
    from .run import run

    out: dict = {"float32": [], "bfloat16": []}
    for seed in seeds:
        for dtype in out:
            cfg = _cfg(method="fedavg", clients=3, rounds=rounds, local_steps=10, lr=1e-3, test_subset=300,
                       eval_every=rounds, seed=seed, split_seed=0, dtype=dtype)
            out[dtype].append(run(cfg, progress=False)["final_test_accuracy"])
    gaps = [b - f for b, f in zip(out["bfloat16"], out["float32"])]
    return {"test_accuracy": out, "seeds": list(seeds), "bf16_minus_fp32": gaps,
            "seed_spread_fp32": max(out["float32"]) - min(out["float32"]),
            "run": f"fedavg, 3 IID clients x {rounds} rounds x 10 steps, lr 1e-3, 300 test tweets"}


def _spawn(rule: str, clients: int, steps: int, kind: str = "--child") -> dict:
    out = subprocess.run([sys.executable, "-m", "llm_scale.bench", kind, rule, str(clients), str(steps)],
                         capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def step_ratio(steps: int) -> dict:
    """Median step time of the engine vs a plain peft loop on the same batches (interleaved)."""
    import torch
    from peft import get_peft_model

    from .engine import Federation
    from .models import load_model

    fed = Federation(_cfg(method="fedavg"))
    model, _, _ = load_model("minilm", kind="classification", num_labels=3, seed=1)
    plain = get_peft_model(model, fed.lora_config)
    plain.train()
    opt_plain = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-4)
    from .batches import batch_plan, collate_classification

    plan = batch_plan(fed.parts[0], steps=steps + 2, batch_size=16, seed=0, lengths=fed.lengths)
    state = fed.init_state()
    params = fed.bridge.load(state, trains="AB")
    opt = torch.optim.AdamW(params, lr=1e-4)
    fed.model.train()
    ours, theirs = [], []
    for i, rows in enumerate(plan):
        t = time.perf_counter()
        loss = fed.loss("train", rows)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t_ours = time.perf_counter() - t
        b = collate_classification(fed.encoded["train"], rows, pad_id=fed.pad_id)
        t = time.perf_counter()
        out = plain(**b)
        out.loss.backward()
        opt_plain.step()
        opt_plain.zero_grad(set_to_none=True)
        t_plain = time.perf_counter() - t
        if i >= 2:  # warm-up
            ours.append(t_ours)
            theirs.append(t_plain)
    return {"step_seconds_ours": float(np.median(ours)), "step_seconds_plain_peft": float(np.median(theirs)),
            "step_ratio_vs_peft": float(np.median(ours) / np.median(theirs)), "steps_timed": len(ours)}


def steps_per_minute(*, layers=(), cache=True, steps=10) -> float:
    """Client-steps a minute over one 3-client round, end to end (the round's evaluation on 64 test
    rows included; building the cache is setup, paid once per run, and not included)."""
    from .run import run

    cfg = _cfg(method="fedavg", clients=3, rounds=1, local_steps=steps, layers=tuple(layers),
               cache_frozen_layers=cache, eval_every=1)
    rec = run(cfg, progress=False)
    return rec["client_steps"] * 60 / rec["train_seconds"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/bench"))
    ap.add_argument("--quick", action="store_true", help="fewer rules and steps (a smoke run)")
    ap.add_argument("--only", choices=("memory", "switch", "dtype", "speed"),
                    help="run one part, merged into an existing report")
    ap.add_argument("--child", nargs=3, metavar=("RULE", "CLIENTS", "STEPS"), help=argparse.SUPPRESS)
    ap.add_argument("--switch-child", nargs=3, metavar=("RULE", "CLIENTS", "STEPS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    if a.child:
        print(json.dumps(memory_child(a.child[0], int(a.child[1]), int(a.child[2]))))
        return 0
    if a.switch_child:
        print(json.dumps(switch_child(a.switch_child[0], int(a.switch_child[1]), int(a.switch_child[2]))))
        return 0
    from fedlora.provenance import provenance

    path = a.out / "llm.json"
    report = json.loads(path.read_text()) if a.only and path.exists() else {}
    report.update({"model": "minilm (all-MiniLM-L6-v2, 22.7M)", "batch_size": 16, "max_length": 64,
                   "dtype": "float32 (the dtype part: bf16 beside it)", "threads": 1, "quick": a.quick,
                   "targets": {"memory_ratio_50_vs_1": "<= 1.2", "step_ratio_vs_peft": "<= 1.1",
                               "client_steps_per_minute": ">= 500", "client_switch_ratio": "<= 1.1"}})
    rules = ("fedavg", "fedex", "full") if a.quick else RULES
    K = 10 if a.quick else 50
    if a.only in (None, "memory"):
        memory = {}
        for rule in rules:
            one, many = _spawn(rule, 1, K), _spawn(rule, K, 1)
            memory[rule] = {"memory_ratio_50_vs_1": many["peak_rss_mib"] / one["peak_rss_mib"],
                            "peak_rss_mib_1": one["peak_rss_mib"], "peak_rss_mib_50": many["peak_rss_mib"],
                            "round_seconds_1": one["round_seconds"], "round_seconds_50": many["round_seconds"]}
            print(f"{rule:13s} peak RSS 1 client x {K} steps {one['peak_rss_mib']:.0f} MiB, {K} clients x 1 step "
                  f"{many['peak_rss_mib']:.0f} MiB: {memory[rule]['memory_ratio_50_vs_1']:.3f}x", flush=True)
        report["memory"] = {"rules": memory, "rounds": f"1 client x {K} local steps vs {K} clients x 1 local step, "
                                                       "on the same batches (one shared plan)",
                            "provenance": provenance()}
    if a.only in (None, "switch"):
        switch = {}
        for rule in rules:
            switch[rule] = _spawn(rule, K, K, "--switch-child")
            print(f"{rule:13s} {K} clients x 1 step over 1 client x {K} steps, same batches: "
                  f"{switch[rule]['client_switch_ratio']:.3f}x CPU time "
                  f"({switch[rule]['client_switch_ratio_wall']:.3f}x wall)", flush=True)
        report["client_switch"] = {"rules": switch, "client_switch_ratio_max": max(v["client_switch_ratio"]
                                                                                   for v in switch.values()),
                                   "how": f"one process per rule, rounds of 1 client x {K} steps and {K} clients x "
                                          "1 step on the same batches, timed 1, K, K, 1 after a warm-up round each; "
                                          "ratio of CPU time",
                                   "provenance": provenance()}
    if a.only in (None, "dtype"):
        steps = dtype_steps(6 if a.quick else 20)
        print(f"step CPU time bf16 / fp32: {steps['bf16_over_fp32_step']:.3f} "
              f"(native bf16: {steps['hardware']['cpu']['native_bf16']}, flags {steps['hardware']['cpu']['flags']})",
              flush=True)
        acc = dtype_accuracy(seeds=(0,) if a.quick else (0, 1), rounds=1 if a.quick else 3)
        print(f"short run test accuracy fp32 {acc['test_accuracy']['float32']}, bf16 {acc['test_accuracy']['bfloat16']}",
              flush=True)
        report["dtype"] = {**steps, "accuracy": acc, "provenance": provenance()}
    if a.only in (None, "speed"):
        speed = step_ratio(6 if a.quick else 20)
        print(f"step: ours {speed['step_seconds_ours']:.3f} s, plain peft {speed['step_seconds_plain_peft']:.3f} s: "
              f"{speed['step_ratio_vs_peft']:.3f}x", flush=True)
        n = 4 if a.quick else 10
        spm = steps_per_minute(steps=n)
        top_nocache = steps_per_minute(layers=(3, 4, 5), cache=False, steps=n)
        top_cache = steps_per_minute(layers=(3, 4, 5), cache=True, steps=n)
        print(f"client-steps a minute: all 6 blocks {spm:.0f}; top 3 blocks {top_nocache:.0f} uncached, "
              f"{top_cache:.0f} cached ({top_cache / top_nocache:.2f}x)", flush=True)
        report["speed"] = {**speed, "client_steps_per_minute": spm, "client_steps_per_minute_top3_uncached": top_nocache,
                           "client_steps_per_minute_top3_cached": top_cache, "cache_gain": top_cache / top_nocache,
                           "provenance": provenance()}
    a.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, sort_keys=True))
    print(f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
