"""The recovery grid's budget (tools/bench_recover.py): every row runs it, and one file holds one budget."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_recover  # noqa: E402
from bench_recover import Budget  # noqa: E402


def test_the_budget_reaches_the_recover_command_and_the_row(tmp_path, monkeypatch):
    calls = []

    def fake_cli(code, *args):
        calls.append(args)
        if args[0] == "recover":
            out = Path(args[args.index("--out") + 1])
            out.mkdir(parents=True)
            report = {"ppl_before": None, "ppl_after": {"ppl": 24.0}, "step_seconds": 1.0, "tokens_per_s": 2.0,
                      "train_seconds": 3.0, "peak_rss_mb": 4.0, "trainable_params": 5,
                      "config": {"compute_dtype": "bfloat16"}, "loss_curve": [{"loss": 3.5}, {"loss": 2.5}]}
            (out / "recover_report.json").write_text(json.dumps(report))

    monkeypatch.setattr(bench_recover, "cli", fake_cli)
    (tmp_path / "w3-k128").mkdir()
    (tmp_path / "w3-k128" / "config.json").write_text("{}")
    row = bench_recover.run_row(3, "post", 1, tmp_path, tmp_path, False, Budget(steps=7, lr=3e-4))
    flags = calls[-1]
    assert flags[flags.index("--lr") + 1] == "0.0003" and flags[flags.index("--steps") + 1] == "7"
    assert flags[flags.index("--seed") + 1] == "1"
    assert (row["lr"], row["steps"], row["row"]) == (3e-4, 7, "w3-post-s1")
    assert Budget().of(row) == Budget(7, 3e-4)


def test_one_results_file_holds_one_budget():
    old = [{"row": "w3-post-s0", "steps": 100}]  # written before rows recorded their lr: 1e-4
    Budget().check(old, "grid.jsonl")
    Budget(100, 3e-4).check([{"row": "w3-post-s0", "steps": 100, "lr": 3e-4}], "grid.jsonl")
    with pytest.raises(SystemExit, match="grid.jsonl holds rows of 100 steps at lr 0.0001.*own --results"):
        Budget(100, 3e-4).check(old, "grid.jsonl")
    with pytest.raises(SystemExit, match="50 steps"):
        Budget().check([{"row": "w3-post-s0", "steps": 50}], "grid.jsonl")
