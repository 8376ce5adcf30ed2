"""Recovery step time of this checkout against another one (--baseline), same settings, one run.

Each row runs `quikft recover` for a few steps at the bench_recover settings (alpaca + c4,
batch 4 x 512 tokens, seed 0, lr 1e-4, `--dtype auto`), without evaluation, in its own process,
and reads each step's seconds from recover_report.json; s/step is the mean over the steps after
the first (which pays one-off costs). The baseline and this checkout alternate (baseline, new,
baseline, new, ...) so that a change in the load of a shared machine hits both alike. Modes:
Post-GIFT-SW with cross-entropy (`post`) and with the KD loss (`post-kd`, the teacher is the
checkpoint's source model) and Salient-FT (`salient-ft`: no noise, so both checkouts must
report the same losses up to float rounding); `--modes` picks some.

    python tools/bench_step.py --model runs/w3 --baseline ../quikft-before [--steps 4] [--repeats 2]
"""

from __future__ import annotations

import os
from pathlib import Path
from statistics import mean

from benchlib import load_results, parser, run_missing, run_recover, step_times

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ["--data", "alpaca", "--data", "c4", "--batch-size", "4", "--seqlen", "512", "--seed", "0",
            "--lr", "1e-4", "--eval-windows", "0", "--no-eval-before"]
MODES = {"post": ["--mode", "post"], "post-kd": ["--mode", "post", "--loss", "kd"],
         "salient-ft": ["--mode", "salient-ft"], "lora": ["--mode", "lora", "--lora-rank", "64"]}


def run_row(row_id: str, code: Path, mode: str, model: str, steps: int) -> dict:
    report, wall = run_recover(code, ["--model", model, *MODES[mode], *SETTINGS, "--steps", str(steps)])
    seconds = step_times(report)
    timed = seconds[1:] or seconds
    return {"row": row_id, "code": str(code), "mode": mode, "steps": steps, "step_s": mean(timed),
            "step_seconds": [round(s, 2) for s in seconds], "tokens_per_s": 4 * 512 / mean(timed),
            "losses": [round(p["loss"], 4) for p in report["loss_curve"]],
            "peak_rss_mb": report["peak_rss_mb"], "wall_s": wall, "threads": os.environ.get("OMP_NUM_THREADS")}


def markdown(rows: list[dict]) -> str:
    lines = ["| mode | code | run | s/step (steps 2..N) | each step s | tokens/s | peak RSS MiB | losses |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {Path(r['code']).name} | {r['row']} | {r['step_s']:.2f} | "
                     f"{', '.join(f'{s:.1f}' for s in r['step_seconds'])} | {r['tokens_per_s']:.0f} | "
                     f"{r['peak_rss_mb']:.0f} | {', '.join(f'{x:.3f}' for x in r['losses'])} |")
    lines += ["", "| mode | baseline s/step | new s/step | new / baseline |", "|---|---|---|---|"]
    for mode in dict.fromkeys(r["mode"] for r in rows):
        old = [r["step_s"] for r in rows if r["mode"] == mode and r["row"].startswith("baseline")]
        new = [r["step_s"] for r in rows if r["mode"] == mode and r["row"].startswith("new")]
        if old and new:
            lines.append(f"| {mode} | {mean(old):.2f} | {mean(new):.2f} | {mean(new) / mean(old):.2f} |")
    return "\n".join(lines)


def main() -> None:
    args = parser(__doc__.splitlines()[0], "runs/bench_step.jsonl")
    args.add_argument("--model", required=True, help="a packed checkpoint of the default model (quikft quantize)")
    args.add_argument("--baseline", required=True, help="the quikft checkout to compare against")
    args.add_argument("--steps", type=int, default=4, help="optimizer steps per row (the first is not timed)")
    args.add_argument("--repeats", type=int, default=2, help="baseline/new pairs per mode")
    args.add_argument("--modes", default="post,post-kd,salient-ft", help=f"comma-separated, of {', '.join(MODES)}")
    options = args.parse_args()
    model = str(Path(options.model).resolve())
    codes = {"baseline": Path(options.baseline).resolve(), "new": REPO}
    rows = [(f"{which}-{mode}-{repeat}", code, mode) for mode in options.modes.split(",")
            for repeat in range(options.repeats) for which, code in codes.items()]
    done = load_results(options.results)
    if not options.table_only:
        runners = [(row_id, lambda row_id=row_id, code=code, mode=mode: run_row(row_id, code, mode, model,
                                                                                options.steps))
                   for row_id, code, mode in rows]
        run_missing(runners, done, options.results, options.only, lambda r: f"{r['step_s']:.2f} s/step")
    print(markdown(done))


if __name__ == "__main__":
    main()
