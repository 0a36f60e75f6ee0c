"""``python -m linear_theory --out DIR [--quick] [--seed S]``: run every analysis, write
``DIR/theory.json`` (provenance, one record per check, findings) and ``DIR/theory_traces.json``
(what the figures plot), print a table, exit 1 if any check failed."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy
import torch

from fedlora.provenance import provenance as core_provenance

from .analyses import FULL, NAMES, QUICK, run_all

__all__ = ["main", "provenance", "format_table"]


def provenance(argv: Sequence[str], settings, seed: int) -> dict:
    """The core's provenance (git commit, package versions, machine) plus this run's command and settings."""
    return {**core_provenance(), "command": " ".join(["python", "-m", "linear_theory", *argv]), "seed": seed,
            "settings": dataclasses.asdict(settings), "torch": torch.__version__, "numpy": numpy.__version__,
            "dtype": "float64"}


def _fmt(x) -> str:
    if isinstance(x, float):
        return f"{x:.6g}" if math.isfinite(x) else str(x)
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in x[:5]) + (", …" if len(x) > 5 else "") + "]"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in x.items()) + "}"
    return str(x)


def format_table(records: Sequence[dict]) -> str:
    """One line per check: name, what distinguishes the instance, predicted, measured, tolerance."""
    rows = [("check", "instance", "predicted", "measured", "tolerance", "ok")]
    for r in records:
        inst = []
        for key in ("method", "c", "h", "tau", "samples"):
            v = r.get(key)
            if isinstance(v, list):
                v = f"{_fmt(v[0])}…{_fmt(v[-1])}" if key != "h" else None
            elif v is not None:
                v = _fmt(v)
            if v is not None:
                inst.append(f"{'N' if key == 'samples' else key}={v}")
        ok = ("PASS" if r["passed"] else "FAIL") + ("" if r.get("counted", True) else " (sanity)")
        rows.append((r["name"], " ".join(inst), _fmt(r["predicted"]), _fmt(r["measured"]),
                     f"{_fmt(r['tolerance'])} {r['tolerance_kind'].split(' (')[0].split(' to ')[0]}", ok))
    widths = [min(max(len(row[i]) for row in rows), 30) for i in range(len(rows[0]))]
    lines = ["  ".join(cell[:w].ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _findings(traces: dict) -> list[dict]:
    ce = traces["rolora_bound"]["counterexample"]
    small = traces["rolora_bound"]["small_samples"]
    return [
        {"name": "rolora_bound", "assumption_met": False,
         "finding": f"outside c ≤ 1 the bound fails: c={ce['c']}, θ0={ce['theta0']} gives "
                    f"max sin θ⁺/sin θ = {ce['max_ratio']:.4f} > q = {ce['q']:.4f} (exact recursion, converging)",
         **ce},
        {"name": "rolora_bound", "assumption_met": False,
         "finding": f"with {small['per_c'][0]['samples']} samples per client the population-form bound broke in "
                    f"{small['violations']} of {small['runs']} federated runs (c ≤ 1)", **small},
    ]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m linear_theory", description=__doc__)
    ap.add_argument("--out", type=Path, required=True, help="directory for theory.json and theory_traces.json")
    ap.add_argument("--quick", action="store_true", help="the fast tier (small instances, < 30 s)")
    ap.add_argument("--seed", type=int, default=0, help="seed every instance derives from")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: small ops, shared 2-core machine)")
    args = ap.parse_args(argv)
    if args.threads < 1:
        ap.error(f"--threads {args.threads}: use 1 or more")
    torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    records, traces = run_all(settings, args.seed)
    elapsed = time.perf_counter() - t0
    assert {r["name"] for r in records} == set(NAMES), "every analysis must produce at least one record"
    args.out.mkdir(parents=True, exist_ok=True)
    raw = list(argv) if argv is not None else sys.argv[1:]
    doc = {"provenance": {**provenance(raw, settings, args.seed), "seconds": round(elapsed, 2)},
           "records": records, "findings": _findings(traces),
           "passed": all(r["passed"] for r in records),
           "counted_checks": sum(r.get("counted", True) for r in records),
           "sanity_bounds": sum(not r.get("counted", True) for r in records)}
    (args.out / "theory.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False))
    (args.out / "theory_traces.json").write_text(json.dumps(traces, ensure_ascii=False))
    print(format_table(records))
    counted = [r for r in records if r.get("counted", True)]
    failed = [r for r in counted if not r["passed"]]
    sanity = [r for r in records if not r.get("counted", True)]
    broken = [r for r in sanity if not r["passed"]]
    print(f"\n{len(counted) - len(failed)}/{len(counted)} checks passed in {elapsed:.1f} s "
          f"({'quick' if args.quick else 'full'} tier, seed {args.seed}); {len(sanity) - len(broken)}/{len(sanity)} "
          f"sanity bounds hold (not counted: any weight of the model class meets them); wrote {args.out / 'theory.json'}")
    for f in doc["findings"]:
        print("finding:", f["finding"])
    return 1 if failed or broken else 0
