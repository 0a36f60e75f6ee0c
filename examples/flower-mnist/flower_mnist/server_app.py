"""The ServerApp: ``FedLoraStrategy`` on the toy's initial state, evaluated on the server's test split.

One JSON line per round as it ends; the results folder's absolute path at the end. A run that fails
(bad run config, no node, every round skipped) raises, so Flower records it as failed (``flwr ls``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.flower import FedLoraStrategy
from fedlora.flower.report import print_line, resumed_line, round_line, write_results
from fedlora.flower.strategy import RunFailed
from mnist_toy.data import load_mnist
from mnist_toy.model import evaluate, init_state
from mnist_toy.run import run_fingerprint

from .task import fed, run_config, toy, toy_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = run_config(context.run_config)
    cfg = toy_config(context.run_config)
    data = toy(cfg)
    k = cfg.clients
    ckpt = Path(rc["checkpoint-dir"]).expanduser().resolve() if rc["checkpoint-dir"] else None
    strategy = FedLoraStrategy(cfg=fed(cfg), init=init_state(cfg, data), evaluate=lambda t, state: evaluate(data, state),
                               client_ranks=[cfg.rank] * k, client_scales=[cfg.scale] * k,
                               min_replies=rc["min-replies"], round_timeout=rc["round-timeout"],
                               connect_timeout=rc["connect-timeout"], checkpoint_dir=ckpt, resume=ckpt is not None,
                               run_info={"toy_config": dataclasses.asdict(cfg)},
                               on_round=lambda record: print_line(round_line(record)),
                               fingerprint=run_fingerprint(cfg, load_mnist()) if ckpt is not None else None)
    if strategy.resumed_from is not None:
        print_line(resumed_line(ckpt, strategy.resumed_from, cfg.rounds))
    res = strategy.run(grid)
    if rc["out"]:
        out = write_results(Path(rc["out"]), res.state, res.history,
                            {"wire": strategy.wire, "toy_config": dataclasses.asdict(cfg)})
        print_line(f"results: {out}")
    why = strategy.failure()
    if why:
        raise RunFailed(why)
