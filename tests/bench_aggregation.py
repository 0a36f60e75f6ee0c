"""pytest-benchmark harness for the aggregation core (run by ``make bench`` / ``python -m fedlora.bench``)."""
from __future__ import annotations

import os

import pytest
import torch

from fedlora.bench import cases, target

QUICK = os.environ.get("FEDLORA_BENCH_QUICK", "0") == "1"
CASES = cases(QUICK)


@pytest.mark.bench
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_aggregation(benchmark, case):
    torch.set_num_threads(int(os.environ.get("FEDLORA_BENCH_THREADS", "1")))
    fn, info = target(case)
    check = info.pop("check", None)
    last = {}

    def run():
        last["result"] = fn()

    benchmark.extra_info.update(info)
    if case.kind == "reference" and case.m * case.n > 1024 * 1024:  # seconds to a minute a call: time it once
        benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    elif case.kind == "reference" or case.m * case.n * case.clients > 50 * 4096 * 11008 // 10:
        benchmark.pedantic(run, rounds=5 if QUICK else 7, iterations=1, warmup_rounds=1)
    else:  # microseconds: let pytest-benchmark calibrate iterations per round so the timer is not the result
        benchmark(run)
    if check is not None:
        benchmark.extra_info.update(check(last["result"]))
