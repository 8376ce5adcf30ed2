"""Benchmark inference of a quikft packed model against the FP32 and bf16 model it came from.

Rows (variants), each measured in its own fresh Python process so memory and warm caches of
one variant never leak into another; ``--rounds N`` runs the whole list N times in turn and
reports each variant's median, so drifting machine load touches every row alike:

- ``fp32`` / ``bf16``: the unquantized model (``--model``, the embedded default model unless
  given) loaded with ``AutoModelForCausalLM.from_pretrained(dir, dtype=...)``;
- ``packed``: the packed checkpoint loaded with ``import quikft;
  AutoModelForCausalLM.from_pretrained(DIR)`` and no other argument: the automatic kernel for
  this machine (on a CPU with native bf16: bf16 activations and the int4 operator);
- ``packed-ref``: ``quikft.load(DIR, dtype=torch.float32)``, the plain-PyTorch reference path
  that dequantizes on every call (what every kernel is tested against);
- ``packed+cache`` (only with ``--only``): the reference path with the dequantized weights
  cached (``quikft.nn.set_dequantized_cache``).

Columns: MiB of the loaded model's parameters and buffers (shared storages, e.g. tied weights,
once; kernel buffers included), the weights files on disk, resident memory (RSS) in MiB above
the process's RSS just before loading (imports and one-time set-up paid first, see
``warm_up``) after loading and after the run (adds activations and the KV cache), prefill
tokens/s (one forward over ``--prompt-len`` random tokens, median of ``--repeats`` after a
warm-up), decode tokens/s (greedy ``generate`` of ``--new-tokens`` tokens with the KV cache,
timed from the first to the last new token, median of ``--repeats``), and WikiText-2 test
perplexity: the first 4 windows of 2048 tokens of the stride-8 subset, and the 1024-token
prefix of the test split. Run from the repository root:

    QUIKFT_DATA=../shared/data python tools/bench_inference.py --packed DIR [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

VARIANTS = ("fp32", "bf16", "packed", "packed-ref", "packed+cache")
DEFAULT_VARIANTS = ("fp32", "bf16", "packed", "packed-ref")
RESULT_MARK = "BENCH_RESULT "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packed", required=True, help="packed checkpoint directory (quikft quantize output)")
    parser.add_argument("--model", default=None,
                        help="unquantized model for the fp32/bf16 rows (default: the embedded default model)")
    parser.add_argument("--prompt-len", type=int, default=512, help="prompt tokens for prefill and decode")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per decode run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--rounds", type=int, default=1, help="times the variant list is run in turn")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--only", default=None, help="comma-separated subset of " + ", ".join(VARIANTS))
    parser.add_argument("--no-ppl", action="store_true", help="skip the perplexity columns")
    parser.add_argument("--json", default=None, help="also write the raw results to this JSON file")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one variant
    args = parser.parse_args(argv)
    if args.prompt_len < 1 or args.new_tokens < 2 or args.repeats < 1 or args.rounds < 1:
        parser.error("--prompt-len, --repeats and --rounds must be >= 1 and --new-tokens >= 2")
    return args


# --------------------------------------------------------------------------------------------
# worker: one variant, in a fresh process


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (Linux), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def rss_mib() -> float:
    return _status_mib("VmRSS")


def reset_peak_rss() -> None:
    """Restart the peak-RSS counter at the current RSS (Linux >= 4.0), so the peak covers loading only."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def model_mib(model: Any) -> float:
    """MiB of the model's parameters and buffers in memory (shared storages once)."""
    tensors = [*model.parameters(), *model.buffers()]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values()) / 2**20


