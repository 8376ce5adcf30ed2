"""tools/bench_inference.py: which rows a run plans, and the table it prints (no model is run here)."""

import sys
from argparse import Namespace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_inference  # noqa: E402


def test_forced_kernel_rows_follow_the_named_variants():
    assert bench_inference.selected_variants(None, "cpu-int4,cpu-ort-int8") == [
        "fp32", "bf16", "packed", "packed-ref", "packed:cpu-int4", "packed:cpu-ort-int8"]
    assert bench_inference.selected_variants("packed", None) == ["packed"]
    with pytest.raises(SystemExit, match="unknown variant"):
        bench_inference.selected_variants("packed,fast", None)


def test_the_table_counts_memory_outside_torch_against_fp32():
    common = {"dtype": "float32", "disk_mib": 1.0, "rss_loaded_mib": 1.0, "rss_after_mib": 1.0, "prefill_tok_s": 10.0,
              "cpu_capability": "AVX2", "threads": 2, "torch": "2.13.0"}
    rows = [{**common, "label": "m", "variant": "fp32", "model_mib": 100.0, "kernels": {}, "decode_tok_s": 2.0},
            {**common, "label": "m", "variant": "packed", "model_mib": 20.0, "hidden_mib": 10.0,
             "kernels": {"q_proj": "cpu-ort-int8/cpu-int4"}, "decode_tok_s": 3.0}]
    args = Namespace(prompt_len=32, new_tokens=32, repeats=3, rounds=1)
    table = bench_inference.markdown(rows, args)
    assert "CPU capability AVX2" in table
    packed = table.splitlines()[-1]
    assert "| 20.0 | 10.0 | 30.0% |" in packed and "1.50x" in packed and "cpu-ort-int8/cpu-int4 (all)" in packed
