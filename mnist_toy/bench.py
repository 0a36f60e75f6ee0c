"""Time one round of local training (10 clients × 1 label) per method: batched vs sequential, 1 vs 2
threads, with and without the frozen-feature cache. Warms up first; reports medians and ratios.

    python -m mnist_toy.bench --out results/mnist_toy/bench --local-steps 20 --repeats 3
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from fedlora import get_rule
from fedlora.checkpoint import atomic_write_json
from fedlora.loop import ClientTask, client_view
from fedlora.seeding import derive_seed

from .config import ToyConfig
from .data import load_mnist
from .engine import train_batched, train_sequential
from .model import build_toy, init_state
from .run import provenance

METHODS = ("fedavg", "ffa", "rolora", "rolora-A", "fedex", "flexlora", "flora", "full")


def _tasks(cfg: ToyConfig, toy, method: str, round_: int) -> list[ClientTask]:
    rule = get_rule(method)
    state = init_state(dataclasses.replace(cfg, method=method), toy)
    return [ClientTask(client=c, round=round_, trains=rule.trains(round_), seed=derive_seed(cfg.seed, "client", round_, c),
                       start=client_view(rule, state, client=c, round_=round_, seed=cfg.seed, rank=cfg.rank, scale=cfg.scale))
            for c in range(len(toy.sizes))]


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def bench(cfg: ToyConfig, *, repeats: int = 3, threads=(1, 2), methods=METHODS) -> dict:
    toy = build_toy(cfg, load_mnist())
    rows = []
    for name in methods:
        method, round_ = ("rolora", 1) if name == "rolora-A" else (name, 0)
        mcfg = dataclasses.replace(cfg, method=method)
        tasks = _tasks(mcfg, toy, method, round_)
        row = {"method": name, "trains": tasks[0].trains}
        for th in threads:
            torch.set_num_threads(th)
            for cache in (True, False):
                c = dataclasses.replace(mcfg, feature_cache=cache)
                tag = f"t{th}_{'cache' if cache else 'nocache'}"
                row[f"batched_{tag}"] = _time(lambda: train_batched(tasks, toy, c), repeats)
                row[f"sequential_{tag}"] = _time(lambda: [train_sequential(t, toy, c) for t in tasks], repeats)
        for th in threads:
            row[f"speedup_batched_vs_sequential_t{th}"] = row[f"sequential_t{th}_cache"] / row[f"batched_t{th}_cache"]
            row[f"speedup_cache_t{th}"] = row[f"batched_t{th}_nocache"] / row[f"batched_t{th}_cache"]
            row[f"speedup_total_t{th}"] = row[f"sequential_t{th}_nocache"] / row[f"batched_t{th}_cache"]
        rows.append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
    torch.set_num_threads(1)
    return {"config": dataclasses.asdict(cfg), "repeats": repeats, "rows": rows,
            "note": "seconds are medians of one round of local training for all clients (aggregation excluded); "
                    "compare ratios, not absolute times: the machine is shared", **provenance()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--local-steps", type=int, default=20)
    ap.add_argument("--local-epochs", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    a = ap.parse_args(argv)
    cfg = ToyConfig(rank=a.rank, local_steps=a.local_steps, local_epochs=a.local_epochs)
    res = bench(cfg, repeats=a.repeats, threads=tuple(a.threads), methods=tuple(a.methods))
    a.out.mkdir(parents=True, exist_ok=True)
    work = f"e{a.local_epochs}" if a.local_epochs else f"s{a.local_steps}"
    atomic_write_json(a.out / f"bench_round_r{a.rank}_{work}.json", res)


if __name__ == "__main__":
    main()
