"""Full-shape checks of the GPU configs on a CPU: ``python -m llm_scale --config NAME --shape-check --out DIR``.

The published-setting configs (``roberta-large-*``, ``llama2-7b-commonsense``) need downloaded weights
and a GPU, so before this they had only run on tiny models. The check builds the config's architecture
from a config object, with random weights (nothing downloaded): **RoBERTa-Large at its real size**
(24 blocks, hidden 1024, 16 heads, MLP 4096, vocabulary 50,265) and **Llama-2-7B's real layer shapes**
(hidden 4096, 32 heads, 32 key/value heads -- the 7B model has no GQA --, MLP 11,008, vocabulary 32,000)
with the number of blocks cut to what fits (``blocks``, default 2: block 0 frozen, so the causal
frozen-layer cache runs, and block 1 adapted; the config's LoRA targets, head and scoring path
unchanged). Data: the config's own loader on a small synthetic file in the task's layout (GLUE TSVs,
BoolQ JSONL) whose texts fill ``max_length``.

For every rule, one round of 2 clients × 1 step, then:

- no shape error, and every global finite;
- FedEx-LoRA and FLoRA: the model's merged weight plus the global adapter equals the dense formula
  ``W0 + Σ p_k s_k B_k A_k`` on the real shapes (float64 reference);
- the export (``export.export_global``) loads in plain peft (``PeftModel.from_pretrained``) and gives
  the engine's logits (full-weight rules export the whole model with ``save_pretrained``: not an
  adapter, not checked here);
- peak resident memory of the round, against the config header's estimate scaled to the blocks built,
  and extrapolated to the whole model.

Slow: RoBERTa-Large ≈5 minutes, the cut Llama ≈10 minutes on one CPU thread here (GaLore's projector is
an SVD of each 4096 × 4096 gradient, ≈40 s apiece); tests: ``tests/test_llm_shapes.py`` (slow tier).
"""
from __future__ import annotations

import csv
import dataclasses
import gc
import json
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from fedlora.config import ConfigError

from .config import LLMConfig

__all__ = ["ARCH", "shape_check", "main"]

# The published architectures as config-object overrides of the tiny models (transformers' defaults for
# the rest: RoBERTa-Large's config.json and Llama-2-7B's config.json agree with these numbers).
ARCH = {
    "roberta": ("tiny-roberta", dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16,
                                     intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1,
                                     layer_norm_eps=1e-5, vocab_size=50265), 24),
    "llama": ("tiny-llama", dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008,
                                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                                 rms_norm_eps=1e-5, vocab_size=32000, tie_word_embeddings=False), 32),
}
# Each header's memory estimate for its whole model (fp32 weights; bf16 is autocast only), in GB.
HEADER_ESTIMATE_GB = {"roberta": 1.4, "llama": 27.0}
WORDS = ("the cat sat on a mat while rain fell over quiet hills and every river ran to the sea "
         "because people said that nothing would change before the long winter came").split()


def _family(cfg: LLMConfig) -> str:
    if cfg.kind == "classification" and cfg.task.startswith("glue-"):
        return "roberta"
    if cfg.kind == "causal" and cfg.task == "commonsense":
        return "llama"
    raise ConfigError(f"--shape-check knows the RoBERTa-Large GLUE and Llama-2-7B commonsense configs; "
                      f"{cfg.model!r} on {cfg.task!r} is neither")


def _text(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS, n))


