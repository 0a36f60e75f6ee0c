"""Aggregation benchmark: every rule at the published models' shapes, beside its dense reference
and beside a memory floor, timed in the same run (pytest-benchmark does the timing).

``python -m fedlora.bench [--quick] --out results/bench`` runs ``tests/bench_aggregation.py`` under
pytest-benchmark and turns its JSON into ``aggregation.json`` (one record per case) and
``aggregation.md``. Quote the ratios, not the absolute times: the machines are shared.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .aggregators import RoundContext, get_rule
from .aggregators.reference import REFERENCES, weighted_product_dense
from .factors import ClientUpdate, GlobalMatrix, LoRAFactors

SHAPES = {  # (m, n) = (out, in) of nn.Linear.weight
    "roberta-large q/v": (1024, 1024),
    "llama-2-7b attn": (4096, 4096),
    "llama-2-7b up/gate": (11008, 4096),
    "llama-2-7b down": (4096, 11008),
}
CLIENTS = (3, 10, 50)
RANKS = (2, 8, 16)
RULES = ("fedavg", "ffa", "rolora", "fedex", "flexlora", "flora", "full")
FLOOR_RULES = ("fedavg", "ffa", "rolora")  # pure reductions: compare with reading the bytes once


@dataclass(frozen=True)
class Case:
    rule: str
    m: int
    n: int
    clients: int
    rank: int
    kind: str  # "fast", "reference" (dense, published-style) or "floor" (copy the bytes once)

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.rule}-{self.m}x{self.n}-K{self.clients}-r{self.rank}"


def cases(quick: bool) -> list[Case]:
    out = []
    if quick:
        grid = [((1024, 1024), K, 8) for K in (3, 10)] + [((4096, 11008), 10, 8)]
    else:
        grid = [(mn, K, r) for mn in SHAPES.values() for K in CLIENTS for r in RANKS]
    for (m, n), K, r in grid:
        llama = m * n > 1024 * 1024
        for rule in RULES:
            if rule == "full" and m * n * K * 4 > 2e9:  # K dense fp32 copies above 2 GB do not fit the point
                continue
            out.append(Case(rule, m, n, K, r, "fast"))
            if rule in FLOOR_RULES:
                out.append(Case(rule, m, n, K, r, "floor"))
            # the dense references take ~30 s per call at the Llama shapes: time them at the headline point
            if rule in REFERENCES and (not llama or (K, r) == (10, 8)) and not (quick and llama):
                out.append(Case(rule, m, n, K, r, "reference"))
    if quick:  # one larger dense reference keeps the quick run honest about how the speedup grows
        out.append(Case("flexlora", 2048, 2048, 10, 8, "reference"))
        out.append(Case("flexlora", 2048, 2048, 10, 8, "fast"))
    return out


def make_inputs(case: Case, seed: int = 0):
    """Random client factors (float32) for one case: the global state, updates, weights, context."""
    g = torch.Generator().manual_seed(seed)
    m, n, K, r = case.m, case.n, case.clients, case.rank
    rule = get_rule(case.rule)
    trains = rule.trains(0)
    s = 2.0 / r
    w = torch.rand(K, generator=g, dtype=torch.float64) + 0.5
    p = w / w.sum()
    if trains == "W":
        return GlobalMatrix(W=torch.randn(m, n, generator=g)), [ClientUpdate(W=torch.randn(m, n, generator=g)) for _ in range(K)], p, RoundContext()
    state = GlobalMatrix(lora=LoRAFactors(A=torch.randn(r, n, generator=g), B=torch.randn(m, r, generator=g), scale=s))
    ups = [ClientUpdate(A=torch.randn(r, n, generator=g) if "A" in trains else None,
                        B=torch.randn(m, r, generator=g) if "B" in trains else None, scale=s) for _ in range(K)]
    ctx = RoundContext(client_ranks=[r] * K, client_scales=[s] * K) if rule.per_client_rank else RoundContext()
    return state, ups, p, ctx


def target(case: Case) -> tuple[Callable[[], object], dict]:
    """The callable to time for ``case`` and the extra info to record beside it. For a reference,
    ``info["check"](result)`` compares a timed call's result with the fast path, outside the timing."""
    state, ups, p, ctx = make_inputs(case)
    rule = get_rule(case.rule)
    info = {"rule": case.rule, "m": case.m, "n": case.n, "clients": case.clients, "rank": case.rank, "kind": case.kind}
    if case.kind == "floor":
        tensors = [t for u in ups for t in u.fields().values()]
        buf = [torch.empty_like(t) for t in tensors]
        return (lambda: [b.copy_(t) for b, t in zip(buf, tensors)]), info
    fn = REFERENCES[case.rule] if case.kind == "reference" else rule.aggregate
    if case.kind == "fast":  # once, untimed: the bytes each client receives
        info["downlink_bytes"] = rule.client_downlink_bytes(fn(state, ups, p, ctx), case.rank)
    else:  # after timing, untimed: do the two paths agree? (relative Frobenius error of the effective update)

        def check(ref_result) -> dict:
            # both rules are exact here (no prior base): the effective update is Σ p_k s B_k A_k, which
            # float64 gives to ~1e-16, so each float32 path is also scored against it
            exact = weighted_product_dense([ClientUpdate(A=u.A.double(), B=u.B.double(), scale=u.scale) for u in ups], p)
            ref = ref_result.state.effective_delta().double()
            fast = rule.aggregate(state, ups, p, ctx).state.effective_delta().double()
            rel = lambda a, b: float(torch.linalg.norm(a - b) / torch.linalg.norm(b))  # noqa: E731
            return {"product_rel_error": rel(fast, ref), "fast_error_vs_exact": rel(fast, exact),
                    "reference_error_vs_exact": rel(ref, exact)}

        info["check"] = check
    # what a dense implementation ships per client: the m×n update (FedEx-LoRA: Ā, B̄ and the dense residual)
    info["dense_downlink_bytes"] = case.m * case.n * 4
    if case.rule == "fedex":
        info["dense_downlink_bytes"] += case.rank * (case.m + case.n) * 4
    return (lambda: fn(state, ups, p, ctx)), info


