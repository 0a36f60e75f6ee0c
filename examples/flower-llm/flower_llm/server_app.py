"""The ServerApp: ``FedLoraStrategy`` on the tier's initial adapter, evaluated on the server's test split.

One JSON line per round as it ends; the results folder's absolute path at the end. A run that fails
(bad run config, no node, every round skipped) raises, so Flower records it as failed (``flwr ls``).
"""
from __future__ import annotations

from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.flower import FedLoraStrategy
from fedlora.flower.report import print_line, resumed_line, round_line, write_results
from fedlora.flower.strategy import RunFailed
from llm_scale.run import run_fingerprint

from .task import ServerFederation, as_dict, fed, llm_config, run_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = run_config(context.run_config)
    cfg = llm_config(context.run_config)
    federation = ServerFederation(cfg)
    ranks, scales = federation.client_ranks()
    ckpt = Path(rc["checkpoint-dir"]).expanduser().resolve() if rc["checkpoint-dir"] else None
    strategy = FedLoraStrategy(cfg=fed(cfg), init=federation.init_state(), evaluate=federation.evaluate,
                               client_ranks=ranks, client_scales=scales, min_replies=rc["min-replies"],
                               round_timeout=rc["round-timeout"], connect_timeout=rc["connect-timeout"],
                               checkpoint_dir=ckpt, resume=ckpt is not None, run_info={"llm_config": as_dict(cfg)},
                               on_round=lambda record: print_line(round_line(record)),
                               fingerprint=run_fingerprint(cfg, federation) if ckpt is not None else None)
    if strategy.resumed_from is not None:
        print_line(resumed_line(ckpt, strategy.resumed_from, cfg.rounds))
    res = strategy.run(grid)
    if rc["out"]:
        out = write_results(Path(rc["out"]), res.state, res.history, {"wire": strategy.wire, "llm_config": as_dict(cfg)})
        print_line(f"results: {out}")
    why = strategy.failure()
    if why:
        raise RunFailed(why)