def _write_data(cfg: LLMConfig, folder: Path, rows: int, seed: int) -> dict:
    """A small synthetic file in the task's own layout; returns the config fields pointing at it."""
    from .data import GLUE_TASKS

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    n_words = cfg.max_length  # ≥ max_length tokens: every row is truncated to the full length
    if cfg.task.startswith("glue-"):
        spec = GLUE_TASKS[cfg.task[len("glue-"):]]
        d = folder / "glue" / spec.folder
        d.mkdir(parents=True, exist_ok=True)
        cols = [spec.text] + ([spec.text_b] if spec.text_b else []) + [spec.label]
        for name, n in (("train.tsv", rows), (spec.dev_file, max(4, rows // 4))):
            with open(d / name, "w", newline="") as f:
                w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
                w.writerow(cols)
                for i in range(n):
                    texts = [_text(rng, n_words // (2 if spec.text_b else 1)) for _ in cols[:-1]]
                    w.writerow(texts + [spec.raw_labels[i % len(spec.raw_labels)]])
        return {"data_path": str(folder / "glue")}
    if cfg.commonsense_task != "boolq":
        raise ConfigError(f"--shape-check writes BoolQ-layout data; set commonsense_task='boolq' "
                          f"(got {cfg.commonsense_task!r})")
    path = folder / "boolq.jsonl"
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"question": _text(rng, 8), "passage": _text(rng, n_words), "answer": bool(i % 2)}) + "\n")
    return {"data_path": str(path)}


class _PeakRss:
    """Peak resident memory (MiB) while inside, sampled every 20 ms from /proc/self/status."""

    def __enter__(self):
        self.peak, self._stop = _rss_mib(), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _rss_mib())


def _release() -> None:
    """Free what the last rule held and hand it back to the OS (glibc keeps freed heap pages mapped
    otherwise, and the next rule's peak RSS would include them)."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    from .run import peak_rss_mib

    return peak_rss_mib()


def _round(rcfg: LLMConfig, tiny: dict, *, splits=None, cache=None, record=None):
    """Build the Federation and run one round; returns (fed, result)."""
    from fedlora.config import FedConfig
    from fedlora.loop import run_federated

    from .engine import Federation

    fed = Federation(rcfg, splits=splits, cache=cache, tiny=tiny)
    train = fed.local_train
    if record is not None:
        def train(task, _inner=fed.local_train):
            res = _inner(task)
            record.append(res)
            return res
    ranks, scales = fed.client_ranks()
    res = run_federated(FedConfig(rule=fed.rule, rounds=1, num_clients=fed.num_clients, seed=rcfg.seed),
                        init=fed.init_state(), local_train=train, evaluate=fed.evaluate, client_ranks=ranks,
                        client_scales=scales, on_round_start=fed.on_round_start,
                        local_optimizers=("default", "galore"), progress=False)
    return fed, res


def _probe(cfg_fields: dict, tiny: dict) -> float:
    """Peak RSS (MiB) of a fresh process that builds the model and runs the round (a worker's job)."""
    import os

    from .quiet import quiet_known_warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quiet_known_warnings()
    torch.set_num_threads(1)
    cfg = LLMConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_fields.items()})
    with _PeakRss() as mem:
        _round(cfg, tiny)
    return mem.peak


def _peak_in_fresh_process(rcfg: LLMConfig, tiny: dict) -> float:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        return ex.submit(_probe, dataclasses.asdict(rcfg), tiny).result()


def _rules(cfg: LLMConfig, only: Optional[str]) -> list[str]:
    from fedlora import rule_names

    names = [only] if only else list(rule_names())
    out = []
    for r in names:
        try:
            dataclasses.replace(cfg, method=r)
        except ConfigError:  # e.g. head-only on a causal model
            continue
        out.append(r)
    return out


def _merge_error(fed, res, seen) -> float:
    """max |W_model + s B A − (W0 + Σ p_k s_k B_k A_k)| over the targeted matrices (float64)."""
    n_k = torch.tensor([float(r.num_samples) for r in seen], dtype=torch.float64)
    p = n_k / n_k.sum()
    fed.bridge.merge_bases(res.state)
    worst = 0.0
    for name in fed.bridge.names:
        ref = fed.bridge.pristine_weight(name).double()
        for pk, r in zip(p, seen):
            ref += pk * r.params[name].delta().double()
        g = res.state[name]
        w = fed.bridge.frozen_weight(name).double()
        if g.lora is not None:
            w = w + g.lora.delta().double()
        worst = max(worst, float((w - ref).abs().max()))
        del ref, w
    return worst


