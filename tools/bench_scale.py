"""Quantizing models larger than memory: peak RSS and time against depth and width, and resume after SIGKILL.

Random LLaMA-shaped models (vocab 4096) are saved in bf16 as sharded safetensors: hidden 1024 /
intermediate 2816 with 8, 16 and 32 blocks, and one wider model (hidden 2048 / intermediate 5632,
8 blocks). Each is quantized by ``quikft quantize`` in its own process (3 bits, k = 128, small
calibration: 16 windows of 256 C4 tokens, ``--eval-windows 0``, no clipping search: the search
changes the time per block, not the memory); the table gives the weights on
disk, the process's peak RSS, seconds per block and the resumable state's bytes per block. The
``resume`` row kills a quantize of the 32-block model with SIGKILL once half its blocks are
committed, reruns the same command with ``--resume`` and compares every output tensor with the
uninterrupted run's.

    QUIKFT_DATA=../shared/data python tools/bench_scale.py [--only b32] [--table-only]
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from benchlib import child_env, load_results, parser, run_missing  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODELS = {  # id: (hidden, intermediate, heads, blocks)
    "h1024-b8": (1024, 2816, 16, 8),
    "h1024-b16": (1024, 2816, 16, 16),
    "h1024-b32": (1024, 2816, 16, 32),
    "h2048-b8": (2048, 5632, 16, 8),
}
VOCAB = 4096
QUANTIZE = ["--bits", "3", "--calib", "c4", "--nsamples", "16", "--seqlen", "256", "--eval-windows", "0",
            "--no-clip-search", "--device", "cpu"]


def build_model(directory: Path, hidden: int, intermediate: int, heads: int, blocks: int) -> None:
    """A random bf16 LLaMA-shaped checkpoint in 200 MB shards, with a small tokenizer (done once)."""
    if (directory / "config.json").exists():
        return
    import torch
    from conftest import build_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=blocks, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    staging = directory.with_name(directory.name + ".tmp")
    model.save_pretrained(staging, max_shard_size="200MB")
    tokenizer.save_pretrained(staging)
    staging.rename(directory)


def quantize_command(model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "quikft.cli", "quantize", "--model", str(model), *QUANTIZE, "--out", str(out),
            *extra]


def _env() -> dict:
    return child_env(REPO)


def run_quantize(model_id: str, root: Path) -> dict:
    hidden, intermediate, heads, blocks = MODELS[model_id]
    model = root / "models" / model_id
    build_model(model, hidden, intermediate, heads, blocks)
    out = root / "out" / model_id
    for leftover in (out, out.with_name(out.name + ".quantize-state")):  # a fresh run each time
        shutil.rmtree(leftover, ignore_errors=True)
    began = time.perf_counter()
    subprocess.run(quantize_command(model, out), env=_env(), check=True, stdout=subprocess.DEVNULL)
    report = json.loads((out / "quantize_report.json").read_text())
    return {"row": model_id, "hidden": hidden, "blocks": blocks,
            "weights_mb": sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20,
            "output_mb": report["output_bytes"] / 2**20, "peak_rss_mb": report["peak_rss_mb"],
            "s_per_block": report["seconds_per_block"], "state_mb_per_block": report["state_bytes_per_block"] / 2**20,
            "state_peak_mb": report["state_peak_bytes"] / 2**20, "wall_s": time.perf_counter() - began,
            "loading": report["loading"]}


def run_resume(root: Path) -> dict:
    """SIGKILL a 32-block quantize halfway, resume it, compare with the uninterrupted output."""
    from safetensors.torch import load_file

    model_id = "h1024-b32"
    model = root / "models" / model_id
    build_model(model, *MODELS[model_id])
    reference = root / "out" / model_id
    if not (reference / "quantize_report.json").exists():
        run_quantize(model_id, root)
    out = root / "out" / "resume"
    state = out.with_name(out.name + ".quantize-state")
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)
    process = subprocess.Popen(quantize_command(model, out), env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    half = MODELS[model_id][3] // 2
    while process.poll() is None:
        progress = state / "progress.json"
        if progress.exists() and json.loads(progress.read_text())["next_block"] >= half:
            time.sleep(2)  # into the next block: the kill lands mid-block
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.5)
    process.wait()
    killed_at = json.loads((state / "progress.json").read_text())["next_block"]
    complete_looking = (out / "config.json").exists()
    began = time.perf_counter()
    subprocess.run(quantize_command(model, out, "--resume"), env=_env(), check=True, stdout=subprocess.DEVNULL)
    resumed = time.perf_counter() - began

    def tensors(directory: Path) -> dict:
        found = {}
        for file in sorted(directory.glob("model-*.safetensors")):
            found.update(load_file(file))
        return found

    a, b = tensors(reference), tensors(out)
    identical = a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and bool((a[k] == b[k]).all()) for k in a)
    report = json.loads((out / "quantize_report.json").read_text())
    return {"row": "resume", "killed_after_blocks": killed_at, "complete_looking_after_kill": complete_looking,
            "resume_wall_s": resumed, "resumed_from_block": report["resumed_from_block"],
            "bit_identical": identical, "tensors": len(a), "peak_rss_mb": report["peak_rss_mb"]}


def table(rows: list[dict]) -> str:
    lines = ["| model | blocks | weights on disk (MiB) | packed output (MiB) | peak RSS (MiB) | s/block | "
             "state per block (MiB) | state peak (MiB) |", "|---|---|---|---|---|---|---|---|"]
    for row in (r for r in rows if r["row"] != "resume"):
        lines.append(f"| hidden {row['hidden']} | {row['blocks']} | {row['weights_mb']:.0f} | {row['output_mb']:.0f} | "
                     f"{row['peak_rss_mb']:.0f} | {row['s_per_block']:.1f} | {row['state_mb_per_block']:.1f} | "
                     f"{row['state_peak_mb']:.0f} |")
    by_id = {r["row"]: r for r in rows}
    if "h1024-b8" in by_id and "h1024-b32" in by_id:
        ratio = by_id["h1024-b32"]["peak_rss_mb"] / by_id["h1024-b8"]["peak_rss_mb"]
        lines.append(f"\n32-block / 8-block peak RSS: {ratio:.3f}x (target <= 1.25x)")
    if "resume" in by_id:
        r = by_id["resume"]
        lines.append(f"resume: SIGKILL after {r['killed_after_blocks']} committed blocks (complete-looking output "
                     f"left: {'yes' if r['complete_looking_after_kill'] else 'no'}), resumed from block "
                     f"{r['resumed_from_block']} in {r['resume_wall_s']:.0f}s; {r['tensors']} output tensors "
                     f"bit-identical to the uninterrupted run: {'yes' if r['bit_identical'] else 'NO'}")
    return "\n".join(lines)


def main() -> None:
    args = parser(__doc__.splitlines()[0], "runs/bench_scale/results.jsonl").parse_args()
    rows = load_results(args.results)
    root = Path(args.results).parent
    if not args.table_only:
        jobs = [(model_id, lambda m=model_id: run_quantize(m, root)) for model_id in MODELS]
        jobs.append(("resume", lambda: run_resume(root)))
        run_missing(jobs, rows, args.results, args.only, lambda row: f"peak RSS {row['peak_rss_mb']:.0f} MiB")
    print(table(rows))


if __name__ == "__main__":
    main()
