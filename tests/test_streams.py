"""Per-client persistent data streams (fedlora/streams.py) and their use in the LLM tier: each client walks
its own seeded permutations epoch by epoch across rounds, so every row is read ⌊T/n⌋ or ⌈T/n⌉ times;
the reads are recorded per client, replayed from the config (resume-proof), and the older fresh
permutation per client-round stays available as ``data_stream="round"``."""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from fedlora.config import ConfigError  # noqa: E402
from fedlora.streams import prior_participations, seen_counts, seen_summary, stream_rows  # noqa: E402
from llm_scale.config import load_config  # noqa: E402
from llm_scale.engine import Federation  # noqa: E402
from llm_scale.run import run, run_fingerprint  # noqa: E402
from tests.test_llm_scale import word_table  # noqa: E402


def test_consecutive_slices_are_one_stream_and_each_epoch_a_permutation():
    rows = np.arange(100, 137)  # 37 rows: slices cross epoch boundaries at odd places
    whole = stream_rows(rows, seed=3, client=2, start=0, count=37 * 4)
    parts = np.concatenate([stream_rows(rows, seed=3, client=2, start=s, count=10) for s in range(0, 37 * 4, 10)])
    assert np.array_equal(parts[:37 * 4], whole)
    for e in range(4):
        assert sorted(whole[e * 37:(e + 1) * 37].tolist()) == rows.tolist()
    assert not np.array_equal(whole[:37], whole[37:74])  # a new permutation every epoch
    assert not np.array_equal(whole, stream_rows(rows, seed=3, client=1, start=0, count=37 * 4))  # per client
    assert not np.array_equal(whole, stream_rows(rows, seed=4, client=2, start=0, count=37 * 4))  # per seed


@pytest.mark.parametrize("taken", [1, 36, 37, 38, 100, 37 * 5])
def test_after_t_reads_every_row_is_read_floor_or_ceil_of_t_over_n(taken):
    rows = np.arange(37)
    got = stream_rows(rows, seed=0, client=0, start=0, count=taken)
    counts = seen_counts(37, [[got]])
    assert counts.sum() == taken
    assert counts.min() == taken // 37 and counts.max() == -(-taken // 37)
    s = seen_summary(counts)
    assert s["rows_seen"] == min(taken, 37) and s["reads"] == taken


def test_bad_stream_arguments_are_refused():
    with pytest.raises(ValueError, match="no rows"):
        stream_rows(np.arange(0), seed=0, client=4, start=0, count=1)
    with pytest.raises(ValueError, match=">= 0"):
        stream_rows(np.arange(5), seed=0, client=0, start=-1, count=1)
    assert len(stream_rows(np.arange(5), seed=0, client=0, start=3, count=0)) == 0


def test_prior_participations_counts_only_earlier_rounds_with_the_client():
    sched = [[0, 1], [1], [0, 2], [0]]
    assert [prior_participations(sched, 0, t) for t in range(4)] == [0, 1, 1, 2]
    assert prior_participations(sched, 2, 4) == 1


# ---- the LLM tier ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def table(tmp_path_factory):
    return word_table(tmp_path_factory.mktemp("data") / "toy.csv")


def _cfg(table, **kw):
    base = dict(model="tiny-roberta", task="table", data_path=str(table), method="fedavg", clients=3, rounds=5,
                local_steps=3, batch_size=4, lr=5e-3, rank=2, test_fraction=0.25, targets=["query", "value"], seed=1)
    return load_config(None, **{**base, **kw})


def test_a_persistent_run_reads_every_row_evenly_and_records_it(table):
    rec = run(_cfg(table), progress=False)
    seen = rec["rows_seen"]
    assert seen["stream"] == "persistent"
    for c, s in enumerate(seen["per_client"]):
        n = rec["client_samples"][c]
        assert s["rows"] == n and s["reads"] == 5 * 3 * 4  # rounds × steps × batch
        assert s["min_reads"] == s["reads"] // n and s["max_reads"] == -(-s["reads"] // n)
    assert seen["all"]["reads"] == 3 * 5 * 3 * 4


