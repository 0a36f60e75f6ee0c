"""A user's own CSV, end to end (issue 21): the flags a user expects (and errors that name only real
flags), labels as names, the truncation warning, export of a finished run that plain peft loads,
record names and speeds, the README's user's guide on a tiny real model."""
from __future__ import annotations

import ast
import csv
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedlora.config import ConfigError  # noqa: E402
from llm_scale.__main__ import main  # noqa: E402
from llm_scale.config import load_config  # noqa: E402
from llm_scale.data import DataError, load_table  # noqa: E402

LLM_SCALE = Path(__file__).resolve().parents[1] / "llm_scale"
WORDS = {"neg": ["bad", "awful", "sad", "poor", "worst"], "mid": ["okay", "fine", "plain", "average", "fair"],
         "pos": ["good", "great", "happy", "best", "lovely"]}
STARS = "1-4:neg,5-6:mid,7-10:pos"


def reviews(path: Path, n: int = 90, long_every: int = 6) -> Path:
    """Drug-review-like rows: a 1..10 star rating whose words tell its class; every ``long_every``-th
    review is long (≈45 tokens, beyond a max_length of 16)."""
    rng = np.random.default_rng(0)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "rating"])
        for i in range(n):
            star = i % 10 + 1
            cls = "neg" if star <= 4 else "mid" if star <= 6 else "pos"
            text = " ".join(rng.choice(WORDS[cls], 4)) + f" item {i}"
            if i % long_every == 0:
                text += ", and then " + " ".join(rng.choice(WORDS[cls], 36))
            w.writerow([text, star])
    return path


# ---------------------------------------------------------------- errors name real flags

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]")
OTHER_COMMAND = re.compile(r"`(?!python -m llm_scale)[^`]*`")  # `pip install --no-deps ...` names pip's flags


