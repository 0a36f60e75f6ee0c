"""Mutation testing of the core with mutmut (``make mutation``; opt-in, not part of CI).

For each suite it snapshots ``fedlora/``, ``tests/`` and ``pyproject.toml`` into ``.mutation/<suite>/``
(so edits made to the tree during the run change nothing), writes that suite's ``[tool.mutmut]``,
runs ``mutmut run --max-children 1`` there with the core's own fast tests, then writes

* ``results/quality/mutation.json``: mutants, killed, survived (and the rarer outcomes) per file, per
  suite, and the raw score ``killed / mutants``;
* ``results/quality/surviving.md``: every surviving mutant with its diff and why it stays, the reason
  looked up in ``tools/mutation_reasons.json`` by function and changed line (so it survives renumbering);
  a survivor with no recorded reason is listed as ``UNCLASSIFIED``.

Suites: ``core`` = ``fedlora/aggregators/*.py`` (the reference oracle excluded), ``fedlora/linalg.py``,
``fedlora/validation.py`` (the ``[tool.mutmut]`` section of pyproject.toml); ``loop`` = ``fedlora/loop.py``
and ``fedlora/checkpoint.py`` with the same tests plus ``tests/test_checkpoint_units.py``,
``tests/test_averaging_error.py`` and ``tests/test_loop_gaps.py``. ``--reclassify`` only looks the reasons up
again in the committed ``surviving.md`` (when the last run's ``.mutation/`` is gone).

    python tools/mutation_report.py [--suite core|loop|all] [--keep] [--report-only | --reclassify]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".mutation"
OUT = ROOT / "results" / "quality"
REASONS = ROOT / "tools" / "mutation_reasons.json"

KILLED = {"killed", "timeout", "segfault", "caught by type check"}  # the tests (or the clock) noticed
SURVIVED = {"survived", "no tests"}  # nothing noticed (a function no selected test reaches: no tests)
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 35: "suspicious",
          36: "timeout", 37: "caught by type check", -24: "timeout", 24: "timeout", 152: "timeout",
          255: "timeout", -11: "segfault", -9: "segfault", None: "not checked"}


def base_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]


def suites() -> dict[str, dict]:
    core = base_config()
    loop = dict(core, only_mutate=["fedlora/loop.py", "fedlora/checkpoint.py"], do_not_mutate=[],
                pytest_add_cli_args_test_selection=core["pytest_add_cli_args_test_selection"]
                + ["tests/test_checkpoint_units.py", "tests/test_averaging_error.py",
                   "tests/test_loop_gaps.py"])
    return {"core": core, "loop": loop}


def _toml_value(v) -> str:
    return json.dumps(v)  # lists of strings, strings, numbers, booleans: JSON spelling is valid TOML


def snapshot(suite: str, cfg: dict) -> Path:
    """A copy of the package and the tests, with this suite's [tool.mutmut] (missing test files dropped)."""
    wd = WORK / suite
    if wd.exists():
        shutil.rmtree(wd)
    wd.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for d in ("fedlora", "tests"):
        shutil.copytree(ROOT / d, wd / d, ignore=ignore)
    cfg = dict(cfg, pytest_add_cli_args_test_selection=[
        t for t in cfg["pytest_add_cli_args_test_selection"] if (ROOT / t).exists()])
    text = (ROOT / "pyproject.toml").read_text()
    text = text[:text.index("[tool.mutmut]")]
    text += "[tool.mutmut]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in cfg.items())
    (wd / "pyproject.toml").write_text(text)
    return wd