def report(raw_json: Path, out_dir: Path) -> list[dict]:
    """Join fast, reference and floor timings of the same point into one record each."""
    data = json.loads(Path(raw_json).read_text())
    by = {}
    for b in data["benchmarks"]:
        e = b["extra_info"]
        key = (e["rule"], e["m"], e["n"], e["clients"], e["rank"])
        by.setdefault(key, {})[e["kind"]] = (b["stats"]["median"], e)
    records = []
    for (rule, m, n, K, r), kinds in sorted(by.items()):
        if "fast" not in kinds:
            continue
        med, e = kinds["fast"]
        rec = {"rule": rule, "m": m, "n": n, "clients": K, "rank": r, "median_s": med,
               "downlink_bytes": e.get("downlink_bytes"), "dense_downlink_bytes": e.get("dense_downlink_bytes")}
        if "reference" in kinds:
            rec["reference_median_s"] = kinds["reference"][0]
            rec["speedup"] = kinds["reference"][0] / med
            for k in ("product_rel_error", "fast_error_vs_exact", "reference_error_vs_exact"):
                rec[k] = kinds["reference"][1].get(k)
        if "floor" in kinds:
            rec["floor_median_s"] = kinds["floor"][0]
            rec["floor_ratio"] = med / kinds["floor"][0]
        records.append(rec)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"machine_info": data.get("machine_info", {}), "datetime": data.get("datetime"),
            "commit_info": data.get("commit_info", {}), "torch": torch.__version__,
            "threads": torch.get_num_threads()}
    (out_dir / "aggregation.json").write_text(json.dumps(records, indent=1))
    (out_dir / "aggregation_meta.json").write_text(json.dumps(meta, indent=1, default=str))
    (out_dir / "aggregation.md").write_text(markdown(records))
    return records


def _fmt(x: Optional[float], spec: str) -> str:
    return "" if x is None else format(x, spec)


def markdown(records: list[dict]) -> str:
    lines = ["| rule | m×n | K | r | median (ms) | dense ref (ms) | speedup | fast vs ref | fast vs exact | ref vs exact "
             "| floor (ms) | ÷floor | downlink/client | dense downlink | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        dl, ddl = r.get("downlink_bytes"), r.get("dense_downlink_bytes")
        lines.append("| {rule} | {m}×{n} | {clients} | {rank} | {t} | {ref} | {sp} | {err} | {ferr} | {rerr} | {fl} | {fr} "
                     "| {dl} | {ddl} | {dr} |".format(
            **r, t=_fmt(r["median_s"] * 1e3, ".3g"), ref=_fmt(r.get("reference_median_s") and r["reference_median_s"] * 1e3, ".4g"),
            sp=_fmt(r.get("speedup"), ".0f") + ("×" if r.get("speedup") else ""), err=_fmt(r.get("product_rel_error"), ".1e"),
            ferr=_fmt(r.get("fast_error_vs_exact"), ".1e"), rerr=_fmt(r.get("reference_error_vs_exact"), ".1e"),
            fl=_fmt(r.get("floor_median_s") and r["floor_median_s"] * 1e3, ".3g"),
            fr=_fmt(r.get("floor_ratio"), ".2f"), dl=_bytes(dl), ddl=_bytes(ddl),
            dr=(f"{ddl / dl:.0f}×" if dl and ddl else "")))
    return "\n".join(lines) + "\n"


def _bytes(b: Optional[int]) -> str:
    if not b:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a reduced grid that finishes in under a minute")
    ap.add_argument("--out", type=Path, default=Path("results/bench"))
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both paths (1: stable on a shared 2-core machine)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "aggregation_raw.json"
    env = {**os.environ, "FEDLORA_BENCH_QUICK": "1" if args.quick else "0", "FEDLORA_BENCH_THREADS": str(args.threads)}
    here = Path(__file__).resolve().parent.parent / "tests" / "bench_aggregation.py"
    cmd = [sys.executable, "-m", "pytest", str(here), "-m", "bench", "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={raw}", "--benchmark-disable-gc", "--benchmark-columns=median,rounds",
           "--benchmark-min-rounds=5", "--benchmark-max-time=" + ("0.02" if args.quick else "0.2")]
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        return rc
    records = report(raw, args.out)
    print(markdown(records))
    print(f"wrote {args.out / 'aggregation.json'} and {args.out / 'aggregation.md'} ({len(records)} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
