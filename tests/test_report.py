import json
import sys

import pytest
from click.testing import CliRunner

from quikft.cli import main
from quikft.data import DataError
from quikft.eval.report import (
    CODE_BITS_LABEL,
    PER_WEIGHT_LABEL,
    build_report,
    collect_rows,
    find_json_files,
    markdown_table,
    ppl_vs_bits_series,
    report_kind,
)


def ppl(value, windows=4):
    return {"dataset": "wikitext2", "ppl": value, "windows": windows, "seconds": 10.0}


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture()
def runs(tmp_path):
    """A quantize run with an eval file beside it, an RTN run, a recover run, a lone eval and noise."""
    root = tmp_path / "runs"
    config = {"model": None, "bits": 3, "salient": 128, "metric": "gift", "method": "gptq"}
    write(root / "w3-gptq" / "quantize_report.json",
          {"job": "quantize", "config": config, "quantize_seconds": 300.0, "wall_seconds": 357.0,
           "fp_ppl": ppl(21.33), "ppl": ppl(26.81), "layers": [],
           "bits_per_weight": {"linear": 5.653, "model": 7.833}})
    write(root / "w3-gptq" / "config.json", {"model_type": "llama"})  # model files are ignored silently
    write(root / "w3-gptq" / "eval.json",
          {"job": "eval", "model": "w3-gptq", "ppl": [],
           "tasks": [{"task": "arc_easy", "n": 570, "seconds": 100.0,
                      "metrics": {"acc": {"value": 0.5, "stderr": 0.02}, "acc_norm": {"value": 0.4, "stderr": 0.02}}},
                     {"task": "boolq", "n": 2000, "seconds": 200.0, "metrics": {"acc": {"value": 0.6, "stderr": 0.01}}}]})
    write(root / "w4-rtn" / "quantize_report.json",
          {"config": dict(config, bits=4, method="rtn", salient=0), "quantize_seconds": 5.0, "wall_seconds": 65.0,
           "fp_ppl": ppl(21.33), "ppl": ppl(24.0), "unknown_key": [1, 2]})
    write(root / "w3-gift" / "recover_report.json",
          {"job": "recover", "config": {"mode": "post", "bits": 3, "noise": True, "noise_bits": 4, "salient": 128}, "ppl_before": 26.81,
           "ppl_after": 24.5, "bits_per_weight": {"linear": 5.653, "model": 7.833}, "fp_ppl": None, "seconds": 600.0,
           "loss_curve": [{"step": 0, "loss": 3.1, "lr": 1e-4}, {"step": 10, "loss": 2.7, "lr": 1e-4}]})
    write(root / "fp_eval.json", {"model": "smollm2-135m", "dtype": "float32", "ppl": [ppl(21.61, 148)]})
    write(root / "notes.json", {"hello": "world"})
    (root / "broken.json").write_text("{not json")
    return root


def test_report_kinds():
    assert report_kind({"job": "quantize"}) == "quantize"
    assert report_kind({"ppl_after": 3.0, "config": {}}) == "recover"
    assert report_kind({"model": "m", "ppl": []}) == "eval"
    assert report_kind({"model": "m"}) is None and report_kind([1, 2]) is None


