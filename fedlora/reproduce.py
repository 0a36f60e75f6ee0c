"""``make reproduce``: the quick reproduction of every tier that has landed, then figures and the
benchmark report. Each step runs as its own process; the summary says what was written."""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

STEPS = [  # (name, module that must exist, arguments after `python -m`)
    ("theory", "linear_theory.__main__", ["linear_theory", "--quick", "--out", "{out}/theory"]),
    ("mnist_toy", "mnist_toy.__main__", ["mnist_toy", "sweep", "--quick", "--out", "{out}"]),
    ("llm_scale", "llm_scale.__main__", ["llm_scale", "--quick", "--out", "{out}/llm_scale"]),
    ("bench", "fedlora.bench", ["fedlora.bench", "--quick", "--out", "{out}/bench"]),
    ("figures", "figures.__main__", ["figures", "--results", "{out}", "--out", "{out}/figures"]),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("results/reproduce"))
    ap.add_argument("--only", nargs="*", help="run only these steps")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    summary, failed = [], False
    for name, module, cmd in STEPS:
        if args.only and name not in args.only:
            continue
        if importlib.util.find_spec(module.rsplit(".", 1)[0]) is None or _missing(module):
            summary.append((name, "not landed yet, skipped", 0.0, 0.0))
            continue
        print(f"\n=== {name}: python -m {' '.join(cmd).format(out=args.out)}", flush=True)
        t0, c0 = time.perf_counter(), _children_cpu()
        rc = subprocess.call([sys.executable, "-m"] + [c.format(out=args.out) for c in cmd])
        dt, cpu = time.perf_counter() - t0, _children_cpu() - c0
        failed |= rc != 0
        summary.append((name, "ok" if rc == 0 else f"FAILED (exit {rc})", dt, cpu))
    print("\n=== reproduce summary (wall time; CPU time, which a busy machine does not inflate)")
    for name, status, dt, cpu in summary:
        print(f"  {name:10s} {status:28s} {dt:7.1f} s   CPU {cpu:7.1f} s")
    print(f"  {'all steps':10s} {'':28s} {sum(s[2] for s in summary):7.1f} s   CPU {sum(s[3] for s in summary):7.1f} s")
    files = sorted(p for p in args.out.rglob("*") if p.is_file())
    print(f"  {len(files)} files under {args.out}/:")
    by_dir: dict = {}
    for p in files:
        by_dir.setdefault(p.parent, []).append(p)
    for d, ps in by_dir.items():
        if len(ps) <= 4:
            for p in ps:
                print(f"    {p}")
        else:
            kinds = ", ".join(sorted({p.suffix for p in ps}))
            print(f"    {d}/  ({len(ps)} files: {kinds})")
    return 1 if failed else 0


def _children_cpu() -> float:
    """User + system CPU seconds of the finished child processes so far."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _missing(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is None
    except ModuleNotFoundError:
        return True


if __name__ == "__main__":
    sys.exit(main())
