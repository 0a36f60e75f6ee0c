"""Regenerate every figure from result files: ``python -m figures --results results --out results/figures``."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

MODULES = ("figures.theory", "figures.mnist", "figures.bench", "figures.llm", "figures.dp", "figures.averaging",
           "figures.regimes")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", type=Path, default=Path("results"))
    ap.add_argument("--out", type=Path, default=None, help="default: RESULTS/figures")
    args = ap.parse_args(argv)
    out = args.out or args.results / "figures"
    total = 0
    for name in MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:
                print(f"{name}: not built yet, skipped")
                continue
            raise
        written = mod.make_all(args.results, out)
        total += len(written)
        print(f"{name}: {len(written)} files" + ("" if written else f" (no results under {args.results})"))
        for p in written:
            print(f"  {p}")
    print(f"wrote {total} figure files to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
