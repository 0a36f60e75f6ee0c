"""Command line of the LLM tier.

    python -m llm_scale --config cpu-minilm-tweets --method rolora --clients 3 --rank 8 --seed 0 --out DIR
    python -m llm_scale --data reviews.csv --text-column review --label-column rating --out DIR   # your own file
    python -m llm_scale --config my.toml --set lr=1e-3 --set layers=[3,4,5] --out DIR --export DIR/adapter
    python -m llm_scale --quick --out results/reproduce/llm_scale   # what `make reproduce` runs (minutes)
    python -m llm_scale sweep --preset scaling --out results --jobs 2   # the client-scaling study (≈2 h)
    python -m llm_scale export CHECKPOINT_DIR_OR_RUN_JSON --out DIR     # a finished run's adapter, for peft

``--config`` takes a shipped config name (``llm_scale/configs/*.toml``) or a TOML file; every
``LLMConfig`` field can be overridden with ``--set key=value`` (TOML value syntax; a text field such as
``label_column`` keeps ``1`` as the text "1"); ``--data``, ``--text-column``, ``--label-column``,
``--label-map`` and ``--max-length`` are shortcuts for ``data_path`` (and task='table' when the config reads
the tweets), ``text_column``, ``label_column``, ``label_map``, ``max_length``. One JSON per run goes to
``DIR/<method>_<model>_..._seed<seed>[_<data stem>-<hash>].json``; ``--checkpoint-dir`` with ``--resume``
continues an interrupted run from its last round; ``--export`` (or the ``export`` subcommand, later) writes
the final global for ``PeftModel.from_pretrained``.
"""
from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path

QUICK_METHODS = ("fedavg", "ffa", "rolora")
# ≈150 client-steps per rule. LoRA on the top 3 of MiniLM's 6 blocks, so blocks 0-2 run once per row (the
# frozen-layer cache, shared by the three rules: each training row is seen 3 times, each test row 15), and
# the config's dtype "auto" (bf16 autocast where the CPU has AMX / AVX512-BF16). Issue 22: ≈3× faster than
# all 6 blocks in float32 on an AVX512-BF16 CPU, accuracy still clearly above the majority class.
QUICK = dict(clients=3, rounds=5, local_steps=10, eval_every=1, train_subset=2400, test_subset=300, lr=1e-3,
             layers=[3, 4, 5])


def _parse_set(items) -> dict:
    """``KEY=VALUE`` pairs, each VALUE in TOML syntax; a text field keeps what was typed unless it is a
    quoted TOML string (``label_column=1`` names the column "1", ``model='tiny-roberta'`` drops the quotes)."""
    from .config import TEXT_FIELDS

    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"error: --set {item!r}: write KEY=VALUE, e.g. --set lr=1e-3")
        key = key.strip()
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value  # a bare string
        out[key] = value.strip() if key in TEXT_FIELDS and not isinstance(parsed, str) else parsed
    return out


# flag -> config key: the names a user looks for first
SHORTCUTS = {"data": "data_path", "text_column": "text_column", "label_column": "label_column",
             "label_map": "label_map", "max_length": "max_length"}


def _shortcuts(args, config: str, overrides: dict) -> dict:
    """The shortcut flags as config overrides; ``--data`` also selects task='table' when the config
    (and ``--set``) would read the shipped tweets."""
    from .config import load_config

    out = {key: getattr(args, flag) for flag, key in SHORTCUTS.items() if getattr(args, flag) is not None}
    if "data_path" in out:
        out["data_path"] = str(out["data_path"])
        if "task" not in overrides and load_config(config).task == "tweets":
            out["task"] = "table"
    return out


from .quiet import KNOWN_HARMLESS, quiet_known_warnings  # noqa: E402,F401  (re-exported)


