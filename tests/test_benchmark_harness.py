"""The benchmark harness (``benchmarks/harness.py``): timing, sections saved and rendered, bad
files; the schedule benchmark's synchronous rounds give the asynchronous rollout's trees; pytest
collects the benchmark scripts only when pointed at ``benchmarks/``."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import helpers  # noqa: F401 - puts benchmarks/ on sys.path
import pytest

from arpo_fast.rollout.tree import ARPOConfig

# isort: split
import harness
from harness import Section, Table, interleave, measure

ROOT = Path(__file__).resolve().parent.parent


def test_measure_and_interleave_count_warmups_and_repeats():
    calls = []
    timing = measure(lambda: calls.append("a"), warmup=2, reps=3)
    assert len(calls) == 5 and len(timing.samples) == 3
    assert timing.best <= timing.median
    order = []
    out = interleave({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, warmup=1, reps=2)
    assert order == ["a", "b"] * 3
    assert [len(t.samples) for t in out.values()] == [2, 2]


def test_table_rows_and_formats():
    t = Table(["name", "s"], formats={"s": "{:.2f}"})
    t.add("x", 1.23456)
    t.add("y", None)
    assert t.markdown().splitlines() == ["| name | s |", "|---|---|", "| x | 1.23 |", "| y |  |"]
    with pytest.raises(ValueError, match="a row of 1 cells for 2 columns"):
        t.add("only one")


def _saved(tmp_path, name, date):
    s = Section(name, f"{name} context.", command="python bench.py", machine="test machine", date=date)
    s.table("case", "value").add("a", 1.5)
    path = tmp_path / f"{name}.json"
    harness.save(s, argparse.Namespace(json=path, csv=tmp_path / f"{name}.csv"))
    return path


def test_sections_round_trip_and_render_newest_first(tmp_path):
    old, new = _saved(tmp_path, "old", "2026-11-01"), _saved(tmp_path, "new", "2026-12-01")
    text = harness.render([old, new])
    assert text.index("## new (test machine, 2026-12-01)") < text.index("## old (test machine, 2026-11-01)")
    assert "`python bench.py`: new context." in text and "| a | 1.5 |" in text
    assert (tmp_path / "new.csv").read_text().splitlines() == ["case,value", "a,1.5"]
    assert harness.load(new).markdown() == Section.from_json(json.loads(new.read_text())).markdown()


def test_render_names_a_missing_or_foreign_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        harness.main(["render", str(tmp_path / "nope.json")])
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": []}')
    with pytest.raises(SystemExit):
        harness.main(["render", str(bad)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(bad) in err and "not a benchmark section" in err


def test_synchronous_rounds_give_the_asynchronous_trees(monkeypatch):
    import bench_schedule

    # The sampler's PyTorch path, as the benchmark runs it: under the Triton interpreter (which the
    # suite turns on) each of the rollout's ~300 steps would take about a second.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    tok, engine, prompts, _ = bench_schedule.setup(1)
    config = ARPOConfig(rollouts=6, initial=3, threshold=1.0, max_response_tokens=1024)
    out = {s: bench_schedule.run(s, engine, tok, prompts, config, 8, 0.0, 0) for s in ("async", "rounds")}
    assert out["async"]["trees"] == out["rounds"]["trees"]
    assert out["async"]["stats"]["branch_points"] > 0  # threshold 1: every result branches
    assert out["rounds"]["rounds"] >= 1 and out["async"]["rounds"] is None
    assert all(1 <= t[6] <= 4 for t in out["async"]["trees"])  # tool calls per trajectory
    assert engine.live() == []


def test_pytest_collects_the_benchmark_scripts_once_only_from_their_folder():
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/", "benchmarks/bench_forker.py", "--collect-only", "-q"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    assert "benchmarks/bench_schedule.py::test_schedule[async]" in ids
    assert len(ids) == len(set(ids))
    assert sum(i.startswith("benchmarks/bench_forker.py::") for i in ids) == 5
    for script in sorted((ROOT / "benchmarks").glob("bench_*.py")):  # every script has an entry
        assert any(i.startswith(f"benchmarks/{script.name}::") for i in ids), script.name
