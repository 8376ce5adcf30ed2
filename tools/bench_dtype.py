"""Recovery speed by compute dtype: `--dtype auto` against forced bf16, natively and on an emulated AVX2 CPU.

Each row runs the README's recovery example (`quikft recover --mode post --data alpaca --data c4
--batch-size 4 --seqlen 512 --seed 0`) for a few steps, without evaluation, in its own process,
and reads s/step (the mean over the steps after the first) and the chosen dtype with its reason
from recover_report.json. An AVX2 machine is emulated on a newer CPU with
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``: PyTorch then dispatches its AVX2 kernels, and
bf16 matmuls take the slow reference path such machines have. ``--baseline DIR`` adds a row for
another quikft checkout (e.g. the code before `--dtype auto`, whose default was bf16 autocast).

    python tools/bench_dtype.py --model runs/w3 [--steps 3] [--baseline ../quikft-before]
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from benchlib import load_results, parser, run_missing, run_recover, step_times

REPO = Path(__file__).resolve().parents[1]
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
README_EXAMPLE = ["--mode", "post", "--data", "alpaca", "--data", "c4", "--batch-size", "4", "--seqlen", "512",
                  "--seed", "0", "--eval-windows", "0", "--no-eval-before"]
# (row id, environment, extra flags); the baseline row is added when --baseline is given.
ROWS = [
    ("native-auto", {}, ["--dtype", "auto"]),
    ("native-bf16", {}, ["--bf16"]),
    ("avx2-auto", AVX2, ["--dtype", "auto"]),
    ("avx2-bf16", AVX2, ["--bf16"]),
]


def run_row(row_id: str, env: dict, flags: list[str], model: str, steps: int, code: Path, timeout: float) -> dict:
    report, wall = run_recover(code, ["--model", model, *README_EXAMPLE, "--steps", str(steps), *flags], env, timeout)
    dtype = report.get("compute_dtype") or {"dtype": "bfloat16 (autocast)", "reason": "before --dtype existed"}
    capability = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                                env={**os.environ, **env}, capture_output=True, text=True).stdout.strip()
    return {"row": row_id, "code": str(code), "capability": capability, "dtype": dtype["dtype"],
            "reason": dtype["reason"], "steps": steps, "step_s": report["step_seconds"],
            "step_seconds": [round(s, 2) for s in step_times(report)],
            "tokens_per_s": report["tokens_per_s"], "wall_s": wall, "threads": os.environ.get("OMP_NUM_THREADS")}


def markdown(rows: list[dict]) -> str:
    lines = ["| row | code | torch capability | dtype | why | steps | s/step (steps 2..N) | each step s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {Path(r['code']).name} | {r['capability']} | {r['dtype']} | {r['reason']} | "
                     f"{r['steps']} | {r['step_s']:.1f} | {', '.join(f'{s:.1f}' for s in r['step_seconds'])} |")
    return "\n".join(lines)


def main() -> None:
    args = parser(__doc__.splitlines()[0], "runs/bench_dtype.jsonl")
    args.add_argument("--model", required=True, help="a packed checkpoint of the default model (quikft quantize)")
    args.add_argument("--steps", type=int, default=3, help="optimizer steps per row (the first is not timed)")
    args.add_argument("--baseline", default=None, help="another quikft checkout to time with its own defaults")
    args.add_argument("--timeout", type=float, default=3600, help="seconds per row")
    options = args.parse_args()
    options.model = str(Path(options.model).resolve()) if Path(options.model).exists() else options.model
    rows = [(row_id, env, flags, REPO) for row_id, env, flags in ROWS]
    if options.baseline:
        rows.insert(0, ("native-before", {}, [], Path(options.baseline).resolve()))
    done = load_results(options.results)
    if not options.table_only:
        runners = [(row_id, lambda row_id=row_id, env=env, flags=flags, code=code: run_row(
            row_id, env, flags, options.model, options.steps, code, options.timeout)) for row_id, env, flags, code in rows]
        run_missing(runners, done, options.results, options.only,
                    lambda r: f"{r['dtype']}, {r['step_s']:.1f} s/step")
    print(markdown(done))


if __name__ == "__main__":
    main()
