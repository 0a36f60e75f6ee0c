"""Is R = 100 enough? The paper-regime preset's 3-client FedAvg-LoRA run and centralised training with the
same 6,000 client-steps, validation accuracy along the way (issue 23: "R sized so that both reach their
plateau on the validation split"). Centralised is one client taking 200 steps a round for 30 rounds (AdamW
state fresh each round, as every client's is), so that it can be scored along the way.

    python tools/paper_regime_plateau.py --out results/llm_scale/paper_regime_plateau [--lr 4e-3] [--which fed|central]
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--which", choices=("fed", "central"), required=True)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from llm_scale.quiet import quiet_known_warnings
    from llm_scale.run import run, run_filename
    from llm_scale.sweep import PRESETS

    quiet_known_warnings()
    sw = PRESETS["paper-regime"]
    cfg = sw.config_for("fedavg", 3, "iid", 2, lr=a.lr, seed=0, role="tune")
    import dataclasses

    if a.which == "fed":
        cfg = dataclasses.replace(cfg, eval_every=10)  # 100 rounds of 3 clients x 20 steps
    else:
        cfg = dataclasses.replace(cfg, clients=1, rounds=30, local_steps=200, eval_every=3)  # 6,000 steps
    tag = "centralised-as-1-client" if a.which == "central" else "fedavg-3-clients"
    rec = run(cfg, out=a.out / f"{tag}_{run_filename(cfg)}", progress=True,
              extra={"probe": "paper-regime plateau", "arm": tag})
    for r in rec["rounds"]:
        if "val_accuracy" in r:
            print(f"round {r['round'] + 1:4d}  client-steps {(r['round'] + 1) * cfg.local_steps * cfg.clients:5d}  "
                  f"val {r['val_accuracy']:.3f}")


if __name__ == "__main__":
    main()