def load_variant(variant: str, args: argparse.Namespace) -> tuple[Any, float, dict]:
    """(model, weights MiB on disk, kernel counts) for one variant."""
    import torch
    from transformers import AutoModelForCausalLM

    import quikft
    from quikft.checkpoint import weight_files
    from quikft.models import load_tokenizer, resolve_model
    from quikft.nn import quik_layers, set_dequantized_cache

    if variant.startswith("packed"):
        if variant == "packed":
            model = AutoModelForCausalLM.from_pretrained(args.packed)
        else:
            model = quikft.load(args.packed, dtype=torch.float32)
            if variant == "packed+cache":
                set_dequantized_cache(model)
        load_tokenizer(args.packed)  # the fp rows load one too: same RSS footing
        kernels: dict[str, int] = {}
        for layer in quik_layers(model).values():
            name = layer.kernel_name or ("torch" if variant != "packed" else "unprepared")
            kernels[name] = kernels.get(name, 0) + 1
        return model, sum(f.stat().st_size for f in weight_files(args.packed)) / 2**20, kernels
    path = resolve_model(args.model)
    dtype = torch.float32 if variant == "fp32" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    load_tokenizer(args.model)
    files = sorted(Path(path).glob("*.safetensors"))
    disk = sum(f.stat().st_size for f in files) / 2**20 if files else float("nan")
    return model, disk, {}


def time_prefill(model: Any, ids: Any, repeats: int) -> float:
    """Median seconds of one forward over ``ids`` (after one warm-up)."""
    import torch

    def once() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=ids, use_cache=True)
        return time.perf_counter() - start

    once()
    return statistics.median(once() for _ in range(repeats))


class StepClock:
    """A generate() streamer that timestamps every new token (its first call is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._seen_prompt = False

    def put(self, value: Any) -> None:
        if self._seen_prompt:
            self.times.append(time.perf_counter())
        self._seen_prompt = True

    def end(self) -> None:
        pass


def time_decode(model: Any, ids: Any, new_tokens: int, repeats: int) -> float:
    """Median seconds per decoded token (first to last new token, prefill excluded)."""
    import torch

    eos = model.config.eos_token_id
    pad_id = eos[0] if isinstance(eos, list) else eos  # silences generate's "no pad token" notice

    def once(n: int) -> float:
        clock = StepClock()
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, use_cache=True, streamer=clock,
                           pad_token_id=pad_id)
        if len(clock.times) != n:
            raise RuntimeError(f"generate produced {len(clock.times)} tokens, expected {n}")
        return (clock.times[-1] - clock.times[0]) / (n - 1)

    once(min(new_tokens, 4))
    return statistics.median(once(new_tokens) for _ in range(repeats))


def perplexities(model: Any, args: argparse.Namespace) -> dict:
    """WikiText-2 test ppl: 4 windows of the stride-8 subset, and the 1024-token prefix."""
    from quikft.eval.ppl import evaluate_ppl
    from quikft.models import load_tokenizer

    tokenizer = load_tokenizer(args.packed if args.worker.startswith("packed") else args.model)
    subset = evaluate_ppl(model, tokenizer, "wikitext2", 2048, 4, 8, progress=False)
    prefix = evaluate_ppl(model, tokenizer, "wikitext2", 1024, 1, 1, progress=False)
    return {"ppl_4x2048": subset.ppl, "ppl_prefix_1024": prefix.ppl}


def warm_up(args: argparse.Namespace) -> None:
    """Pay the one-time costs of loading before the baseline RSS, so the deltas measure the model.

    Python modules (the model class, transformers' quantizer registry that ``from_pretrained``
    pulls in, the tokenizer stack, generation) take tens of MiB on first import, and the first
    model build and the first GEMM several more: more than a small model's weights. A skeleton on
    the meta device and one tiny GEMM of each dtype pay them.
    """
    import safetensors.torch  # noqa: F401
    import torch
    import transformers.generation  # noqa: F401
    import transformers.quantizers.auto  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import quikft.checkpoint  # noqa: F401
    import quikft.nn  # noqa: F401
    from quikft.models import resolve_model

    path = args.packed if args.worker.startswith("packed") else resolve_model(args.model)
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a plain skeleton
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(config)
    for dtype in (torch.float32, torch.bfloat16):
        torch.nn.functional.linear(torch.ones(4, 8, dtype=dtype), torch.ones(8, 8, dtype=dtype))


def run_worker(args: argparse.Namespace) -> dict:
    """Load one variant and measure it; everything imported first so RSS deltas are the model's."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    warm_up(args)
    gc.collect()
    reset_peak_rss()
    base = rss_mib()
    model, disk_mib, kernels = load_variant(args.worker, args)
    gc.collect()
    loaded = rss_mib() - base
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    prefill_s = time_prefill(model, ids, args.repeats)
    decode_s = time_decode(model, ids, args.new_tokens, args.repeats)
    result = {"variant": args.worker, "model_mib": model_mib(model), "disk_mib": disk_mib,
              "rss_loaded_mib": loaded, "rss_after_mib": rss_mib() - base,
              "prefill_tok_s": args.prompt_len / prefill_s, "decode_tok_s": 1 / decode_s,
              "dtype": str(model.dtype).removeprefix("torch."), "kernels": kernels,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if not args.no_ppl:
        result.update(perplexities(model, args))
    return result


# --------------------------------------------------------------------------------------------
# driver


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    """Run one variant in a fresh interpreter and parse its result line."""
    cmd = [sys.executable, __file__, "--worker", variant, "--packed", args.packed,
           "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
           "--repeats", str(args.repeats)]
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--no-ppl"] if args.no_ppl else []
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"variant {variant} failed (exit {done.returncode}): {tail}")
    return json.loads(lines[-1].removeprefix(RESULT_MARK))


