"""The ServerApp: ``FedLoraStrategy`` on the toy's initial state, evaluated on the server's test split."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save_file

from fedlora.checkpoint import atomic_write_json, state_to_tensors
from fedlora.flower import FedLoraStrategy
from mnist_toy.model import evaluate, init_state

from .task import fed, toy, toy_config

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    cfg = toy_config(rc)
    data = toy(cfg)
    k = cfg.clients
    strategy = FedLoraStrategy(cfg=fed(cfg), init=init_state(cfg, data), evaluate=lambda t, state: evaluate(data, state),
                               client_ranks=[cfg.rank] * k, client_scales=[cfg.scale] * k,
                               min_replies=int(rc["min-replies"]), round_timeout=float(rc["round-timeout"]),
                               checkpoint_dir=Path(rc["checkpoint-dir"]) if rc["checkpoint-dir"] else None,
                               resume=bool(rc["checkpoint-dir"]), run_info={"toy_config": dataclasses.asdict(cfg)})
    res = strategy.run(grid)
    for h in res.history:
        print(json.dumps({k2: h[k2] for k2 in ("round", "clients", "trains", "eval", "total_uplink_bytes",
                                               "total_downlink_bytes") if k2 in h}))
    if rc["out"]:
        out = Path(rc["out"])
        out.mkdir(parents=True, exist_ok=True)
        tensors, meta = state_to_tensors(res.state)
        save_file(tensors, str(out / "state.safetensors"))
        atomic_write_json(out / "history.json", {"history": res.history, "matrices": meta, "wire": strategy.wire,
                                                 "toy_config": dataclasses.asdict(cfg)})
