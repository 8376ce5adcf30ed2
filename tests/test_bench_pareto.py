"""tools/bench_pareto.py: the frontier and the error-vs-ppl comparison it prints."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_pareto  # noqa: E402


def _row(row, bpw, ppl):
    return {"row": row, "linear_bpw": bpw, "model_bpw": bpw + 2, "ppl": ppl, "quantize_seconds": 1.0,
            "chosen": None, "cpu": "AVX2", "threads": 2}


def test_the_frontier_holds_exactly_the_undominated_rows():
    rows = [_row("a", 3.0, 40.0), _row("b", 3.5, 45.0), _row("c", 4.0, 30.0), _row("d", 4.0, 31.0)]
    assert bench_pareto.frontier(rows) == {"a", "c"}
    table = bench_pareto.table(rows)
    assert table.count("| yes |") == 2 and table.index("| a |") < table.index("| c |")


def test_the_errors_are_compared_on_the_measured_settings_only(tmp_path):
    # two layers; candidates [bits, k, storage, loss, energy]
    candidates = {"l0": [[2, 0, 10, 8.0, 2.0], [4, 0, 20, 1.0, 2.0]], "l1": [[2, 0, 10, 4.0, 8.0], [4, 0, 20, 0.5, 8.0]]}
    (tmp_path / "target-3.0").mkdir()
    (tmp_path / "target-3.0" / "quantize_report.json").write_text(json.dumps({"target_bpw": {"candidates": candidates}}))
    rows = [_row("gptq-w2-k0", 2.2, 90.0), _row("gptq-w4-k0", 4.2, 27.0), _row("gptq-w3-k128", 5.6, 30.0)]
    text = bench_pareto.proxy_table(rows, tmp_path)
    assert "| gptq-w2-k0 | 2.20 | 90.00 | 12 | 4.5 |" in text and "| gptq-w4-k0 | 4.20 | 27.00 | 1.5 | 0.5625 |" in text
    assert "w3-k128" not in text  # not a measured candidate
    assert bench_pareto._spearman([1, 2, 3], [10, 20, 30]) == 1.0
    assert bench_pareto._spearman([3, 2, 1], [10, 20, 30]) == -1.0