def build_parser() -> argparse.ArgumentParser:
    from fedlora import rule_names

    from .config import CENTRALISED, config_names

    ap = argparse.ArgumentParser(prog="python -m llm_scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="subcommands: `python -m llm_scale sweep --help` (the client-scaling study), "
                                        "`python -m llm_scale export --help` (a finished run's adapter)")
    ap.add_argument("--config", default="cpu-minilm-tweets", help=f"a TOML file or one of: {', '.join(config_names())}")
    ap.add_argument("--method", choices=rule_names() + [CENTRALISED], help="the server rule (or centralised)")
    ap.add_argument("--clients", type=int)
    ap.add_argument("--rank", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any config field")
    ap.add_argument("--data", type=Path, metavar="PATH",
                    help="your .csv/.tsv/.jsonl file (data_path; sets task='table' unless the config names "
                         "another task), or the folder of GLUE TSVs / the commonsense JSONL of those tasks")
    ap.add_argument("--text-column", metavar="NAME", help="the column holding the text (text_column; default 'text')")
    ap.add_argument("--label-column", metavar="NAME",
                    help="the column holding the label (label_column; default 'label'); its values are class names, "
                         "numbers too, in natural order (1 < 2 < 10)")
    ap.add_argument("--label-map", metavar="RULES",
                    help="fewer classes (label_map), e.g. '1-4:neg,5-6:mid,7-10:pos': SOURCE:CLASS rules, SOURCE a "
                         "label value or an inclusive range LO-HI; classes in the order the rules name them")
    ap.add_argument("--max-length", type=int, metavar="TOKENS",
                    help="tokens kept per text (max_length); a run warns when it cuts more than 5%% of the rows")
    ap.add_argument("--out", type=Path, required=True, help="directory for the run's JSON")
    ap.add_argument("--checkpoint-dir", type=Path)
    ap.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    ap.add_argument("--export", type=Path, metavar="DIR", help="save the final global model (peft save_pretrained); "
                    "for a finished run: `python -m llm_scale export CHECKPOINT_DIR --out DIR`")
    ap.add_argument("--quick", action="store_true",
                    help=f"the quick reproduction: MiniLM on the tweets, 3 clients, rules {', '.join(QUICK_METHODS)}")
    ap.add_argument("--shape-check", action="store_true",
                    help="the config's architecture at full layer shapes, random weights, one round of 2 clients x "
                         "1 step of every rule (or --method) on the CPU (llm_scale/shapecheck.py)")
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


def build_export_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m llm_scale export",
                                 description="Write a finished run's final global model as a peft adapter folder "
                                             "(PeftModel.from_pretrained / AutoPeftModelForSequenceClassification "
                                             "load it; config.json holds the labels).")
    ap.add_argument("source", type=Path, metavar="RUN_OR_CHECKPOINT",
                    help="the run's --checkpoint-dir, or its run JSON (which names the checkpoint directory)")
    ap.add_argument("--out", type=Path, required=True, help="the adapter folder to write")
    ap.add_argument("--data", type=Path, metavar="PATH",
                    help="where the run's data file is now, if it moved (its content hash must match)")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def _export(argv) -> int:
    from .export import export_run

    args = build_export_parser().parse_args(argv)
    folder, rec = export_run(args.source, args.out, data_path=args.data, progress=not args.no_progress)
    labels = rec.get("labels") or {}
    print(f"{rec['method']} {rec['model']} {rec['task']}, rounds done: {rec['rounds_done']}, "
          f"labels: {', '.join(labels.get('names', ())) or '(none)'} -> {folder}")
    return 0


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

    quiet_known_warnings()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["sweep"], ["export"]):
        try:
            return (_sweep if argv[0] == "sweep" else _export)(argv[1:])
        except (ConfigError, DataError, ModelError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        overrides = cli_overrides(args)
        if args.quick:
            return _quick(args, overrides)
        if args.shape_check:
            from .shapecheck import main as shape_main

            return shape_main(load_config(args.config, **{k: v for k, v in overrides.items() if k != "method"}),
                              out=args.out, method=args.method, batch_size=overrides.get("batch_size"),
                              max_length=overrides.get("max_length"), progress=not args.no_progress)
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


def cli_overrides(args) -> dict:
    """The config overrides of a parsed command line: ``--set``, then the flags (flags win)."""
    flags = {"method": args.method, "clients": args.clients, "rank": args.rank, "seed": args.seed}
    overrides = {**_parse_set(args.set), **{k: v for k, v in flags.items() if v is not None}}
    overrides.update(_shortcuts(args, args.config, overrides))
    return overrides


def _report(rec: dict, out: Path) -> None:
    acc, base = rec["final_test_accuracy"], rec.get("majority_class_test_accuracy")
    acc_s = f"{acc:.4f}" if acc is not None else f"none (diverged: {rec['diverged']})"
    if base is not None:
        acc_s += f" (always {rec['labels']['majority_class']!r}: {base:.4f})"
    rate = rec["client_steps_per_minute"]
    here = rec.get("client_steps_this_process", rec["client_steps"])
    speed = f"{rate:.0f}/min" if rate is not None else "none ran here: the checkpoint was finished"
    print(f"{rec['method']} {rec['model']} {rec['task']} {rec['clients']} clients r{rec['rank']} seed {rec['seed']}: "
          f"test accuracy {acc_s}, {rec['client_steps']} client-steps, {here} in this process in "
          f"{rec['train_seconds']:.0f} s ({speed}), peak {rec['peak_rss_mib']:.0f} MiB -> {out}")


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
