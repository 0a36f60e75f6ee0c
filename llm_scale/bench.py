"""``make bench-llm``: memory and speed of the LLM tier on MiniLM, as ratios measured in one run.

- ``memory_ratio_50_vs_1`` per rule: peak resident memory of a process that runs one 50-client round
  (one local step each) over that of one running a 1-client round of 50 local steps: the same steps
  and batches' worth of work, so the ratio isolates what the number of clients costs (each in a fresh
  process, since peak RSS only grows).
- ``step_ratio_vs_peft``: one local step of our engine over one step of a plain peft training loop
  (``get_peft_model`` + AdamW) on the same model, batches, dtype and thread count, interleaved.
- ``client_steps_per_minute``: a 3-client round of the engine, end to end.
- ``cache_gain``: steps a minute with LoRA on the top 3 of 6 blocks, frozen-layer cache on over off.

    python -m llm_scale.bench --out results/bench [--quick] [--only memory|speed]

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
COMMON = dict(train_subset=2000, test_subset=64, batch_size=16, max_length=64, threads=1, bf16=False)


def _cfg(**kw):
    from .config import load_config

    return load_config("cpu-minilm-tweets", **{**COMMON, **kw})


def memory_child(rule: str, clients: int, steps: int) -> dict:
    """One round of ``rule`` with ``clients`` clients, in this process; returns peak RSS."""
    from fedlora.config import FedConfig
    from fedlora.loop import run_federated

    from .engine import Federation
    from .run import peak_rss_mib

    cfg = _cfg(method=rule, clients=clients, rounds=1, local_steps=steps,
               client_ranks=(8, 4) if rule in ("flexlora", "flora") else ())
    fed = Federation(cfg)
    ranks, scales = fed.client_ranks()
    before = peak_rss_mib()
    t0 = time.perf_counter()
    run_federated(FedConfig(rule=rule, rounds=1, num_clients=fed.num_clients, seed=0), init=fed.init_state(),
                  local_train=fed.local_train, client_ranks=ranks, client_scales=scales,
                  on_round_start=fed.on_round_start, local_optimizers=("default", "galore"), progress=False)
    return {"rule": rule, "clients": clients, "peak_rss_mib": peak_rss_mib(), "rss_before_round_mib": before,
            "round_seconds": time.perf_counter() - t0}


def _spawn(rule: str, clients: int, steps: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "llm_scale.bench", "--child", rule, str(clients), str(steps)],
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
    ap.add_argument("--only", choices=("memory", "speed"), help="run one part, merged into an existing report")
    ap.add_argument("--child", nargs=3, metavar=("RULE", "CLIENTS", "STEPS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)
    if a.child:
        print(json.dumps(memory_child(a.child[0], int(a.child[1]), int(a.child[2]))))
        return 0
    from fedlora.provenance import provenance

    path = a.out / "llm.json"
    report = json.loads(path.read_text()) if a.only and path.exists() else {}
    report.update({"model": "minilm (all-MiniLM-L6-v2, 22.7M)", "batch_size": 16, "max_length": 64,
                   "dtype": "float32", "threads": 1, "quick": a.quick,
                   "targets": {"memory_ratio_50_vs_1": "<= 1.2", "step_ratio_vs_peft": "<= 1.1",
                               "client_steps_per_minute": ">= 500"}})
    if a.only in (None, "memory"):
        rules = ("fedavg", "fedex", "full") if a.quick else RULES
        memory = {}
        for rule in rules:
            one, fifty = _spawn(rule, 1, 50), _spawn(rule, 50, 1)
            memory[rule] = {"memory_ratio_50_vs_1": fifty["peak_rss_mib"] / one["peak_rss_mib"],
                            "peak_rss_mib_1": one["peak_rss_mib"], "peak_rss_mib_50": fifty["peak_rss_mib"],
                            "round_seconds_1": one["round_seconds"], "round_seconds_50": fifty["round_seconds"]}
            print(f"{rule:13s} peak RSS 1 client x 50 steps {one['peak_rss_mib']:.0f} MiB, 50 clients x 1 step "
                  f"{fifty['peak_rss_mib']:.0f} MiB: {memory[rule]['memory_ratio_50_vs_1']:.3f}x", flush=True)
        report["memory"] = {"rules": memory, "rounds": "1 client x 50 local steps vs 50 clients x 1 local step",
                            "provenance": provenance()}
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
