"""Benchmark `quikft recover` on the default model: every recovery mode at 4, 3 and 2 bits, two seeds.

For B in {4, 3, 2} bits with k = 128 salient columns: the quantized model (GPTQ, the quantize
issue's settings, one `quikft quantize` per bit-width reused by every row), then with the same
small budget (100 steps x batch 4 x 512 tokens of alpaca + c4, lr 1e-4, cosine; never WikiText
test; --steps and --lr change it for every row, and each budget keeps its own --results file) and seeds 0 and 1 (the seed draws the training rows' order and the noise; the quantized
input is the same): Pre-GIFT-SW (the FP model trained with B-bit noise, then quantized with the
same salient columns), Post-GIFT-SW (4-bit noise on the frozen quantized weights), Salient-FT
(post without noise), a LoRA baseline on the packed model (peft, rank 64 = about the trainable
parameters of k = 128) and Post-GIFT-SW with the KD loss at 3 and 2 bits. ppl is WikiText-2 test
on the stride-8 subset (19 windows of 2048 tokens), the same subset as tools/bench_quantize.py.

Each row runs as its own process (peak RSS is per row) and is appended to a JSONL file when it
finishes; a rerun skips finished rows, so a long grid resumes where it stopped. Rows run in
ORDER, the most informative first. The quantized inputs (`w<B>-k128`, made once; an existing one
is reused) and every row's recovered output (`out-w<B>-<method>-s<seed>`, kept for zero-shot
evaluation) live under --checkpoints; rows run with the quikft of --code (default: this
checkout), from outside the working tree. The table gives per cell the mean over seeds, each
seed's ppl, the half-range |a - b| / 2 as the spread, the gap to FP closed by the mean, s/step
(mean over steps 2-100), tokens/s and peak RSS.

    QUIKFT_DATA=../shared/data python tools/bench_recover.py [--only w3-post] [--results F] [--code DIR]
        [--lr 3e-4 --results runs/bench_recover_lr3e-4.jsonl]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import mean

from benchlib import append_result, child_env, load_results, parser

REPO = Path(__file__).resolve().parents[1]
DATA = ["--data", "alpaca", "--data", "c4", "--batch-size", "4", "--seqlen", "512", "--eval-windows", "19"]
QUANTIZE = ["--salient", "128", "--calib", "c4", "--nsamples", "128", "--seqlen", "512", "--group-size", "128",
            "--asym", "--act-order", "--seed", "0", "--eval-windows", "0"]
METHODS = {  # row label -> recover flags
    "pre": ["--mode", "pre"],
    "post": ["--mode", "post"],
    "post-kd": ["--mode", "post", "--loss", "kd"],
    "salient-ft": ["--mode", "salient-ft"],
    "lora": ["--mode", "lora", "--lora-rank", "64"],
}
LABELS = {"pre": "Pre-GIFT-SW", "post": "Post-GIFT-SW", "post-kd": "Post-GIFT-SW, KD loss",
          "salient-ft": "Salient-FT", "lora": "LoRA r=64"}
SEEDS = (0, 1)


def _pairs(*cells: tuple[int, str]) -> list[tuple[int, str, int]]:
    """Both seeds of each cell, seed 0 of every cell first."""
    return [(bits, method, seed) for seed in SEEDS for bits, method in cells]


# The paper's three claims first (3 bits: post ~ salient-ft; 2 bits: post > salient-ft; 4 bits: pre best),
# then KD, then the remaining cells; LoRA last.
ORDER = (_pairs((3, "post"), (3, "salient-ft")) + _pairs((2, "post"), (2, "salient-ft"))
         + _pairs((4, "pre"), (4, "post")) + _pairs((3, "post-kd"), (2, "post-kd"))
         + _pairs((4, "salient-ft"), (3, "pre"), (2, "pre")) + _pairs((4, "lora"), (3, "lora"), (2, "lora")))

LOG = Path("runs/bench_recover.log")  # every row's progress bars and messages (beside --results)


def cli(code: Path, *args: str) -> subprocess.CompletedProcess:
    LOG.parent.mkdir(parents=True, exist_ok=True)
    with open(LOG, "a") as log:
        log.write(f"\n$ quikft {' '.join(args)}\n")
        log.flush()
        # From outside the working tree: `python -m` puts the working directory first on sys.path.
        done = subprocess.run([sys.executable, "-m", "quikft.cli", *args], stdout=subprocess.PIPE, stderr=log,
                              text=True, cwd=LOG.parent.resolve(), env=child_env(code))
    if done.returncode != 0:
        tail = LOG.read_text().strip().splitlines()[-1:]
        raise SystemExit(f"quikft {args[0]} failed: {tail}")
    return done


def checkpoint(bits: int, root: Path, code: Path) -> Path:
    path = root / f"w{bits}-k128"
    if not (path / "config.json").exists():
        cli(code, "quantize", "--bits", str(bits), *QUANTIZE, "--out", str(path))
    return path


@dataclass(frozen=True)
class Budget:
    """What every row of one grid shares; rows of different budgets are not comparable."""

    steps: int = 100
    lr: float = 1e-4

    def __str__(self) -> str:
        return f"{self.steps} steps at lr {self.lr:g}"

    def flags(self) -> list[str]:
        return [*DATA, "--steps", str(self.steps), "--lr", repr(self.lr)]

    def of(self, row: dict) -> Budget:
        """The budget a finished row ran with (rows written before lr was recorded ran at 1e-4)."""
        return Budget(row.get("steps", 100), row.get("lr", 1e-4))

    def check(self, done: list[dict], results: str) -> None:
        """Refuse to add rows of this budget to a file of another budget's rows."""
        other = next((self.of(r) for r in done if self.of(r) != self), None)
        if other is not None:
            raise SystemExit(f"Error: {results} holds rows of {other} (asked for {self}); give this budget its own "
                             f"--results file")


