"""Every CLI answers a bad argument or config with one line naming the problem and the fix, exit 2,
and its --help lists the choices (methods from the registry, partitions, presets, the sweep)."""
from __future__ import annotations

import pytest



def _run(main, argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("argv,message", [
    (["--method", "nope", "--out", "x"], "invalid choice: 'nope'"),
    (["--rank", "-1", "--rounds", "1", "--out", "x"], "must be >= 1"),
    (["--config", "no/such.toml", "--out", "x"], "No such file"),
    (["--set", "rouns=3", "--out", "x"], "rouns"),
    (["sweep", "--methods", "fedsgd", "--out", "x", "--dry-run"], "unknown method 'fedsgd'"),
    (["sweep", "--preset", "nope", "--out", "x"], "invalid choice: 'nope'"),
])
def test_mnist_toy_cli_errors_are_one_line(argv, message, capsys):
    from mnist_toy.__main__ import main

    rc, out, err = _run(main, argv, capsys)
    assert rc == 2 and message in err and "Traceback" not in err
    if not argv[0].startswith("sweep") and "invalid choice" not in message:
        assert err.strip().count("\n") == 0  # one line


def test_mnist_toy_help_lists_methods_partitions_and_the_sweep(capsys):
    from mnist_toy.__main__ import main

    rc, out, _ = _run(main, ["--help"], capsys)
    assert rc == 0 and "sweep" in out and "dirichlet" in out
    from mnist_toy.config import METHODS

    # every rule the toy can run is listed; full-galore and head-only are LLM-tier only
    assert all(r in out for r in METHODS)
    assert {"full-galore", "head-only"}.isdisjoint(METHODS) and "fedavg-chain" in METHODS


def test_linear_theory_cli_refuses_bad_threads(capsys):
    from linear_theory.cli import main

    rc, _, err = _run(main, ["--out", "x", "--threads", "0"], capsys)
    assert rc == 2 and "--threads 0" in err
