"""What the compute dtype resolves to on this machine: ``dtype = "auto"`` means bf16 autocast where the
hardware runs bf16 natively, float32 elsewhere -- detected, never guessed.

- **CPU**: native bf16 means the CPU flags ``amx_bf16`` (Intel AMX) or ``avx512_bf16`` (AVX512-BF16;
  AMD Zen 4 and later, Intel Cooper Lake and later), read from ``/proc/cpuinfo`` on Linux. Elsewhere
  (no ``/proc/cpuinfo``: macOS, Windows) the flags are unknown and ``auto`` is float32. On an
  AVX2-only CPU bf16 autocast emulates the arithmetic: a MiniLM step measured 11× slower there.
- **CUDA**: ``auto`` is bf16 when ``torch.cuda.is_bf16_supported()`` (Ampere and later), else float32;
  an explicit ``"bfloat16"`` / ``"float32"`` is used as configured.

The weights, the LoRA factors and the optimizer state stay float32 in every case: bf16 is autocast of
the forward and backward only.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

__all__ = ["DTYPES", "cpu_bf16", "resolve_dtype", "capability"]

DTYPES = ("auto", "float32", "bfloat16")
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def _cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> Optional[set[str]]:
    """The CPU's feature flags (the first ``flags`` line), or ``None`` where they cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / ARM
            return set(value.split())
    return None


@functools.lru_cache(maxsize=None)
def cpu_bf16(cpuinfo: str = "/proc/cpuinfo") -> dict:
    """``{"native_bf16": bool | None, "flags": [the bf16 flags present], "source": ...}``; ``None``
    when the flags cannot be read (then ``auto`` stays float32)."""
    flags = _cpu_flags(Path(cpuinfo))
    if flags is None:
        return {"native_bf16": None, "flags": [], "source": "unknown (no /proc/cpuinfo)"}
    present = [f for f in BF16_FLAGS if f in flags]
    return {"native_bf16": bool(present), "flags": present, "source": "/proc/cpuinfo"}


def resolve_dtype(dtype: str, device: str, *, cpuinfo: str = "/proc/cpuinfo") -> str:
    """``"float32"`` or ``"bfloat16"``: what ``dtype`` (``auto`` / ``float32`` / ``bfloat16``) means on
    ``device`` (``"cpu"`` or ``"cuda"``)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; use one of {', '.join(DTYPES)}")
    if dtype != "auto":
        return dtype
    if device == "cuda":
        import torch

        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if cpu_bf16(cpuinfo)["native_bf16"] else "float32"


def capability(device: str) -> dict:
    """What a run record says about the hardware's bf16: the CPU flags (or the GPU), and torch's own
    view of the CPU's vector ISA."""
    import torch

    out = {"device": device, "cpu": cpu_bf16()}
    try:
        out["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # older torch
        out["torch_cpu_capability"] = None
    if device == "cuda":
        out["cuda_bf16"] = bool(torch.cuda.is_bf16_supported())
        out["gpu"] = torch.cuda.get_device_name()
    return out
