"""What a fedlora ServerApp prints and writes: one JSON line per round as the round ends (skipped
rounds and dropped clients included), a line when a run resumes, the results path at the end.

Flower streams a ServerApp's standard output (``flwr run --stream``, ``flwr log``), so each line is
flushed as soon as it is written.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional

from safetensors.torch import save_file

from ..checkpoint import atomic_write_json, state_to_tensors
from ..loop import State

__all__ = ["round_line", "resumed_line", "print_line", "write_results"]

_KEYS = ("round", "clients", "trains", "eval", "total_uplink_bytes", "total_downlink_bytes")


def round_line(record: Mapping) -> str:
    """A round's history record as one JSON line: who trained, what, the evaluation, the bytes; why
    clients were dropped (``rejected``: client, node, reason) and, when the global was kept, why
    (``skipped``)."""
    line = {k: record[k] for k in _KEYS if k in record}
    if "train" in record and record["train"]:
        line["train"] = record["train"]
    if record.get("rejected"):
        line["rejected"] = [{k: e.get(k) for k in ("client", "node", "error")} for e in record["rejected"]]
    if record.get("skipped"):
        line["skipped"] = record["skipped"]
    return json.dumps(line)


def resumed_line(checkpoint_dir: Path, start_round: int, rounds: int) -> str:
    return json.dumps({"resumed": str(checkpoint_dir), "rounds_done": start_round, "rounds": rounds})


def print_line(line: str) -> None:
    print(line, flush=True)


def write_results(out: Path, state: State, history: list, extra: Optional[Mapping] = None) -> Path:
    """``out/history.json`` (the history and ``extra``) and ``out/state.safetensors`` (the final global);
    returns the absolute folder."""
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    tensors, meta = state_to_tensors(state)
    save_file(tensors, str(out / "state.safetensors"))
    atomic_write_json(out / "history.json", {"history": history, "matrices": meta, **(extra or {})})
    return out
