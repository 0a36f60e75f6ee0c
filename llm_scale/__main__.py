"""Command line of the LLM tier.

    python -m llm_scale --config cpu-minilm-tweets --method rolora --clients 3 --rank 8 --seed 0 --out DIR
    python -m llm_scale --config my.toml --set lr=1e-3 --set layers=[3,4,5] --out DIR --export DIR/adapter
    python -m llm_scale --quick --out results/reproduce/llm_scale   # what `make reproduce` runs (minutes)
    python -m llm_scale sweep --preset scaling --out results --jobs 2   # the client-scaling study (≈2 h)

``--config`` takes a shipped config name (``llm_scale/configs/*.toml``) or a TOML file; every
``LLMConfig`` field can be overridden with ``--set key=value`` (TOML value syntax). One JSON per run goes
to ``DIR/<method>_<model>_..._seed<seed>.json``; ``--checkpoint-dir`` with ``--resume`` continues an
interrupted run from its last round; ``--export`` writes the final global for ``PeftModel.from_pretrained``.
"""
from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

QUICK_METHODS = ("fedavg", "ffa", "rolora")
# ≈150 client-steps per rule: a few minutes on one CPU thread (the cache would not pay here: each row
# is seen about once)
QUICK = dict(clients=3, rounds=5, local_steps=10, eval_every=1, train_subset=2400, test_subset=300, lr=1e-3)


def _parse_set(items) -> dict:
    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"error: --set {item!r}: write KEY=VALUE, e.g. --set lr=1e-3")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value  # a bare string
    return out


def build_parser() -> argparse.ArgumentParser:
    from fedlora import rule_names

    from .config import CENTRALISED, config_names

    ap = argparse.ArgumentParser(prog="python -m llm_scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="subcommand: `python -m llm_scale sweep --help` (the client-scaling study)")
    ap.add_argument("--config", default="cpu-minilm-tweets", help=f"a TOML file or one of: {', '.join(config_names())}")
    ap.add_argument("--method", choices=rule_names() + [CENTRALISED], help="the server rule (or centralised)")
    ap.add_argument("--clients", type=int)
    ap.add_argument("--rank", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config field")
    ap.add_argument("--out", type=Path, required=True, help="directory for the run's JSON")
    ap.add_argument("--checkpoint-dir", type=Path)
    ap.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    ap.add_argument("--export", type=Path, metavar="DIR", help="save the final global model (peft save_pretrained)")
    ap.add_argument("--quick", action="store_true",
                    help=f"the quick reproduction: MiniLM on the tweets, 3 clients, rules {', '.join(QUICK_METHODS)}")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def build_sweep_parser() -> argparse.ArgumentParser:
    from .sweep import PRESETS

    ap = argparse.ArgumentParser(prog="python -m llm_scale sweep",
                                 description="Tune every rule's learning rate on a validation split, then run every "
                                             "(rule, clients, partition, rank) cell for every seed. Resumable: re-run "
                                             "the same command and finished runs are skipped.")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="scaling",
                    help="scaling: the client-scaling study (README); dp: rules under per-client DP-SGD at "
                         "ε ∈ {no DP, 8, 3, 1}; smollm: the causal path; quick: minutes, the same code path")
    ap.add_argument("--out", type=Path, required=True, help="results root; runs go to OUT/llm_scale/<preset>/")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes, one torch thread each (2 on this machine)")
    ap.add_argument("--methods", nargs="+", help="only these rules (default: the preset's)")
    ap.add_argument("--seeds", nargs="+", type=int, help="only these evaluation seeds")
    ap.add_argument("--dry-run", action="store_true", help="list the cells, rounds and run counts, run nothing")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def _sweep(argv) -> int:
    from .config import METHODS
    from .sweep import PRESETS, run_sweep

    args = build_sweep_parser().parse_args(argv)
    bad = [m for m in args.methods or () if m not in METHODS]
    if bad:
        print(f"error: unknown method {bad[0]!r}; choose from {', '.join(METHODS)}", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"error: --jobs {args.jobs}; use 1 or more worker processes", file=sys.stderr)
        return 2
    run_sweep(PRESETS[args.preset], out=args.out, jobs=args.jobs, methods=args.methods, seeds=args.seeds,
              dry_run=args.dry_run, progress=not args.no_progress)
    return 0


def main(argv=None) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from fedlora.config import ConfigError

    from .config import load_config
    from .data import DataError
    from .models import ModelError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:
        try:
            return _sweep(argv[1:])
        except (ConfigError, DataError, ModelError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        flags = {"method": args.method, "clients": args.clients, "rank": args.rank, "seed": args.seed}
        overrides = {**_parse_set(args.set), **{k: v for k, v in flags.items() if v is not None}}
        if args.quick:
            return _quick(args, overrides)
        if args.resume and args.checkpoint_dir is None:
            raise ConfigError("--resume needs --checkpoint-dir (where the interrupted run wrote its checkpoints)")
        cfg = load_config(args.config, **overrides)
        from .run import run, run_filename

        out = args.out / run_filename(cfg)
        rec = run(cfg, out=out, checkpoint_dir=args.checkpoint_dir, resume=args.resume, export_dir=args.export,
                  progress=not args.no_progress)
    except (ConfigError, DataError, ModelError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _report(rec, out)
    return 0


def _report(rec: dict, out: Path) -> None:
    acc = rec["final_test_accuracy"]
    acc_s = f"{acc:.4f}" if acc is not None else f"none (diverged: {rec['diverged']})"
    print(f"{rec['method']} {rec['model']} {rec['task']} {rec['clients']} clients r{rec['rank']} seed {rec['seed']}: "
          f"test accuracy {acc_s}, {rec['client_steps']} client-steps in {rec['train_seconds']:.0f} s "
          f"({rec['client_steps_per_minute'] or 0:.0f}/min), peak {rec['peak_rss_mib']:.0f} MiB -> {out}")


def _quick(args, overrides) -> int:
    """Three rules on one federation: the model, data and cache are built once and shared."""
    import dataclasses

    from .config import load_config
    from .engine import Federation
    from .run import run, run_filename

    base = load_config(args.config, **{**QUICK, **{k: v for k, v in overrides.items() if k != "method"}})
    fed = None
    for method in QUICK_METHODS:
        cfg = dataclasses.replace(base, method=method)
        if fed is None:
            fed = Federation(cfg, progress=not args.no_progress)
        else:  # same data, model and cache; a fresh adapter state from the same seed
            fed.cfg = cfg
        out = args.out / run_filename(cfg)
        rec = run(cfg, out=out, federation=fed, progress=not args.no_progress)
        _report(rec, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
