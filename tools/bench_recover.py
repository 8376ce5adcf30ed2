"""Benchmark `quikft recover` on the default model: ppl after each recovery method, step time, memory.

For B in {3, 2} bits with k = 128 salient columns: the quantized model (GPTQ, the quantize
issue's settings), then with the same small budget (100 steps x batch 4 x 512 tokens of
alpaca + c4, seed 0; never WikiText test): Salient-FT (post, no noise), Post-GIFT-SW (post,
4-bit noise), Pre-GIFT-SW (FP model trained with B-bit noise, then quantized with the same
salient columns) and a LoRA baseline on the quantized model (peft, rank 64 = about the
trainable parameters of k = 128). ppl is WikiText-2 test on the stride-8 subset (19 windows
of 2048 tokens), the same subset as tools/bench_quantize.py.

Each row runs as its own process (peak RSS is per row) and is appended to a JSONL file when
it finishes; a rerun skips finished rows. The quantized inputs (`w<B>-k128`, made once; an existing
one is reused) and each row's recovered output (`out-w<B>-<method>`) live under --checkpoints. Run from the
repository root:

    QUIKFT_DATA=../shared/data python tools/bench_recover.py [--only w3] [--results F]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from benchlib import append_result, load_results, parser

BUDGET = ["--data", "alpaca", "--data", "c4", "--steps", "100", "--batch-size", "4", "--seqlen", "512",
          "--seed", "0", "--eval-windows", "19"]
QUANTIZE = ["--salient", "128", "--calib", "c4", "--nsamples", "128", "--seqlen", "512", "--group-size", "128",
            "--asym", "--act-order", "--seed", "0", "--eval-windows", "0"]
METHODS = {  # row label -> recover flags
    "post": ["--mode", "post"],
    "salient-ft": ["--mode", "salient-ft"],
    "lora": ["--mode", "lora", "--lora-rank", "64"],
    "pre": ["--mode", "pre"],
}
ORDER = [(3, "post"), (3, "salient-ft"), (3, "lora"), (3, "pre"), (2, "post"), (2, "salient-ft"), (2, "pre"),
         (2, "lora")]


LOG = Path("runs/bench_recover.log")  # every row's progress bars and messages, to watch a long run


def cli(*args: str) -> subprocess.CompletedProcess:
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with open(LOG, "a") as log:
        log.write(f"\n$ quikft {' '.join(args)}\n")
        log.flush()
        done = subprocess.run([sys.executable, "-m", "quikft.cli", *args], stdout=subprocess.PIPE, stderr=log,
                              text=True)
    if done.returncode != 0:
        tail = LOG.read_text().strip().splitlines()[-1:]
        raise SystemExit(f"quikft {args[0]} failed: {tail}")
    return done


def checkpoint(bits: int, root: Path) -> Path:
    path = root / f"w{bits}-k128"
    if not (path / "config.json").exists():
        cli("quantize", "--bits", str(bits), *QUANTIZE, "--out", str(path))
    return path


def run_row(bits: int, method: str, root: Path, eval_before: bool) -> dict:
    flags = [*METHODS[method], *BUDGET]
    if method == "pre":
        flags += ["--bits", str(bits)]  # the default FP model in, quantized with B bits at the end
    else:
        flags += ["--model", str(checkpoint(bits, root))]
    if not eval_before:
        flags.append("--no-eval-before")
    out = root / f"out-w{bits}-{method}"  # kept: the recovered checkpoints are worth evaluating further
    began = time.perf_counter()
    cli("recover", *flags, "--out", str(out))
    wall = time.perf_counter() - began
    report = json.loads((out / "recover_report.json").read_text())
    before = report["ppl_before"]
    return {"row": f"w{bits}-{method}", "bits": bits, "method": method,
            "ppl_before": before["ppl"] if before else None, "ppl": report["ppl_after"]["ppl"],
            "step_s": report["step_seconds"], "wall_s": wall, "train_s": report["train_seconds"],
            "peak_rss_mb": report["peak_rss_mb"], "trainable": report["trainable_params"],
            "final_loss": report["loss_curve"][-1]["loss"], "first_loss": report["loss_curve"][0]["loss"]}


def fp_ppl() -> float:
    """The FP model's ppl on the same subset (cached by quikft after its first computation)."""
    from quikft.config import QuantizeJob
    from quikft.models import load_model
    from quikft.quantize import reference_ppl

    model, tokenizer = load_model(None)
    return reference_ppl(model, tokenizer, QuantizeJob(eval_windows=19))["ppl"]


def markdown(results: list[dict], fp: float) -> str:
    lines = ["| bits | method | ppl (wikitext2, stride 8) | gap closed | s/step | row wall s | peak RSS MiB "
             "| trainable params |", "|---|---|---|---|---|---|---|---|"]
    lines.append(f"| 16/32 | FP | {fp:.2f} | - | - | - | - | - |")
    for bits in sorted({r["bits"] for r in results}, reverse=True):
        rows = [r for r in results if r["bits"] == bits]
        quantized = next((r["ppl_before"] for r in rows if r["method"] != "pre" and r["ppl_before"]), None)
        if quantized:
            lines.append(f"| {bits} | quantized (GPTQ, k=128) | {quantized:.2f} | 0% | - | - | - | - |")
        for r in sorted(rows, key=lambda r: list(METHODS).index(r["method"])):
            closed = f"{(quantized - r['ppl']) / (quantized - fp):.0%}" if quantized else "-"
            lines.append(f"| {bits} | {r['method']} | {r['ppl']:.2f} | {closed} | {r['step_s']:.1f} | "
                         f"{r['wall_s']:.0f} | {r['peak_rss_mb']:.0f} | {r['trainable']:,} |")
    return "\n".join(lines)


def main() -> None:
    cli_args = parser(__doc__.splitlines()[0], "runs/bench_recover.jsonl")
    cli_args.add_argument("--checkpoints", default="runs/bench_recover", help="where the quantized inputs live")
    args = cli_args.parse_args()
    done = load_results(args.results)
    if not args.table_only:
        for bits, method in ORDER:
            row_id = f"w{bits}-{method}"
            if any(r["row"] == row_id for r in done) or (args.only and args.only not in row_id):
                continue
            # The quantized ppl is measured once per bit-width, by the first post-type row.
            measured = any(r["bits"] == bits and r["ppl_before"] for r in done)
            result = run_row(bits, method, Path(args.checkpoints), eval_before=not measured and method != "pre")
            print(f"{row_id}: ppl {result['ppl']:.2f}, {result['step_s']:.1f} s/step, {result['wall_s']:.0f}s",
                  flush=True)
            append_result(args.results, result)
            done.append(result)
    print(markdown(done, fp_ppl()))


if __name__ == "__main__":
    main()