def _error_strings(source: str) -> list[str]:
    """The string pieces of every error message: in ``raise ...``, ``bad(...)`` (config checks),
    ``SystemExit(...)`` and ``print(..., file=sys.stderr)``."""
    out = []
    for node in ast.walk(ast.parse(source)):
        is_error = isinstance(node, ast.Raise) or (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and (node.func.id in ("bad", "SystemExit")
                 or (node.func.id == "print" and any(k.arg == "file" for k in node.keywords))))
        if is_error:
            out += [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return out


def flags_named_in_errors(source: str) -> set[str]:
    return {f for s in _error_strings(source) for f in FLAG.findall(OTHER_COMMAND.sub("", s))}


def _help(capsys, argv) -> str:
    with pytest.raises(SystemExit):
        main(argv + ["--help"])
    return capsys.readouterr().out


def test_every_flag_named_in_an_error_message_exists(capsys):
    helps = "".join(_help(capsys, pre) for pre in ([], ["sweep"], ["export"]))
    known = set(FLAG.findall(helps))
    named = {}
    for path in sorted(LLM_SCALE.glob("*.py")):
        for flag in flags_named_in_errors(path.read_text()):
            named.setdefault(flag, []).append(path.name)
    # the collector sees the messages that name flags (so it cannot pass by finding nothing) ...
    assert {"--text-column", "--label-column", "--data", "--checkpoint-dir", "--jobs"} <= set(named)
    # ... and would catch a flag that does not exist
    assert flags_named_in_errors('raise ConfigError(f"e.g. --data-path {x}; `pip install --no-deps y`")') == {"--data-path"}
    missing = {f: files for f, files in named.items() if f not in known}
    assert not missing, f"error messages name flags that `--help` does not list: {missing}"


def test_shortcut_flags_set_the_config_keys_and_text_fields_stay_text(tmp_path):
    from llm_scale.__main__ import build_parser, cli_overrides

    args = build_parser().parse_args(["--data", "r.csv", "--text-column", "review", "--label-column", "1",
                                      "--label-map", STARS, "--max-length", "128", "--out", str(tmp_path)])
    cfg = load_config(args.config, **cli_overrides(args))
    assert (cfg.task, cfg.data_path, cfg.text_column, cfg.label_column, cfg.label_map, cfg.max_length) == \
        ("table", "r.csv", "review", "1", STARS, 128)
    args = build_parser().parse_args(["--set", "task='table'", "--set", "data_path=r.csv", "--set", "label_column=1",
                                      "--set", "text_column='2'", "--out", str(tmp_path)])
    cfg = load_config(args.config, **cli_overrides(args))
    assert cfg.label_column == "1" and cfg.text_column == "2"  # a column name, not the integer 1
    assert load_config(None, task="table", data_path="r.csv", label_column=1).label_column == "1"  # a TOML int
    with pytest.raises(ConfigError, match=r"task='table'.*--data sets it"):  # the tweets would ignore the file
        load_config(None, data_path="r.csv")


# ---------------------------------------------------------------- labels

def test_star_ratings_are_their_own_classes_in_numeric_order(tmp_path):
    from llm_scale.data import natural_key

    p = tmp_path / "r.csv"
    p.write_text("text,stars\na,10\nb,1\nc,5\nd,10\ne,2\n")
    ds = load_table(p, text_column="text", label_column="stars")
    assert ds.label_names == ("1", "2", "5", "10")  # 4 classes, not an 11-way head with 7 empty ones
    assert ds.labels.tolist() == [3, 0, 2, 3, 1]
    assert sorted(["b10", "b2", "a", "10", "-1", "2.5"], key=natural_key) == ["-1", "2.5", "10", "a", "b2", "b10"]
    tweets_like = tmp_path / "t.csv"
    tweets_like.write_text("text,label\na,2\nb,0\nc,1\n")
    ds = load_table(tweets_like, text_column="text", label_column="label")
    assert ds.label_names == ("0", "1", "2") and ds.labels.tolist() == [2, 0, 1]  # 0/1/2 keep their indices


def test_label_map_bins_values_into_the_classes_it_names(tmp_path):
    p = reviews(tmp_path / "r.csv", n=20)
    ds = load_table(p, text_column="review", label_column="rating", label_map=STARS)
    assert ds.label_names == ("neg", "mid", "pos")  # the map's order, not alphabetical
    assert ds.labels.tolist()[:10] == [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    assert ds.summary["label_values"]["10"] == 2 and list(ds.summary["label_values"])[:3] == ["1", "2", "3"]
    with pytest.raises(DataError, match=r"labels \['9', '10'\] match no rule .*add a rule"):
        load_table(p, text_column="review", label_column="rating", label_map="1-4:neg,5-8:pos")
    with pytest.raises(DataError, match=r"label '5' matches rules for \['mid', 'neg'\]"):
        load_table(p, text_column="review", label_column="rating", label_map="1-5:neg,5-6:mid,7-10:pos")
    with pytest.raises(ConfigError, match=r"label_map='1-4=neg'.*SOURCE:CLASS"):
        load_config(None, task="table", data_path="r.csv", label_map="1-4=neg")
    with pytest.raises(ConfigError, match=r"range '9-7' runs backwards"):
        load_config(None, task="table", data_path="r.csv", label_map="1-6:neg,9-7:pos")


def test_empty_label_cells_are_refused_with_their_line_numbers(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text('review,rating\ngreat,9\n"long, quoted",\nawful,2\nmeh, \n')
    with pytest.raises(DataError) as err:
        load_table(p, text_column="review", label_column="rating")
    msg = str(err.value)
    assert "\n" not in msg and "2 rows with an empty 'rating' label (lines 3, 5)" in msg and "fill them in" in msg


# ---------------------------------------------------------------- truncation

def test_truncation_is_measured_and_warned_above_five_percent(tmp_path):
    from llm_scale.models import load_model
    from llm_scale.tasks import load_splits
    from llm_scale.truncation import truncation_summary, truncation_warning

    _, tok, _ = load_model("tiny-roberta", kind="classification", num_labels=3)
    cfg = load_config(None, task="table", data_path=str(reviews(tmp_path / "r.csv")), text_column="review",
                      label_column="rating", max_length=16)
    splits = load_splits(cfg)
    lengths = [len(tok(t)["input_ids"]) for ds in (splits.train, splits.test) for t in ds.texts]
    s = truncation_summary(tok, splits, kind="classification", max_length=16)
    assert s["rows"] == 90 and s["rows_cut"] == sum(n > 16 for n in lengths) == 15
    assert s["length_keeping_95pct"] == int(np.sort(lengths)[int(np.ceil(0.95 * 90)) - 1])
    assert s["length_keeping_95pct"] > 16 and sum(n <= s["length_keeping_95pct"] for n in lengths) >= 0.95 * 90
    line = truncation_warning(s)
    assert "cuts 17% of the rows" in line and f"--max-length {s['length_keeping_95pct']} would keep 95%" in line
    few = truncation_summary(tok, splits, kind="classification", max_length=s["length_keeping_95pct"])
    assert few["share_cut"] <= 0.05 and truncation_warning(few) is None
    # causal: BOS + text + prompt + the longest label word, as batches.encode_choices lays them out
    from llm_scale.batches import PROMPT_SUFFIX

    word = max(len(tok(" " + w, add_special_tokens=False)["input_ids"]) for w in splits.train.label_names)
    bos = int(tok.bos_token_id is not None)
    needs = [bos + len(tok(t + PROMPT_SUFFIX, add_special_tokens=False)["input_ids"]) + word
             for ds in (splits.train, splits.test) for t in ds.texts]
    causal = truncation_summary(tok, splits, kind="causal", max_length=8)
    assert causal["rows_cut"] == sum(n > 8 for n in needs) == 90 > sum(n > 8 for n in lengths) == 15


# ---------------------------------------------------------------- records

def test_record_names_cannot_collide_across_data_files_and_the_tweets_keep_theirs(tmp_path):
    from llm_scale.run import run_filename

    a, b = reviews(tmp_path / "a.csv"), reviews(tmp_path / "b.csv", long_every=5)
    c = tmp_path / "sub"
    c.mkdir()
    c = reviews(c / "a.csv")  # same stem, same content: the same data
    cfg = load_config(None, task="table", data_path=str(a), text_column="review", label_column="rating")
    names = {run_filename(dataclasses.replace(cfg, data_path=str(p))) for p in (a, b)}
    assert len(names) == 2 and all(re.search(r"_seed0_[ab]-[0-9a-f]{8}\.json$", n) for n in names)
    assert run_filename(dataclasses.replace(cfg, data_path=str(c))) == run_filename(cfg)
    assert run_filename(dataclasses.replace(cfg, label_map=STARS)) != run_filename(cfg)  # another reading
    assert run_filename(load_config("cpu-minilm-tweets")) == "fedavg_minilm_tweets_iid_c3_r8_s10_lr0.0005_seed0.json"


def _tiny(table, **kw):
    return load_config(None, **{**dict(model="tiny-roberta", task="table", data_path=str(table), text_column="review",
                                       label_column="rating", clients=3, rounds=3, local_steps=2, batch_size=8,
                                       lr=5e-3, rank=4, test_fraction=0.2, seed=1), **kw})


def test_steps_a_minute_count_only_the_rounds_this_process_ran(tmp_path):
    from llm_scale.run import run

    cfg = _tiny(reviews(tmp_path / "r.csv"))
    ck = tmp_path / "ck"
    first = run(cfg, checkpoint_dir=ck, stop_after=1, progress=False)
    assert first["client_steps"] == 3 * 2
    assert first["client_steps_per_minute"] == pytest.approx(60 * 6 / first["train_seconds"])
    rest = run(cfg, checkpoint_dir=ck, resume=True, progress=False)  # rounds 2 and 3 ran here, round 1 did not
    assert rest["client_steps"] == 3 * 3 * 2
    assert rest["client_steps_per_minute"] == pytest.approx(60 * 2 * 3 * 2 / rest["train_seconds"])
    done = run(cfg, checkpoint_dir=ck, resume=True, progress=False)  # a finished checkpoint: nothing ran here
    assert done["client_steps_per_minute"] is None and done["client_steps_this_process"] == 0
    assert rest["client_steps_this_process"] == 12 and done["final_test_accuracy"] == rest["final_test_accuracy"]
    assert first["optimizer_state_bytes"] == rest["optimizer_state_bytes"] > first["trainable_bytes"] > 0
    assert done["optimizer_state_bytes"] is None  # measured where a client trained, in this process


def test_export_refuses_an_unfinished_run_and_a_record_without_checkpoints(tmp_path):
    from llm_scale.export import export_run
    from llm_scale.run import run

    cfg = _tiny(reviews(tmp_path / "r.csv"))
    run(cfg, checkpoint_dir=tmp_path / "ck", stop_after=1, progress=False)
    with pytest.raises(ConfigError, match=r"stopped after round 1 of 3: finish it first .*--resume"):
        export_run(tmp_path / "ck", tmp_path / "adapter")
    # label_map shapes the run: a resume with one is refused; unset, it is left out of the fingerprint, so
    # checkpoints written before the key existed still resume
    with pytest.raises(ConfigError, match=r"config.label_map: '\(absent\)' -> '1-4:neg,5-6:mid,7-10:pos'"):
        run(dataclasses.replace(cfg, label_map=STARS), checkpoint_dir=tmp_path / "ck", resume=True, progress=False)
    fingerprint = json.loads((tmp_path / "ck" / "checkpoint.json").read_text())["fingerprint"]
    assert "label_map" not in fingerprint["config"] and "label_column" in fingerprint["config"]
    rec = tmp_path / "rec.json"
    rec.write_text(json.dumps({"checkpoint_dir": None}))
    with pytest.raises(ConfigError, match=r"records no checkpoint .*--export DIR"):
        export_run(rec, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_known_harmless_warnings_are_silenced_by_their_text_only(caplog):
    import logging
    import warnings

    from llm_scale.__main__ import quiet_known_warnings

    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_warnings()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
        log.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s.", "no kernels")
        log.warning("a bitsandbytes problem worth seeing")
    assert [str(w.message) for w in seen] == ["something else is deprecated"]
    assert [r.getMessage() for r in caplog.records if r.name == log.name] == ["a bitsandbytes problem worth seeing"]


def test_a_sweep_worker_silences_the_same_warnings_as_the_cli(monkeypatch):
    """Sweep workers are spawned processes: they do not inherit the CLI's filters, so their initializer
    installs them (the shape check's fresh processes do the same)."""
    import warnings

    from llm_scale import quiet, sweep

    calls = []
    monkeypatch.setattr(quiet, "quiet_known_warnings", lambda: calls.append(1))
    with warnings.catch_warnings():
        sweep._init_worker(None)
    assert calls == [1]


# ---------------------------------------------------------------- the README's user's guide, end to end

def _base_model_folder(folder: Path) -> Path:
    """A tiny RoBERTa saved as a plain Hugging Face folder: the user's own local model."""
    from llm_scale.models import load_model

    model, tok, _ = load_model("tiny-roberta", kind="classification", num_labels=2, seed=3)
    model.roberta.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_your_own_data_end_to_end(tmp_path, monkeypatch, capsys):
    """README "Your own data": run (a fresh process, as a user would), resume, export, load with plain peft."""
    monkeypatch.chdir(tmp_path)
    reviews(tmp_path / "reviews.csv")
    _base_model_folder(tmp_path / "my-model")
    cmd = ["--data", "reviews.csv", "--text-column", "review", "--label-column", "rating", "--label-map", STARS,
           "--max-length", "16", "--method", "fedavg", "--clients", "3", "--set", "model='my-model'",
           "--set", "rounds=2", "--set", "local_steps=2", "--set", "batch_size=8", "--set", "lr=5e-3",
           "--checkpoint-dir", "runs/ck", "--out", "runs"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "llm_scale", *cmd, "--no-progress"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    warnings_ = [line for line in proc.stderr.splitlines() if "warning" in line.lower()]
    assert len(warnings_) == 1 and "max_length=16 cuts 17% of the rows" in warnings_[0], proc.stderr
    assert "gemm_4bit" not in proc.stderr and "is_gradient_checkpointing" not in proc.stderr
    (path,) = (tmp_path / "runs").glob("*.json")
    assert path.name.startswith("fedavg_my-model_table_") and re.search(r"_reviews-[0-9a-f]{8}\.json$", path.name)
    rec = json.loads(path.read_text())
    labels = rec["labels"]
    assert labels["names"] == ["neg", "mid", "pos"]
    train, test = labels["class_counts"]["train"], labels["class_counts"]["test"]
    assert {k: train[k] + test[k] for k in train} == {"neg": 36, "mid": 18, "pos": 36}
    majority = max(train, key=train.get)
    assert labels["majority_class"] == majority
    assert rec["majority_class_test_accuracy"] == pytest.approx(test[majority] / sum(test.values()))
    assert rec["final_test_accuracy"] is not None and rec["truncation"]["rows_cut"] == 15
    assert f"(always {majority!r}: " in proc.stdout

    # resume: the same command with --resume; a finished checkpoint reports the same accuracy, no speed
    assert main([*cmd, "--resume", "--no-progress"]) == 0
    again = json.loads(path.read_text())
    assert again["final_test_accuracy"] == rec["final_test_accuracy"] and again["client_steps_per_minute"] is None
    assert main([*cmd[:-2], "--set", "lr=1e-2", "--out", "runs", "--resume", "--no-progress"]) == 2
    assert "lr: 0.005 -> 0.01" in capsys.readouterr().err

    # export a finished run from its record, then load it as the README shows
    assert main(["export", str(path.relative_to(tmp_path)), "--out", "runs/adapter", "--no-progress"]) == 0
    adapter = json.loads((tmp_path / "runs/adapter/adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and adapter["base_model_name_or_path"] == "my-model"
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoConfig, AutoTokenizer

    classes = AutoConfig.from_pretrained("runs/adapter")
    model = AutoPeftModelForSequenceClassification.from_pretrained(
        "runs/adapter", id2label=classes.id2label, label2id=classes.label2id)
    tok = AutoTokenizer.from_pretrained("runs/adapter")
    assert classes.num_labels == 3 and classes.id2label == {0: "neg", 1: "mid", 2: "pos"}
    assert model.config.label2id == {"neg": 0, "mid": 1, "pos": 2}

    # the loaded model is the run's final global: its logits equal the project's own on the run's test rows
    from fedlora.checkpoint import load_checkpoint
    from llm_scale.engine import Federation

    fed = Federation(load_config(None, **json.loads((tmp_path / "runs/ck/checkpoint.json").read_text())["llm_config"]))
    state, _ = load_checkpoint(tmp_path / "runs/ck", restore_rng=False)
    fed.bridge.load(state, trains="")
    fed.model.eval()
    batch = tok(list(fed.splits.test.texts), truncation=True, max_length=16, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours, theirs = fed.model(**batch).logits, model.eval()(**batch).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    acc = float((ours.argmax(-1).numpy() == fed.splits.test.labels).mean())
    assert acc == pytest.approx(rec["final_test_accuracy"])

    # a bad row: an empty rating, one line naming its line
    with open(tmp_path / "reviews.csv", "a") as f:
        f.write("a review with no rating,\n")
    capsys.readouterr()
    assert main(["--data", "reviews.csv", "--text-column", "review", "--label-column", "rating",
                 "--out", "runs2", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: reviews.csv: 1 row with an empty 'rating' label (line 92); fill it in or delete the row"


def test_a_sweep_shares_data_only_between_runs_that_read_the_file_alike():
    """The sweep's per-process cache of splits is keyed on how the data is read: another label map or
    another column is other data, even from the same file."""
    from llm_scale.config import load_config
    from llm_scale.sweep import _data_key

    base = dict(task="table", data_path="reviews.csv")
    key = _data_key(load_config(None, **base))
    for change in (dict(label_map="1-4:neg,5-10:pos"), dict(text_column="review"), dict(label_column="stars"),
                   dict(text_b_column="title")):
        assert _data_key(load_config(None, **base, **change)) != key, change
    assert _data_key(load_config(None, **base, lr=1e-2, clients=20)) == key  # the schedule is not the data
