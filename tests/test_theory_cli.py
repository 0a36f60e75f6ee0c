"""`python -m linear_theory --quick` end to end: every record passes, the JSON carries provenance,
and the figures regenerate from it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from figures.theory import make_all
from linear_theory.analyses import NAMES

ROOT = Path(__file__).resolve().parents[1]


def test_quick_cli_every_check_passes_and_figures_regenerate(tmp_path):
    out = tmp_path / "theory"
    proc = subprocess.run([sys.executable, "-m", "linear_theory", "--quick", "--out", str(out), "--seed", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)  # a hang guard, not a speed test: loaded machines are slow
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "theory.json").read_text())
    records = doc["records"]
    assert {r["name"] for r in records} == set(NAMES)
    failed = [r for r in records if not r["passed"]]
    assert not failed, failed
    for r in records:
        for key in ("m", "n", "clients", "seed", "predicted", "measured", "tolerance", "passed"):
            assert key in r, (key, r)
        assert r["m"] != r["n"]
    prov = doc["provenance"]
    assert prov["git_commit"] and prov["torch"] and prov["numpy"] and "--quick" in prov["command"]
    assert "checks passed" in proc.stdout and "rolora_angle" in proc.stdout
    written = make_all(tmp_path, tmp_path / "figures")
    assert len(written) == 8 and all(p.stat().st_size > 1000 for p in written)
    assert {p.suffix for p in written} == {".png", ".pdf"}


def test_failing_check_gives_nonzero_exit(tmp_path, monkeypatch):
    """The exit status reflects the records: force one analysis to fail and expect 1."""
    import linear_theory.analyses as A
    import linear_theory.cli as cli

    def fake_run_all(cfg, seed):
        rec = [dict(name=name, check="x", m=2, n=3, clients=1, seed=seed, predicted=0.0, measured=0.0,
                    tolerance=0.0, tolerance_kind="absolute", passed=(name != "ffa_floor")) for name in A.NAMES]
        traces = {"rolora_bound": {"counterexample": A.rolora_bound_counterexample(),
                                   "small_samples": {"per_c": [{"samples": 20}], "violations": 0, "runs": 0}}}
        return rec, traces

    monkeypatch.setattr(cli, "run_all", fake_run_all)
    assert cli.main(["--quick", "--out", str(tmp_path)]) == 1
    doc = json.loads((tmp_path / "theory.json").read_text())
    assert doc["passed"] is False