def test_report_table_rows_and_plots(runs, tmp_path):
    out = tmp_path / "report"
    report, notes = build_report([runs], out)
    markdown = (out / "report.md").read_text()
    assert markdown == report.markdown
    main_table = markdown.split("## Zero-shot")[0]
    rows = {line.split(" | ")[0].lstrip("| "): line for line in main_table.splitlines() if line.startswith("| ")}
    gptq = rows[str(runs / "w3-gptq")]
    assert "| GPTQ | 3 | 128 | 5.65 | 7.83 | 26.81 | 4 | 55.00 (2) | 5m 57s | metric gift |" in gptq
    assert "| RTN | 4 | 0 | – | – | 24.00 | 4 | – | 1m 05s |" in rows[str(runs / "w4-rtn")]  # an older report
    recover = rows[str(runs / "w3-gift")]
    assert "| GIFT-SW (post) | 3 | 128 | 5.65 | 7.83 | 24.50 |" in recover
    assert "ppl before 26.81, noise 4-bit |" in recover
    assert "| eval | – | – | – | – | 21.61 | 148 |" in rows[str(runs / "fp_eval.json")]
    fp_rows = [line for line in markdown.splitlines() if "| FP |" in line]
    assert len(fp_rows) == 1 and "21.33" in fp_rows[0]  # one FP reference, not one per quantize run
    assert "| arc_easy | boolq |" in markdown and "50.00 / 40.00 | 60.00 |" in markdown
    assert any("skipped 2 JSON file(s)" in note and "notes.json" in note for note in notes)
    if "matplotlib" in sys.modules or _has_matplotlib():
        assert (out / "ppl_vs_bits.png").read_bytes()[:4] == b"\x89PNG"
        assert (out / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
        assert "![ppl_vs_bits](ppl_vs_bits.png)" in markdown


def test_ppl_is_plotted_against_bits_per_weight_when_every_run_counts_them(runs, tmp_path):
    config = {"bits": 3, "salient": 0.03, "method": "gptq"}  # a fraction of each layer's inputs
    write(runs / "w3-k3pct" / "quantize_report.json",
          {"job": "quantize", "config": config, "quantize_seconds": 1.0, "ppl": ppl(28.0),
           "bits_per_weight": {"linear": 3.71, "model": 6.2}})
    rows, _ = collect_rows(find_json_files([runs]))
    fraction = next(row for row in rows if row.run == str(runs / "w3-k3pct"))
    assert fraction.salient == 0.03 and fraction.series() == "GPTQ k=3%"
    assert "| GPTQ | 3 | 3% | 3.71 | 6.20 | 28.00 |" in markdown_table(rows)

    def lines(rows):  # the recover report's bare ppl has no window count: labels name the windows
        xlabel, series, fp = ppl_vs_bits_series(rows)
        return xlabel, {name.rsplit(" (", 1)[0]: points for name, points in series.items()}, fp

    xlabel, series, fp = lines(rows)  # the RTN report has no count: code bits for every run
    assert xlabel == CODE_BITS_LABEL and series["RTN k=0"] == [(4, 24.0)] and series["GPTQ k=3%"] == [(3, 28.0)]
    assert fp == [("FP smollm2-135m (4 windows)", 21.33)]
    xlabel, series, _ = lines([row for row in rows if row.method != "RTN"])
    assert xlabel == PER_WEIGHT_LABEL
    assert series["GPTQ k=128"] == [(5.653, 26.81)] and series["GPTQ k=3%"] == [(3.71, 28.0)]
    assert series["GIFT-SW (post) k=128"] == [(5.653, 24.5)]
    if _has_matplotlib():
        build_report([runs / "w3-k3pct", runs / "w3-gptq"], tmp_path / "out")
        assert (tmp_path / "out" / "ppl_vs_bits.png").read_bytes()[:4] == b"\x89PNG"


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def test_report_without_matplotlib_writes_markdown_and_says_how(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    out = tmp_path / "report"
    _, notes = build_report([runs / "w3-gift"], out)
    assert (out / "report.md").exists() and not (out / "loss_curves.png").exists()
    assert notes == ['plots skipped: matplotlib is not installed (pip install -e ".[report]")']


def test_report_errors_are_one_line(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_report([tmp_path / "missing"], tmp_path / "out")
    write(tmp_path / "empty" / "x.json", {"a": 1})
    with pytest.raises(DataError, match="no quikft reports found"):
        build_report([tmp_path / "empty"], tmp_path / "out")


def test_cli_report(runs, tmp_path):
    out = tmp_path / "cli-report"
    result = CliRunner().invoke(main, ["report", str(runs / "w3-gptq"), str(runs / "fp_eval.json"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| GPTQ | 3 | 128 | 5.65 |" in result.output and f"wrote {out / 'report.md'}" in result.output
    missing = CliRunner().invoke(main, ["report", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and missing.output.count("\n") == 1 and "does not exist" in missing.output


def test_a_budget_run_is_one_line_of_its_own_at_its_bits_per_weight(runs):
    config = {"bits": 3, "salient": 128, "method": "gptq", "target_bpw": 4.0}  # bits, k unused under a budget
    write(runs / "bpw4" / "quantize_report.json",
          {"job": "quantize", "config": config, "quantize_seconds": 1.0, "ppl": ppl(25.0),
           "bits_per_weight": {"linear": 3.99, "model": 6.6}})
    rows, _ = collect_rows(find_json_files([runs / "bpw4", runs / "w3-gptq"]))
    budget = next(row for row in rows if row.run == str(runs / "bpw4"))
    assert budget.bits is None and budget.salient is None and budget.series() == "GPTQ --target-bpw"
    assert "--target-bpw 4: bits and k per layer" in markdown_table(rows)
    xlabel, series, _ = ppl_vs_bits_series(rows)
    assert xlabel == PER_WEIGHT_LABEL and series["GPTQ --target-bpw"] == [(3.99, 25.0)]
