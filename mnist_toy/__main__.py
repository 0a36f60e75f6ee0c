"""Command line.

    python -m mnist_toy --method rolora --partition labels --clients 10 --rank 8 --rounds 100 --seed 0 --out DIR
    python -m mnist_toy --config exp.toml --set local_epochs=5 --out DIR
    python -m mnist_toy sweep --preset main --out results          # the full 5-seed main table
    python -m mnist_toy sweep --quick --out results                # minutes: what `make reproduce` runs

Every ToyConfig field is a flag (``--local-epochs 5``); ``--config`` reads a TOML file first (unknown
keys are errors). A single run writes ``DIR/<method>_r<rank>_<work>_lr<lr>_seed<seed>.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tomllib
import typing
from pathlib import Path

from fedlora.config import ConfigError, from_mapping

from .config import ToyConfig
from .data import load_mnist


def _add_config_flags(ap: argparse.ArgumentParser) -> None:
    from .config import METHODS, PARTITIONS

    hints = typing.get_type_hints(ToyConfig)
    choices = {"method": METHODS, "partition": PARTITIONS}
    for f in dataclasses.fields(ToyConfig):
        t = hints[f.name]
        flag = "--" + f.name.replace("_", "-")
        if f.name in choices:
            ap.add_argument(flag, choices=choices[f.name], default=None)
        elif t is bool:
            ap.add_argument(flag, type=lambda v: v.lower() in ("1", "true", "yes"), default=None, metavar="BOOL")
        elif t in (int, float, str):
            ap.add_argument(flag, type=t, default=None)
        else:  # Optional[float]
            ap.add_argument(flag, type=float, default=None)


def _data_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data-dir", type=Path, default=None, help="folder with torchvision MNIST/raw idx files")
    ap.add_argument("--cache-dir", type=Path, default=None, help="where the .npz cache goes (default ~/.cache/fedlora)")


def _parse_set(items) -> dict:
    out = {}
    for item in items or []:
        k, _, v = item.partition("=")
        out[k.strip()] = tomllib.loads(f"v = {v}")["v"] if v.strip() else ""
    return out


def main_run(argv) -> None:
    ap = argparse.ArgumentParser(prog="python -m mnist_toy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="subcommand: `python -m mnist_toy sweep --help` (tuned sweeps: main, rank, paper, quick)")
    ap.add_argument("--out", type=Path, required=True, help="directory for the run's JSON")
    ap.add_argument("--config", type=Path, default=None, help="TOML file of ToyConfig fields")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any field (TOML value syntax)")
    ap.add_argument("--checkpoint-dir", type=Path, default=None)
    ap.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    _data_flags(ap)
    _add_config_flags(ap)
    a = ap.parse_args(argv)
    fields = {}
    if a.config is not None:
        with open(a.config, "rb") as f:
            fields.update(tomllib.load(f))
    fields.update(_parse_set(a.set))
    for f in dataclasses.fields(ToyConfig):
        v = getattr(a, f.name)
        if v is not None:
            fields[f.name] = v
    cfg = from_mapping(ToyConfig, fields)
    from .run import run, run_filename

    out = a.out / run_filename(cfg)
    rec = run(cfg, data=load_mnist(data_dir=a.data_dir, cache_dir=a.cache_dir), out=out,
              checkpoint_dir=a.checkpoint_dir, resume=a.resume)
    print(f"{cfg.method} {cfg.setting} {cfg.local_work} r{cfg.rank} seed {cfg.seed}: final test accuracy "
          f"{rec['final_test_accuracy']:.4f} ({rec['wall_seconds']:.1f}s) -> {out}")


def main_sweep(argv) -> None:
    from .sweep import PRESETS, run_sweep

    ap = argparse.ArgumentParser(prog="python -m mnist_toy sweep")
    ap.add_argument("--out", type=Path, required=True, help="results root; JSONs go to OUT/mnist_toy/<preset>/…")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="main")
    ap.add_argument("--quick", action="store_true", help="same as --preset quick")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--methods", nargs="+", default=None)
    ap.add_argument("--dry-run", action="store_true", help="list the cells without running")
    _data_flags(ap)
    a = ap.parse_args(argv)
    from .config import METHODS

    bad = [m for m in a.methods or () if m not in METHODS]
    if bad:
        raise ConfigError(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
    sweep = PRESETS["quick" if a.quick else a.preset]
    data = None if a.dry_run else load_mnist(data_dir=a.data_dir, cache_dir=a.cache_dir)
    run_sweep(sweep, out=a.out, data=data, seeds=tuple(a.seeds) if a.seeds else None,
              methods=tuple(a.methods) if a.methods else None, dry_run=a.dry_run)


def main(argv=None) -> int:
    """Bad arguments, configs or data print one line naming the problem and the fix, exit status 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv and argv[0] == "sweep":
            main_sweep(argv[1:])
        else:
            main_run(argv[1:] if argv and argv[0] == "run" else argv)
    except (ConfigError, FileNotFoundError, tomllib.TOMLDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