def run_mutmut(wd: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    mutmut = Path(sys.executable).with_name("mutmut")
    t0 = time.time()
    subprocess.run([str(mutmut), "run", "--max-children", "1"], cwd=wd, env=env, check=True)
    print(f"mutmut done in {time.time() - t0:.0f} s", flush=True)


def outcomes(wd: Path) -> dict[str, dict[str, str]]:
    """{source file: {mutant name: status}} from mutmut's .meta files."""
    out = {}
    for meta in sorted((wd / "mutants").rglob("*.py.meta")):
        path = str(meta.relative_to(wd / "mutants"))[:-len(".meta")]
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        if codes:
            out[path] = {k: STATUS.get(v, "suspicious") for k, v in codes.items()}
    return out


def counts(statuses: dict[str, str]) -> dict:
    c = defaultdict(int)
    for s in statuses.values():
        c[s] += 1
    tried = sum(v for k, v in c.items() if k not in ("skipped", "not checked"))
    killed = sum(c[k] for k in KILLED)
    survived = sum(c[k] for k in SURVIVED)
    row = {"mutants": tried, "killed": killed, "survived": survived}
    row.update({k.replace(" ", "_"): v for k, v in sorted(c.items()) if k not in ("killed", "survived")})
    row["score"] = round(killed / tried, 4) if tried else None
    return row


def diffs_of(wd: Path, names_by_path: dict[str, list[str]]) -> dict[str, str]:
    """Each mutant's diff (what ``mutmut show`` prints), read in one process inside the snapshot."""
    code = ("import json, sys\n"
            "from mutmut.mutation.diff_apply import get_diff_for_mutant\n"
            "todo = json.load(sys.stdin)\n"
            "print(json.dumps({k: get_diff_for_mutant(k, path=p) for p, ks in todo.items() for k in ks}))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=wd, input=json.dumps(names_by_path), capture_output=True,
                       text=True, check=True)
    return {k: "\n".join(d.splitlines()[2:]).strip() for k, d in json.loads(r.stdout).items()}  # no ---/+++


def signature(name: str, diff: str) -> str:
    """``function: removed → added`` lines, stable when mutmut renumbers the mutants of a function."""
    func = re.sub(r"__mutmut_\d+$", "", name)
    rm = " / ".join(x[1:].strip() for x in diff.splitlines() if x.startswith("-") and not x.startswith("---"))
    add = " / ".join(x[1:].strip() for x in diff.splitlines() if x.startswith("+") and not x.startswith("+++"))
    return f"{func}: {rm} => {add}"


HEAD = ("# Surviving mutants\n\nWritten by `make mutation` (tools/mutation_report.py). Each survivor of the "
        "last run, its diff and why it stays: *equivalent* (no input tells it from the original), "
        "*message wording* (only an error message's text changes), *storage only* (a dtype, copy or "
        "layout no caller can observe through the API), *unreachable* (a guard the validated input never "
        "trips), *killed since* (a test added after the recorded run kills it; the next run drops it), *gone "
        "since* (the mutated code was rewritten after the run) or "
        "*UNCLASSIFIED* (not reviewed yet). Reasons live in tools/mutation_reasons.json, keyed by function and "
        "changed line.\n\n")


def report(suite_results: dict, diffs: dict) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    jpath = OUT / "mutation.json"
    data = json.loads(jpath.read_text()) if jpath.exists() else {}
    data.pop("_how", None)
    for suite, res in suite_results.items():
        files = {p: counts(st) for p, st in sorted(res.items())}
        allst = {f"{p}:{k}": v for p, st in res.items() for k, v in st.items()}
        data[suite] = {"files": files, "total": counts(allst)}
    data = {"_how": "make mutation (tools/mutation_report.py): mutmut, one mutant at a time, the core's fast "
                    "tests; score = killed / mutants (timeouts count as killed)", **dict(sorted(data.items()))}
    jpath.write_text(json.dumps(data, indent=1) + "\n")

    reasons = json.loads(REASONS.read_text()) if REASONS.exists() else {}
    mpath = OUT / "surviving.md"
    old = mpath.read_text() if mpath.exists() else ""
    sections = dict(re.findall(r"(?ms)^## suite (\S+)\n(.*?)(?=^## suite |\Z)", old))
    for suite, res in suite_results.items():
        tot = data[suite]["total"]
        lines = [f"{tot['mutants']} mutants, {tot['killed']} killed, {tot['survived']} survived: raw score "
                 f"{tot['score']}.\n"]
        if tot.get("not_checked"):
            lines[0] += (f"\n**Partial run**: {tot['not_checked']} more mutants were generated but not checked "
                         "(the run was stopped); mutmut tries the mutants with the cheapest tests first, so this "
                         "is not a random sample.\n")
        by_reason = defaultdict(int)
        for path, st in sorted(res.items()):
            surv = [k for k, v in st.items() if v in SURVIVED]
            if not surv:
                continue
            lines.append(f"### {path} ({len(surv)} surviving)\n")
            for k in sorted(surv, key=lambda x: (re.sub(r"\d+$", "", x), int(re.findall(r"\d+$", x)[0]))):
                d = diffs[k]
                why = reasons.get(signature(k, d), "UNCLASSIFIED")
                by_reason[why.split(":")[0]] += 1
                changed = "\n".join(x for x in d.splitlines() if x[:1] in "+-")
                lines.append(f"- `{k}` ({st[k]}): **{why}**\n\n```diff\n{changed}\n```\n")
        summary = ", ".join(f"{v} {k}" for k, v in sorted(by_reason.items(), key=lambda kv: -kv[1]))
        lines.insert(1, f"Survivors by reason: {summary or 'none'}.\n")
        sections[suite] = "\n".join(lines) + "\n"
    mpath.write_text(HEAD + "".join(f"## suite {s}\n{sections[s]}" for s in sorted(sections)))


ITEM = re.compile(r"(?ms)^- `(\S+)` \(([^)]*)\): \*\*(.*?)\*\*\n\n```diff\n(.*?)\n```\n")


def reclassify() -> None:
    """Look every survivor's reason up again in the committed surviving.md (names, outcomes, diffs): for
    reasons added after a run whose ``.mutation/`` is gone. The counts and the survivors stay the last run's."""
    reasons = json.loads(REASONS.read_text())
    mpath = OUT / "surviving.md"
    out = []
    for suite, body in re.findall(r"(?ms)^## suite (\S+)\n(.*?)(?=^## suite |\Z)", mpath.read_text()):
        by_reason = defaultdict(int)

        def sub(m: re.Match) -> str:
            why = reasons.get(signature(m.group(1), m.group(4)), "UNCLASSIFIED")
            by_reason[why.split(":")[0]] += 1
            return f"- `{m.group(1)}` ({m.group(2)}): **{why}**\n\n```diff\n{m.group(4)}\n```\n"

        body = ITEM.sub(sub, body)
        summary = ", ".join(f"{v} {k}" for k, v in sorted(by_reason.items(), key=lambda kv: -kv[1]))
        body = re.sub(r"(?m)^Survivors by reason: .*$", lambda _: f"Survivors by reason: {summary or 'none'}.", body,
                      count=1)
        out.append(f"## suite {suite}\n{body}")
    mpath.write_text(HEAD + "".join(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=["core", "loop", "all"], default="all")
    ap.add_argument("--report-only", action="store_true", help="re-read the last run in .mutation/, no new run")
    ap.add_argument("--reclassify", action="store_true",
                    help="only look the reasons up again in the committed surviving.md (no run, no .mutation/)")
    args = ap.parse_args()
    if args.reclassify:
        reclassify()
        return
    names = ["core", "loop"] if args.suite == "all" else [args.suite]
    results, diffs = {}, {}
    for suite in names:
        wd = WORK / suite
        if not args.report_only:
            wd = snapshot(suite, suites()[suite])
            run_mutmut(wd)
        res = outcomes(wd)
        diffs.update(diffs_of(wd, {p: [k for k, v in st.items() if v in SURVIVED] for p, st in res.items()}))
        results[suite] = res
        tot = counts({k: v for st in res.values() for k, v in st.items()})
        print(f"{suite}: {tot}", flush=True)
    report(results, diffs)


if __name__ == "__main__":
    main()