def row_id(bits: int, method: str, seed: int) -> str:
    return f"w{bits}-{method}-s{seed}"


def run_row(bits: int, method: str, seed: int, root: Path, code: Path, eval_before: bool, budget: Budget) -> dict:
    code = code.resolve()
    flags = [*METHODS[method], *budget.flags(), "--seed", str(seed)]
    if method == "pre":
        flags += ["--bits", str(bits)]  # the default FP model in, quantized with B bits at the end
    else:
        flags += ["--model", str(checkpoint(bits, root, code))]
    if not eval_before:
        flags.append("--no-eval-before")
    out = root / f"out-{row_id(bits, method, seed)}"  # kept: the recovered checkpoints are evaluated further
    began = time.perf_counter()
    cli(code, "recover", *flags, "--out", str(out))
    wall = time.perf_counter() - began
    report = json.loads((out / "recover_report.json").read_text())
    before = report["ppl_before"]
    return {"row": row_id(bits, method, seed), "bits": bits, "method": method, "seed": seed, **asdict(budget),
            "ppl_before": before["ppl"] if before else None, "ppl": report["ppl_after"]["ppl"],
            "step_s": report["step_seconds"], "tokens_per_s": report["tokens_per_s"], "wall_s": wall,
            "train_s": report["train_seconds"], "peak_rss_mb": report["peak_rss_mb"],
            "trainable": report["trainable_params"], "compute_dtype": report["config"]["compute_dtype"],
            "final_loss": report["loss_curve"][-1]["loss"], "first_loss": report["loss_curve"][0]["loss"],
            "code": str(code), "out": str(out)}


def fp_ppl(code: Path) -> float:
    """The FP model's ppl on the same subset (cached by quikft after its first computation), with the
    quikft of ``code`` like the rows (it need not be installed)."""
    sys.path.insert(0, str(code.resolve()))
    from quikft.config import QuantizeJob
    from quikft.jobs.quantize import reference_ppl
    from quikft.models import load_model

    model, tokenizer = load_model(None)
    return reference_ppl(model, tokenizer, QuantizeJob(eval_windows=19))["ppl"]