def test_a_fresh_permutation_per_round_reads_rows_unevenly(table):
    """The older reading (``data_stream="round"``) on the same schedule: some rows more than ⌈T/n⌉ times."""
    rec = run(_cfg(table, data_stream="round"), progress=False)
    seen = rec["rows_seen"]
    assert seen["stream"] == "round"
    assert seen["all"]["reads"] == 3 * 5 * 3 * 4
    spread = [s["max_reads"] - s["min_reads"] for s in seen["per_client"]]
    assert max(spread) >= 2  # with a stream it is at most 1


def test_a_client_continues_its_stream_where_its_last_round_stopped(table):
    fed = Federation(_cfg(table))
    rows = fed.parts[0]
    per_round = 3 * 4
    from fedlora.loop import client_round_seed

    read = [np.concatenate(fed.plan_rows(0, t, client_round_seed(1, t, 0), rows)) for t in range(3)]
    stream = stream_rows(rows, seed=1, client=0, start=0, count=3 * per_round)
    for t in range(3):  # each round's batches are its slice of the stream (length-grouped within the slice)
        assert sorted(read[t].tolist()) == sorted(stream[t * per_round:(t + 1) * per_round].tolist())


def test_clients_sampled_out_of_a_round_do_not_advance_their_stream(table):
    fed = Federation(_cfg(table, clients_per_round=0.34, rounds=6))  # one client of 3 per round
    sched = fed.schedule()
    assert all(len(c) == 1 for c in sched)
    c = sched[-1][0]
    k = prior_participations(sched, c, 5)
    from fedlora.loop import client_round_seed

    got = np.concatenate(fed.plan_rows(c, 5, client_round_seed(1, 5, c), fed.parts[c]))
    want = stream_rows(fed.parts[c], seed=1, client=c, start=k * 12, count=12)
    assert sorted(got.tolist()) == sorted(want.tolist())


def test_a_resumed_persistent_run_reads_the_same_rows_and_ends_the_same(table, tmp_path):
    cfg = _cfg(table)
    whole = run(cfg, progress=False)
    run(cfg, checkpoint_dir=tmp_path / "ck", stop_after=2, progress=False)
    resumed = run(cfg, checkpoint_dir=tmp_path / "ck", resume=True, progress=False)
    assert resumed["final_test_accuracy"] == whole["final_test_accuracy"]
    assert [r["train_loss"] for r in resumed["rounds"]] == [r["train_loss"] for r in whole["rounds"]]
    assert resumed["rows_seen"] == whole["rows_seen"]


def test_a_checkpoint_of_one_reading_does_not_resume_under_the_other(table, tmp_path):
    run(_cfg(table, data_stream="round"), checkpoint_dir=tmp_path / "ck", stop_after=1, progress=False)
    with pytest.raises(ValueError, match="data_stream"):
        run(_cfg(table), checkpoint_dir=tmp_path / "ck", resume=True, progress=False)


def test_the_older_reading_keeps_the_fingerprint_of_checkpoints_written_before_the_key(table):
    fed = Federation(_cfg(table, data_stream="round"))
    assert "data_stream" not in run_fingerprint(fed.cfg, fed)["config"]
    fed2 = Federation(_cfg(table))
    assert run_fingerprint(fed2.cfg, fed2)["config"]["data_stream"] == "persistent"


def test_an_unknown_reading_is_refused_naming_both():
    with pytest.raises(ConfigError, match="persistent.*round"):
        load_config(None, data_stream="epochs")


def test_a_sweep_refuses_to_resume_with_another_reading_of_the_data(tmp_path):
    from llm_scale.sweep import PRESETS, check_stream

    cfg = PRESETS["scaling"].config_for("fedavg", 3, "iid", 2, lr=1e-3, seed=0, role="eval")
    assert cfg.data_stream == "round"  # the committed studies' reading, pinned in their presets
    check_stream({"config": {}}, cfg, tmp_path / "old.json")  # a record from before the key: "round"
    with pytest.raises(ConfigError, match="data_stream='persistent'.*resume it with"):
        check_stream({"config": {"data_stream": "persistent"}}, cfg, tmp_path / "new.json")
