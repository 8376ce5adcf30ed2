"""Recovery on one process, as DDP over 2 processes and sharded with FSDP2 over 2 processes (CPU, gloo).

The same job in each row: ``quikft recover --mode salient-ft`` (no noise, so the three runs train the
same trajectory and can be compared) in fp32 on a packed checkpoint, 6 steps of 4 rows x 256 tokens of
C4, one thread per process. The table gives seconds per step, each process's peak RSS during training,
the last loss, and how far the trained columns' total change is from the one-process run's (relative
Frobenius norm).

    QUIKFT_DATA=../shared/data python tools/bench_fsdp.py --model runs/smollm2-135m-w3-k128-gptq
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from benchlib import child_env, load_results, parser, run_missing  # noqa: E402
from conftest import read_weights  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROWS = {"1 process": (1, "ddp"), "DDP x2": (2, "ddp"), "FSDP2 x2": (2, "fsdp2")}


def recover_args(model: str, out: Path, sharding: str) -> list[str]:
    return ["recover", "--model", model, "--mode", "salient-ft", "--data", "c4", "--steps", "6", "--batch-size", "4",
            "--seqlen", "256", "--lr", "1e-4", "--eval-windows", "0", "--fp32", "--device", "cpu", "--seed", "0",
            "--sharding", sharding, "--out", str(out)]


def run_row(row: str, model: str, root: Path) -> dict:
    processes, sharding = ROWS[row]
    out = root / row.replace(" ", "-")
    shutil.rmtree(out, ignore_errors=True)
    env = child_env(REPO, {"OMP_NUM_THREADS": "1"})
    launch = [sys.executable, "-m", "quikft.cli"] if processes == 1 else [
        "accelerate", "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "quikft.cli"]
    subprocess.run([*launch, *recover_args(model, out, sharding)], env=env, check=True, stdout=subprocess.DEVNULL)
    report = json.loads((out / "recover_report.json").read_text())
    return {"row": row, "processes": processes, "sharding": sharding, "s_per_step": report["step_seconds"],
            "peak_rss_mb_per_process": report["peak_rss_mb_per_process"],
            "last_loss": report["loss_curve"][-1]["loss"], "out": str(out)}


def _salient(directory: str) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in read_weights(directory).items() if k.endswith(".salient_weight")}


def change_error(a: str, b: str, initial: dict[str, torch.Tensor]) -> float:
    sa, sb = _salient(a), _salient(b)
    delta_a = torch.cat([(sa[k] - initial[k]).flatten() for k in initial])
    delta_b = torch.cat([(sb[k] - initial[k]).flatten() for k in initial])
    return float(torch.linalg.norm(delta_a - delta_b) / torch.linalg.norm(delta_a))


def table(rows: list[dict], model: str) -> str:
    lines = ["| run | processes | s/step | peak RSS per process (MiB) | last loss | trained change vs 1 process |",
             "|---|---|---|---|---|---|"]
    reference = next((r for r in rows if r["row"] == "1 process"), None)
    initial = _salient(model) if reference and Path(model).exists() else None
    for row in rows:
        error = (f"{change_error(reference['out'], row['out'], initial):.1e}"
                 if initial is not None and Path(row["out"]).exists() else "-")
        peaks = " / ".join(f"{p:.0f}" for p in row["peak_rss_mb_per_process"])
        lines.append(f"| {row['row']} | {row['processes']} | {row['s_per_step']:.2f} | {peaks} | "
                     f"{row['last_loss']:.5f} | {error} |")
    return "\n".join(lines)


def main() -> None:
    p = parser(__doc__.splitlines()[0], "runs/bench_fsdp/results.jsonl")
    p.add_argument("--model", default="runs/smollm2-135m-w3-k128-gptq", help="a packed checkpoint")
    args = p.parse_args()
    rows = load_results(args.results)
    root = Path(args.results).parent
    if not args.table_only:
        jobs = [(row, lambda r=row: run_row(r, args.model, root)) for row in ROWS]
        run_missing(jobs, rows, args.results, args.only, lambda r: f"{r['s_per_step']:.2f} s/step")
    print(table(rows, args.model))


if __name__ == "__main__":
    main()
