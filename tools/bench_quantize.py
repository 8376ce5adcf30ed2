"""Benchmark `quikft quantize` on the default model: ppl, wall time and peak RSS per setting.

Rows: RTN and GPTQ x bits {4, 3, 2} x salient {0, 32, 128}, plus the saliency metric presets
(gift, quik, owq, wanda) at 3 and 2 bits with 128 salient columns (the paper's Table 5
ablation). Calibration is fixed (128 x 512 tokens of the C4 sample, seed 0); ppl is WikiText-2
test on the stride-8 subset (19 windows of 2048 tokens).

Each row runs as its own `quikft quantize` process (so peak RSS is per row) and is appended
to a JSONL file as soon as it finishes; a rerun skips rows already there, so an interrupted
benchmark resumes where it stopped. Run from the repository root:

    QUIKFT_DATA=../shared/data python tools/bench_quantize.py [--only gptq-w3] [--results F]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchlib import append_result, load_results, parser

CALIB = ["--calib", "c4", "--nsamples", "128", "--seqlen", "512", "--group-size", "128", "--asym",
         "--act-order", "--seed", "0", "--eval-windows", "19"]


def rows() -> list[tuple[str, list[str]]]:
    """(row id, quantize flags), most informative rows first so a partial run is still useful:
    the issue's bars, then the 3-bit metric ablation, then the rest of the grid."""
    def gift(method: str, bits: int, k: int) -> tuple[str, list[str]]:
        return (f"{method}-w{bits}-k{k}-gift",
                ["--method", method, "--bits", str(bits), "--salient", str(k), "--metric", "gift"])

    def metric(name: str, bits: int) -> tuple[str, list[str]]:
        return (f"gptq-w{bits}-k128-{name}",
                ["--method", "gptq", "--bits", str(bits), "--salient", "128", "--metric", name])

    first = [gift("gptq", 3, 128), gift("gptq", 3, 0), gift("gptq", 4, 128), gift("gptq", 2, 128),
             gift("rtn", 3, 128), *(metric(m, 3) for m in ("quik", "owq", "wanda")),
             gift("gptq", 3, 32), gift("gptq", 4, 0), gift("gptq", 2, 0)]
    grid = [gift(m, b, k) for m in ("gptq", "rtn") for b in (4, 3, 2) for k in (0, 32, 128)]
    ablation = [metric(m, 2) for m in ("quik", "owq", "wanda")]
    ordered = first + ablation + grid
    return list({row_id: flags for row_id, flags in ordered}.items())


def run_row(row_id: str, flags: list[str], model: str | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "quikft.cli", "quantize", *flags, *CALIB, "--out", str(out)]
        if model:
            cmd += ["--model", model]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{row_id} failed: {done.stderr.strip().splitlines()[-1:]}")
        report = json.loads((out / "quantize_report.json").read_text())
    config = report["config"]
    return {"row": row_id, "method": config["method"], "bits": config["bits"], "salient": config["salient"],
            "metric": config["metric"], "ppl": report["ppl"]["ppl"], "fp_ppl": report["fp_ppl"]["ppl"],
            "quantize_s": report["wall_seconds"] - report["eval_seconds"], "loop_s": report["quantize_seconds"],
            "peak_rss_mb": report["peak_rss_mb"], "salient_fraction": report["salient_fraction"],
            "linear_bpw": (report.get("bits_per_weight") or {}).get("linear")}


def markdown(results: list[dict]) -> str:
    lines = ["| method | bits | salient k | metric | bits/weight (linear layers) | ppl (wikitext2, stride 8) "
             "| quantize wall s | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|"]
    if results:
        lines.append(f"| FP (no quantization) | 32 | - | - | 32 | {results[0]['fp_ppl']:.2f} | - | - |")
    for r in sorted(results, key=lambda r: (r["metric"] != "gift", r["method"], -r["bits"], r["salient"], r["metric"])):
        bpw = f"{r['linear_bpw']:.2f}" if r.get("linear_bpw") is not None else "-"  # older results lack it
        lines.append(f"| {r['method']} | {r['bits']} | {r['salient']} ({r['salient_fraction']:.0%}) | {r['metric']} "
                     f"| {bpw} | {r['ppl']:.2f} | {r['quantize_s']:.0f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    cli = parser(__doc__.splitlines()[0], "runs/bench_quantize.jsonl")
    cli.add_argument("--model", default=None, help="model (default: the embedded default model)")
    args = cli.parse_args()
    done = load_results(args.results)
    if not args.table_only:
        finished = {r["row"] for r in done}
        for row_id, flags in rows():
            if row_id in finished or (args.only and args.only not in row_id):
                continue
            result = run_row(row_id, flags, args.model)
            print(f"{row_id}: ppl {result['ppl']:.2f}, {result['quantize_s']:.0f}s", flush=True)
            append_result(args.results, result)
            done.append(result)
    print(markdown(done))


if __name__ == "__main__":
    main()