def quantized_ppl(results: list[dict], bits: int) -> float | None:
    """The quantized input's ppl, measured by the first post-type row of that bit-width."""
    return next((r["ppl_before"] for r in results if r["bits"] == bits and r["method"] != "pre"
                 and r["ppl_before"]), None)


def cells(results: list[dict]) -> dict[tuple[int, str], list[dict]]:
    grouped: dict[tuple[int, str], list[dict]] = {}
    for r in sorted(results, key=lambda r: r["seed"]):
        grouped.setdefault((r["bits"], r["method"]), []).append(r)
    return grouped


def gap_closed(quantized: float | None, fp: float, ppl: float) -> float | None:
    return (quantized - ppl) / (quantized - fp) if quantized else None


def markdown(results: list[dict], fp: float) -> str:
    lines = ["| bits | method | ppl mean ± half-range (seeds) | per seed | gap closed | s/step | tokens/s "
             "| peak RSS MiB | trainable params |", "|---|---|---|---|---|---|---|---|---|",
             f"| 16/32 | FP | {fp:.2f} | - | - | - | - | - | - |"]
    grouped = cells(results)
    for bits in sorted({b for b, _ in grouped}, reverse=True):
        quantized = quantized_ppl(results, bits)
        if quantized:
            lines.append(f"| {bits} | quantized (GPTQ, k=128) | {quantized:.2f} | - | 0% | - | - | - | - |")
        for method in METHODS:
            rows = grouped.get((bits, method))
            if not rows:
                continue
            ppls = [r["ppl"] for r in rows]
            spread = (max(ppls) - min(ppls)) / 2
            closed = gap_closed(quantized, fp, mean(ppls))
            per_seed = ", ".join(f"s{r['seed']} {r['ppl']:.2f}" for r in rows)
            lines.append(f"| {bits} | {LABELS[method]} | {mean(ppls):.2f} ± {spread:.2f} ({len(rows)}) | {per_seed} | "
                         f"{'-' if closed is None else f'{closed:.1%}'} | {mean(r['step_s'] for r in rows):.1f} | "
                         f"{mean(r['tokens_per_s'] for r in rows):.0f} | {max(r['peak_rss_mb'] for r in rows):.0f} | "
                         f"{rows[0]['trainable']:,} |")
    return "\n".join(lines)


def main() -> None:
    cli_args = parser(__doc__.splitlines()[0], "runs/bench_recover.jsonl")
    cli_args.add_argument("--checkpoints", default="runs/bench_recover", help="where the quantized inputs live")
    cli_args.add_argument("--code", default=str(REPO), help="the quikft checkout the rows run")
    cli_args.add_argument("--steps", type=int, default=100, help="optimizer steps per row (the budget: 100)")
    cli_args.add_argument("--lr", type=float, default=1e-4, help="learning rate of every row (the budget: 1e-4)")
    args = cli_args.parse_args()
    budget = Budget(args.steps, args.lr)
    global LOG
    LOG = Path(args.results).resolve().with_suffix(".log")
    done = load_results(args.results)
    budget.check(done, args.results)
    # Not resolved here: a symlink given as --code is followed at each row's start, so the code of
    # later rows can be updated while a long grid runs (each row records the checkout it ran).
    root, code = Path(args.checkpoints).resolve(), Path(args.code).absolute()
    if not args.table_only:
        for bits, method, seed in ORDER:
            row = row_id(bits, method, seed)
            if any(r["row"] == row for r in done) or (args.only and args.only not in row):
                continue
            measured = quantized_ppl(done, bits) is not None  # the quantized ppl is measured once per bit-width
            result = run_row(bits, method, seed, root, code, not measured and method != "pre", budget)
            print(f"{row}: ppl {result['ppl']:.2f}, {result['step_s']:.1f} s/step, {result['wall_s']:.0f}s",
                  flush=True)
            append_result(args.results, result)
            done.append(result)
    print(f"budget: {budget} (x batch 4 x 512 tokens)")
    print(markdown(done, fp_ppl(code)))


if __name__ == "__main__":
    main()
