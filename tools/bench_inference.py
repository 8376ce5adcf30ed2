"""Benchmark inference of a quikft packed model against the FP32 and bf16 model it came from.

Rows (variants), each measured in its own fresh Python process so memory and warm caches of
one variant never leak into another:

- ``packed``: the packed checkpoint loaded with ``quikft.load`` (QuikLinear dequantizes on
  every forward);
- ``packed+cache``: the same with ``cache_dequantized`` on every QuikLinear (the dequantized
  weight is built at the first forward and kept, trading memory for speed);
- ``fp32`` / ``bf16``: the unquantized model (``quikft.models.load_model``, the embedded
  default model unless ``--model`` names another) in that dtype.

Columns: weights MiB (the safetensors files on disk; for bf16, which has no files of its
own, the bytes its weights would take saved in bf16), resident memory (RSS) in MiB above
the process's RSS just before loading, once imports and one-time set-up are paid (see
``warm_up``; about 5 MiB of constant overhead remain, one tokenizer included): after loading,
the peak during loading, and after the benchmark (adds activations, the KV cache and, for
``packed+cache``, the dequantized weights); prefill tokens/s (one forward over a
``--prompt-len`` prompt, median of ``--repeats`` after one warm-up); decode tokens/s
(greedy ``generate`` of ``--new-tokens`` tokens with the KV cache, timed from the first to
the last new token, so the prefill is excluded; median of ``--repeats`` after a short
warm-up). The prompt is random token ids (seed 0): speed does not depend on the text, and
``min_new_tokens`` keeps an early end-of-sequence token from shortening the decode. Run
from the repository root:

    QUIKFT_DATA=../shared/data python tools/bench_inference.py --packed DIR
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

VARIANTS = ("packed", "packed+cache", "fp32", "bf16")
RESULT_MARK = "BENCH_RESULT "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packed", required=True, help="packed checkpoint directory (quikft quantize output)")
    parser.add_argument("--model", default=None,
                        help="unquantized model for the fp32/bf16 rows (default: the embedded default model)")
    parser.add_argument("--prompt-len", type=int, default=512, help="prompt tokens for prefill and decode")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per decode run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--only", default=None, help="comma-separated subset of " + ", ".join(VARIANTS))
    parser.add_argument("--json", default=None, help="also write the raw results to this JSON file")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one variant
    args = parser.parse_args(argv)
    if args.prompt_len < 1 or args.new_tokens < 2 or args.repeats < 1:
        parser.error("--prompt-len and --repeats must be >= 1 and --new-tokens >= 2")
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
    """Current resident set size of this process, MiB."""
    return _status_mib("VmRSS")


def reset_peak_rss() -> None:
    """Restart the peak-RSS counter at the current RSS, so the peak covers loading only.

    Writing 5 to clear_refs does that (Linux >= 4.0); where it is refused the peak is the
    process's lifetime one, which the warm-up could only make larger.
    """
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mib() -> float:
    """Peak resident set size since :func:`reset_peak_rss` (or process start), MiB."""
    return _status_mib("VmHWM")


def load_variant(variant: str, args: argparse.Namespace) -> tuple[Any, float]:
    """(model, weights MiB) for one variant."""
    import torch

    import quikft
    from quikft.checkpoint import weight_files
    from quikft.models import load_model, load_tokenizer, resolve_model
    from quikft.nn import QuikLinear

    if variant.startswith("packed"):
        model = quikft.load(args.packed)
        load_tokenizer(args.packed)  # load_model loads one for the fp rows too: same RSS footing
        for module in model.modules():
            if isinstance(module, QuikLinear):
                module.cache_dequantized = variant == "packed+cache"
        return model, sum(f.stat().st_size for f in weight_files(args.packed)) / 2**20
    dtype = torch.float32 if variant == "fp32" else torch.bfloat16
    model, _ = load_model(args.model, dtype=dtype)
    files = sorted(Path(resolve_model(args.model)).glob("*.safetensors"))
    if variant == "fp32" and files:
        return model, sum(f.stat().st_size for f in files) / 2**20
    return model, state_dict_mib(model)  # no files in this dtype (or a hub id): what they would take


def state_dict_mib(model: Any) -> float:
    """Bytes the model's tensors would take on disk (shared storages, e.g. tied weights, once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}
    return sum(storages.values()) / 2**20


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