def median_row(runs: list[dict]) -> dict:
    """One row per variant: the median of every timing and memory column over its rounds."""
    row = dict(runs[-1])
    for key in ("prefill_tok_s", "decode_tok_s", "rss_loaded_mib", "rss_after_mib"):
        row[key] = statistics.median(run[key] for run in runs)
    row["rounds"] = len(runs)
    row["decode_runs"] = [round(run["decode_tok_s"], 2) for run in runs]
    return row


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    first = rows[0]
    bf16 = next((r for r in rows if r["variant"] == "bf16"), None)
    lines = [f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, median of {args.repeats} runs "
             f"x {args.rounds} round(s); CPU {first['cpu_capability']}, {first['threads']} threads, "
             f"torch {first['torch']}",
             "",
             "| variant | dtype | kernels | model MiB | vs bf16 | disk MiB | RSS loaded | RSS after run "
             "| prefill tok/s | decode tok/s | decode vs bf16 | ppl 4x2048 | ppl 1024-prefix |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kernels = ", ".join(f"{k} x{v}" for k, v in r["kernels"].items()) or "-"
        size = f"{r['model_mib'] / bf16['model_mib']:.1%}" if bf16 else "-"
        speed = f"{r['decode_tok_s'] / bf16['decode_tok_s']:.2f}x" if bf16 else "-"
        ppl = (f"{r['ppl_4x2048']:.3f} | {r['ppl_prefix_1024']:.3f}" if "ppl_4x2048" in r else "- | -")
        lines.append(f"| {r['variant']} | {r['dtype']} | {kernels} | {r['model_mib']:.1f} | {size} "
                     f"| {r['disk_mib']:.1f} | {r['rss_loaded_mib']:.0f} | {r['rss_after_mib']:.0f} "
                     f"| {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.2f} | {speed} | {ppl} |")
    return "\n".join(lines)


def selected_variants(only: str | None) -> list[str]:
    if not only:
        return list(DEFAULT_VARIANTS)
    chosen = [name.strip() for name in only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return [name for name in VARIANTS if name in chosen]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_MARK + json.dumps(run_worker(args)), flush=True)
        return
    from quikft.checkpoint import is_packed_checkpoint

    if not is_packed_checkpoint(args.packed):
        raise SystemExit(f"{args.packed} is not a quikft packed checkpoint directory (run `quikft quantize`)")
    variants = selected_variants(args.only)
    runs: dict[str, list[dict]] = {variant: [] for variant in variants}
    measure_ppl = not args.no_ppl
    for round_index in range(args.rounds):
        args.no_ppl = not (measure_ppl and round_index == 0)  # ppl does not depend on load: once
        for variant in variants:
            result = run_variant(variant, args)
            runs[variant].append(result)
            print(f"round {round_index + 1} {variant}: prefill {result['prefill_tok_s']:.0f} tok/s, "
                  f"decode {result['decode_tok_s']:.2f} tok/s", file=sys.stderr, flush=True)
    rows = [median_row(runs[variant]) for variant in variants]
    for row in rows:  # the first round measured ppl
        row.update({k: v for k, v in runs[row["variant"]][0].items() if k.startswith("ppl")})
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "runs": runs}, indent=2) + "\n")
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