def _export_error(fed, state, folder: Path) -> float:
    """Export the global, load it into a freshly built base with plain peft, compare the logits."""
    from peft import PeftModel

    from fedlora.seeding import derive_seed

    from .export import export_global
    from .models import load_model

    export_global(fed, state, folder)
    num_labels = None if fed.cfg.kind == "causal" else len(fed.splits.train.label_names)
    base, _, _ = load_model(fed.cfg.model, kind=fed.cfg.kind, num_labels=num_labels,
                            seed=derive_seed(fed.cfg.seed, "model"), tiny=fed.tiny)
    ids = torch.tensor([[fed.pad_id + 5 + i for i in range(12)]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        bare = base(**batch).logits.float()  # the base model, before the adapter is loaded into it
    reloaded = PeftModel.from_pretrained(base, folder).eval()
    fed.bridge.load(state, trains="")
    fed.model.eval()
    with torch.no_grad():
        ours, theirs = fed.model(**batch).logits.float(), reloaded(**batch).logits.float()
    del reloaded, base
    return float((ours - theirs).abs().max()), float((ours - bare).abs().max())


def shape_check(cfg: LLMConfig, *, workdir: Path, blocks: Optional[int] = None, method: Optional[str] = None,
                clients: int = 2, batch_size: Optional[int] = None, max_length: Optional[int] = None,
                progress: bool = True) -> dict:
    """One round of ``clients`` clients × 1 step of every rule (or ``method``) on the config's
    architecture at full layer shapes; returns the report (``ok`` False if any check failed).

    The weight shapes do not depend on the batch: by default a step is ``min(batch_size, 4)`` rows of
    ``min(max_length, 64)`` tokens (a full RoBERTa-Large batch of 32 × 128 is ≈1 minute a step on one
    CPU thread); pass the config's own to check activations at the published batch shape too."""
    from .hardware import resolve_dtype

    fam = _family(cfg)
    source, arch, full_blocks = ARCH[fam]
    blocks = blocks or (full_blocks if fam == "roberta" else 2)
    adapted_full = [i for i in (cfg.layers or range(full_blocks))]
    if blocks < full_blocks:  # keep the frozen-below / adapted-above structure: block 0 frozen, the rest adapted
        layers = tuple(range(1, blocks)) if min(adapted_full) > 0 else tuple(range(blocks))
    else:
        layers = tuple(adapted_full)
    tiny = {**arch, "num_hidden_layers": blocks}
    cfg = dataclasses.replace(cfg, batch_size=batch_size or min(cfg.batch_size, 4),
                              max_length=max_length or min(cfg.max_length, 64))
    workdir = Path(workdir)
    rows = max(16, clients * cfg.batch_size * 2)
    data = _write_data(cfg, workdir / "data", rows, seed=cfg.seed)
    dtype = cfg.dtype if cfg.dtype != "bfloat16" or resolve_dtype("auto", "cpu") == "bfloat16" else "float32"
    base = dataclasses.replace(cfg, model=source, layers=layers, clients=clients, rounds=1, local_steps=1,
                               partition="iid", total_samples=0, eval_every=1, device="cpu", dtype=dtype,
                               test_subset=4, **data)
    report = {"config": cfg.model, "family": fam, "task": cfg.task, "architecture": tiny,
              "blocks_built": blocks, "blocks_full": full_blocks, "adapted_blocks": list(layers),
              "adapted_blocks_full": adapted_full, "targets": list(cfg.targets), "rank": cfg.rank,
              "batch_size": cfg.batch_size, "max_length": cfg.max_length, "dtype": dtype,
              "clients": clients, "local_steps": 1, "rules": {}}
    from .models import get_layers

    splits = cache = None
    params_built = block_params = None
    for rule in _rules(base, method):
        t0 = time.perf_counter()
        rcfg = dataclasses.replace(base, method=rule, client_ranks=(cfg.rank, max(1, cfg.rank // 2))
                                   if rule in ("flexlora", "flora") else ())
        out: dict = {}
        try:
            seen: list = []
            fed, res = _round(rcfg, tiny, splits=splits, cache=cache, record=seen)
            splits, cache = fed.splits, fed.cache
            if params_built is None:  # the model as loaded (tied weights once; no adapter, no head copy)
                params_built = fed.spec.num_parameters
                block = get_layers(fed.model, fed.spec)[0]
                block_params = sum(p.numel() for n, p in block.named_parameters() if "lora_" not in n)
                report["target_shapes"] = {n.split(".")[-1]: list(fed.bridge.shape(n)) for n in fed.bridge.names}
            if rule in ("fedavg", "full"):  # peak memory: a LoRA rule and a dense one, each in a fresh process
                out["peak_rss_mib"] = _peak_in_fresh_process(rcfg, tiny)
            h = res.history[-1]
            out["train_loss"] = h["train"].get("train_loss")
            out["test_accuracy"] = h.get("eval", {}).get("test_accuracy")
            out["finite"] = all(bool(torch.isfinite(g.effective_delta()).all()) if hasattr(g, "effective_delta")
                                else bool(torch.isfinite(g).all()) for g in res.state.values())
            out["rejected"] = h["rejected"]
            if rule in ("fedex", "flora"):
                out["merge_max_abs_error"] = _merge_error(fed, res, seen)
            if not rule.startswith("full"):
                out["export_max_abs_logit_error"], out["adapter_effect_on_logits"] = _export_error(
                    fed, res.state, workdir / f"export-{rule}")  # the effect: what a lost adapter would miss
            out["ok"] = (out["finite"] and not out["rejected"] and out.get("merge_max_abs_error", 0.0) <= 1e-5
                         and out.get("export_max_abs_logit_error", 0.0) <= 1e-3)
        except Exception as err:  # a shape error (or any other) fails this rule; the others still run
            out.update(ok=False, error=f"{type(err).__name__}: {err}")
        out["seconds"] = time.perf_counter() - t0
        report["rules"][rule] = out
        if progress:
            extra = "".join(f", {k} {out[k]:.2e}" for k in ("merge_max_abs_error", "export_max_abs_logit_error",
                                                             "adapter_effect_on_logits") if k in out)
            peak = f", peak {out['peak_rss_mib']:.0f} MiB (fresh process)" if "peak_rss_mib" in out else ""
            print(f"{rule:13s} {'ok' if out['ok'] else 'FAILED'}{peak}"
                  f"{extra}{', ' + out['error'] if 'error' in out else ''} ({out['seconds']:.0f} s)", flush=True)
        fed = res = seen = None
        _release()
    if params_built is not None:
        report["parameters_full_model"] = params_built + (full_blocks - blocks) * block_params
    report["memory"] = _memory(report, fam, params_built)
    report["ok"] = bool(report["rules"]) and all(r["ok"] for r in report["rules"].values())
    return report


def _memory(report: dict, fam: str, params_built: Optional[int]) -> dict:
    """Peak RSS of the LoRA rules against the header's estimate scaled to the model built, and the
    peak extrapolated to the whole model (the weights of the blocks not built added at fp32)."""
    if not params_built:
        return {}
    full = report["parameters_full_model"]
    est_full = HEADER_ESTIMATE_GB[fam]
    est_built = est_full * params_built / full
    lora = [r["peak_rss_mib"] for k, r in report["rules"].items() if "peak_rss_mib" in r and not k.startswith("full")]
    dense = [r["peak_rss_mib"] for k, r in report["rules"].items() if "peak_rss_mib" in r and k.startswith("full")]
    out = {"header_estimate_gb_full_model": est_full, "parameters_full_model": full, "parameters_built": params_built,
           "header_estimate_gb_scaled_to_built": est_built}
    if lora:
        peak = max(lora) / 1024
        out.update(peak_gb_lora_rules=peak, peak_over_estimate_lora_rules=peak / est_built,
                   extrapolated_peak_gb_full_model_lora_rules=peak + 4 * (full - params_built) / 2**30)
    if dense:
        peak = max(dense) / 1024
        a_full, a_built = len(report["adapted_blocks_full"]), len(report["adapted_blocks"])
        extra = max(0.0, peak - (max(lora) / 1024 if lora else est_built))
        out.update(peak_gb_full_rules=peak, extrapolated_peak_gb_full_model_full_rules=(
            peak + 4 * (full - params_built) / 2**30 + extra * (a_full / a_built - 1)))
    return out


def main(cfg: LLMConfig, *, out: Path, method: Optional[str] = None, blocks: Optional[int] = None,
         batch_size: Optional[int] = None, max_length: Optional[int] = None, progress: bool = True) -> int:
    import tempfile

    from fedlora.checkpoint import atomic_write_json

    with tempfile.TemporaryDirectory(prefix="shape-check-") as tmp:
        report = shape_check(cfg, workdir=Path(tmp), method=method, blocks=blocks, batch_size=batch_size,
                             max_length=max_length, progress=progress)
    name = Path(cfg.model).name
    path = Path(out) / f"shape_check_{name}_{cfg.task}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    from fedlora.provenance import provenance

    atomic_write_json(path, {**report, **provenance()})
    m = report["memory"]
    if m:
        print(f"peak memory: LoRA rules {m.get('peak_gb_lora_rules', float('nan')):.2f} GB against the header's "
              f"{m['header_estimate_gb_full_model']:g} GB scaled to the model built "
              f"({m['header_estimate_gb_scaled_to_built']:.2f} GB); whole model ≈ "
              f"{m.get('extrapolated_peak_gb_full_model_lora_rules', float('nan')):.1f} GB (LoRA), "
              f"{m.get('extrapolated_peak_gb_full_model_full_rules', float('nan')):.1f} GB (full rules)")
    print(f"shape check {'passed' if report['ok'] else 'FAILED'} -> {path}")
    return 0 if report["ok"] else 1