def warm_up(args: argparse.Namespace) -> None:
    """Pay the one-time costs of loading before the baseline RSS, so the deltas measure the model.

    Python modules (the model class, transformers' quantizer registry that ``from_pretrained``
    pulls in, the tokenizer stack, generation) take tens of MiB on first import, and the first
    model build and the first GEMM several more (lazy registries, BLAS and OpenMP set-up): more
    than a small model's weights. A skeleton on the meta device and one tiny GEMM pay them.
    """
    import safetensors.torch  # noqa: F401
    import torch
    import transformers.generation  # noqa: F401
    import transformers.quantizers.auto  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    import quikft.checkpoint  # noqa: F401
    from quikft.models import resolve_model

    path = args.packed if args.worker.startswith("packed") else resolve_model(args.model)
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a plain skeleton, as quikft.load builds it
    with torch.device("meta"):
        AutoModelForCausalLM.from_config(config)
    torch.nn.functional.linear(torch.ones(4, 8), torch.ones(8, 8))


def run_worker(args: argparse.Namespace) -> dict:
    """Load one variant and measure it; everything imported first so RSS deltas are the model's."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    warm_up(args)
    gc.collect()
    reset_peak_rss()
    base = rss_mib()
    model, weights_mib = load_variant(args.worker, args)
    gc.collect()
    loaded, load_peak = rss_mib() - base, peak_rss_mib() - base
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    prefill_s = time_prefill(model, ids, args.repeats)
    decode_s = time_decode(model, ids, args.new_tokens, args.repeats)
    return {"variant": args.worker, "weights_mib": weights_mib, "rss_loaded_mib": loaded,
            "rss_load_peak_mib": load_peak, "rss_after_mib": rss_mib() - base,
            "prefill_tok_s": args.prompt_len / prefill_s, "decode_tok_s": 1 / decode_s,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


# --------------------------------------------------------------------------------------------
# driver


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    """Run one variant in a fresh interpreter and parse its result line."""
    cmd = [sys.executable, __file__, "--worker", variant, "--packed", args.packed,
           "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
           "--repeats", str(args.repeats)]
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"variant {variant} failed (exit {done.returncode}): {tail}")
    return json.loads(lines[-1].removeprefix(RESULT_MARK))


def markdown(results: list[dict], args: argparse.Namespace) -> str:
    first = results[0]
    lines = [f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, median of {args.repeats}; "
             f"CPU, {first['threads']} threads, torch {first['torch']}",
             "",
             "| variant | weights MiB | RSS after load MiB | RSS peak while loading MiB | RSS after run MiB "
             "| prefill tok/s | decode tok/s |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['variant']} | {r['weights_mib']:.1f} | {r['rss_loaded_mib']:.0f} "
                     f"| {r['rss_load_peak_mib']:.0f} | {r['rss_after_mib']:.0f} | {r['prefill_tok_s']:.1f} "
                     f"| {r['decode_tok_s']:.2f} |")
    return "\n".join(lines)


def selected_variants(only: str | None) -> list[str]:
    if not only:
        return list(VARIANTS)
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
    results = []
    for variant in selected_variants(args.only):
        results.append(run_variant(variant, args))
        r = results[-1]
        print(f"{variant}: prefill {r['prefill_tok_s']:.1f} tok/s, decode {r['decode_tok_s']:.2f} tok/s",
              file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(markdown(results, args))


if __name__ == "__main__":
    main()
