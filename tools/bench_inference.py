"""Benchmark inference of a quikft packed model against the FP32 and bf16 model it came from.

Rows (variants), each measured in its own fresh Python process so memory and warm caches of
one variant never leak into another; ``--rounds N`` runs the whole list N times in turn and
reports each variant's median, so drifting machine load touches every row alike:

- ``fp32`` / ``bf16``: the unquantized model (``--model``, the embedded default model unless
  given) loaded with ``AutoModelForCausalLM.from_pretrained(dir, dtype=...)``;
- ``packed``: the packed checkpoint loaded with ``import quikft;
  AutoModelForCausalLM.from_pretrained(DIR)`` and no other argument: every layer takes the kernels
  measured fastest on this machine for decode and for prefill (``quikft.nn.autotune``);
- ``packed:KERNEL`` (``--kernels``): the same load with ``QUIKFT_KERNEL=KERNEL`` (every layer forced);
- ``packed-ref``: ``quikft.load(DIR, dtype=torch.float32)``, the plain-PyTorch reference path
  that dequantizes on every call (what every kernel is tested against);
- ``packed+cache`` (only with ``--only``): the reference path with the dequantized weights
  cached (``quikft.nn.set_dequantized_cache``).

Columns: MiB of the loaded model's parameters and buffers (shared storages, e.g. tied weights,
once; kernel buffers included), MiB the kernels hold outside torch (ONNX Runtime's prepacked
weights, ``QuikLinear.hidden_bytes``), both against the fp32 model, the weights files on disk, resident memory (RSS) in MiB above
the process's RSS just before loading (imports and one-time set-up paid first, see
``warm_up``) after loading and after the run (adds activations and the KV cache), prefill
tokens/s (one forward over ``--prompt-len`` random tokens, median of ``--repeats`` after a
warm-up), decode tokens/s (greedy ``generate`` of ``--new-tokens`` tokens with the KV cache,
timed from the first to the last new token, median of ``--repeats``), and WikiText-2 test
perplexity: the first 4 windows of 2048 tokens of the stride-8 subset, and the 1024-token
prefix of the test split. The kernels column gives, per layer kind, the decode kernel and (after
a slash) the prefill kernel where they differ. Every row records the CPU capability string.

``--shape llama-1b`` measures a model of the size CPU users run instead: random weights with
Llama-3.2-1B's shapes (hidden 2048, intermediate 8192, 16 blocks, 32/8 heads, vocab 128256, tied
head) written once under ``--workdir`` in bf16, packed with RTN at 4 and 3 bits and 64 salient
columns (the paper's 128 of 4096 inputs, scaled to 2048), calibrated on 8 windows of 256 tokens
(RTN needs the activations only for the salient choice; no clipping search); fp32, bf16 (only where native) and each
packed model per kernel. Perplexity means nothing for random weights and is skipped there. Rows
are appended to ``--results`` (JSONL) as they finish, so an interrupted run resumes. Run from the
repository root:

    QUIKFT_DATA=../shared/data python tools/bench_inference.py --packed DIR [--rounds 3] [--kernels cpu-int4,cpu-ort-int8]
    QUIKFT_DATA=../shared/data nohup python tools/bench_inference.py --shape llama-1b --prompt-len 128 > runs/bench-1b.log &
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import append_result, load_results  # noqa: E402

VARIANTS = ("fp32", "bf16", "packed", "packed-ref", "packed+cache")
DEFAULT_VARIANTS = ("fp32", "bf16", "packed", "packed-ref")
FORCED = "packed:"  # packed:KERNEL, a packed row with one kernel forced on every layer
RESULT_MARK = "BENCH_RESULT "
LLAMA_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True,
            "max_position_embeddings": 4096, "rope_theta": 500000.0, "rms_norm_eps": 1e-5}
LLAMA_1B_SALIENT = 64  # 128 salient columns of 4096 inputs in the paper, scaled to 2048
LLAMA_1B_BITS = (4, 3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packed", default=None, help="packed checkpoint directory (quikft quantize output)")
    parser.add_argument("--shape", choices=("checkpoint", "llama-1b"), default="checkpoint",
                        help="llama-1b: build and pack a random model with Llama-3.2-1B's shapes instead")
    parser.add_argument("--workdir", default="runs/bench-llama-1b", help="where --shape llama-1b keeps its models")
    parser.add_argument("--results", default=None, help="JSONL file finished rows are appended to (resumable)")
    parser.add_argument("--kernels", default=None,
                        help="comma-separated kernels to add as packed:KERNEL rows (default with --shape "
                             "llama-1b: every CPU kernel but the reference)")
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
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one variant
    args = parser.parse_args(argv)
    if args.prompt_len < 1 or args.new_tokens < 2 or args.repeats < 1 or args.rounds < 1:
        parser.error("--prompt-len, --repeats and --rounds must be >= 1 and --new-tokens >= 2")
    if args.shape == "checkpoint" and not args.packed and not args.worker:
        parser.error("--packed DIR is required (or --shape llama-1b)")
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


def hidden_mib(model: Any) -> float:
    """MiB the packed layers' kernels hold outside torch tensors (ONNX Runtime's weights)."""
    from quikft.nn import quik_layers

    return sum(layer.hidden_bytes() for layer in quik_layers(model).values()) / 2**20


def load_variant(variant: str, args: argparse.Namespace) -> tuple[Any, float, dict]:
    """(model, weights MiB on disk, kernel counts) for one variant."""
    import torch
    from transformers import AutoModelForCausalLM

    import quikft
    from quikft.checkpoint import weight_files
    from quikft.models import load_tokenizer, resolve_model
    from quikft.nn import quik_layers, set_dequantized_cache

    if variant.startswith("packed"):
        if variant == "packed" or variant.startswith(FORCED):
            # QUIKFT_KERNEL is set by the driver for packed:KERNEL rows: the same from_pretrained call.
            model = AutoModelForCausalLM.from_pretrained(args.packed)
        else:
            model = quikft.load(args.packed, dtype=torch.float32, kernel="torch")
            if variant == "packed+cache":
                set_dequantized_cache(model)
        load_tokenizer(args.packed)  # the fp rows load one too: same RSS footing
        kernels: dict[str, str] = {}
        for name, layer in quik_layers(model).items():
            decode = layer.kernel_name or "unprepared"
            prefill = layer.prefill_kernel_name or decode
            kind = name.rpartition(".")[2]
            kernels.setdefault(kind, decode if prefill == decode else f"{decode}/{prefill}")
        return model, sum(f.stat().st_size for f in weight_files(args.packed)) / 2**20, kernels
    path = resolve_model(args.model)
    dtype = torch.float32 if variant == "fp32" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    load_tokenizer(path)
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
    from quikft.eval.ppl import PplTask, task_ppl
    from quikft.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(args.packed if args.worker.startswith("packed") else resolve_model(args.model))
    subset = task_ppl(model, tokenizer, PplTask("wikitext2", 2048, 4, 8), progress=False)
    prefix = task_ppl(model, tokenizer, PplTask("wikitext2", 1024, 1, 1), progress=False)
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
    result = {"variant": args.worker, "model_mib": model_mib(model), "hidden_mib": hidden_mib(model),
              "disk_mib": disk_mib,
              "rss_loaded_mib": loaded, "rss_after_mib": rss_mib() - base,
              "prefill_tok_s": args.prompt_len / prefill_s, "decode_tok_s": 1 / decode_s,
              "dtype": str(model.dtype).removeprefix("torch."), "kernels": kernels,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "packed": args.packed}
    if not args.no_ppl:
        result.update(perplexities(model, args))
    return result


# --------------------------------------------------------------------------------------------
# one row, and the table


def run_variant(variant: str, args: argparse.Namespace, packed: str | None) -> dict:
    """Run one variant in a fresh interpreter and parse its result line."""
    cmd = [sys.executable, __file__, "--worker", variant, "--prompt-len", str(args.prompt_len),
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    cmd += ["--packed", packed] if packed else []
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    cmd += ["--no-ppl"] if args.no_ppl else []
    env = dict(os.environ)
    env.pop("QUIKFT_KERNEL", None)
    if variant.startswith(FORCED):
        env["QUIKFT_KERNEL"] = variant.removeprefix(FORCED)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
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
    fp32 = next((r for r in rows if r["variant"] == "fp32"), None)
    lines = [f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, median of {args.repeats} runs "
             f"x {args.rounds} round(s); CPU capability {first['cpu_capability']}, {first['threads']} threads, "
             f"torch {first['torch']}",
             "",
             "| model | variant | dtype | kernels (decode/prefill) | model MiB | + outside torch | vs fp32 "
             "| disk MiB | RSS loaded | RSS after run | prefill tok/s | decode tok/s | decode vs fp32 "
             "| ppl 4x2048 | ppl 1024-prefix |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kernels = _kernel_cell(r["kernels"])
        held = r["model_mib"] + r.get("hidden_mib", 0)
        size = f"{held / fp32['model_mib']:.1%}" if fp32 else "-"
        speed = f"{r['decode_tok_s'] / fp32['decode_tok_s']:.2f}x" if fp32 else "-"
        ppl = (f"{r['ppl_4x2048']:.3f} | {r['ppl_prefix_1024']:.3f}" if "ppl_4x2048" in r else "- | -")
        lines.append(f"| {r.get('label', '-')} | {r['variant']} | {r['dtype']} | {kernels} | {r['model_mib']:.1f} "
                     f"| {r.get('hidden_mib', 0):.1f} | {size} | {r['disk_mib']:.1f} | {r['rss_loaded_mib']:.0f} "
                     f"| {r['rss_after_mib']:.0f} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.2f} | {speed} "
                     f"| {ppl} |")
    return "\n".join(lines)


def _kernel_cell(kernels: dict[str, str]) -> str:
    """Per layer kind the decode[/prefill] kernel; one name when every kind has the same."""
    if not kernels:
        return "-"
    if len(set(kernels.values())) == 1:
        return f"{next(iter(kernels.values()))} (all)"
    return ", ".join(f"{kind}: {name}" for kind, name in kernels.items())


def selected_variants(only: str | None, kernels: str | None) -> list[str]:
    chosen = [name.strip() for name in only.split(",") if name.strip()] if only else list(DEFAULT_VARIANTS)
    unknown = sorted(name for name in chosen if name not in VARIANTS and not name.startswith(FORCED))
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)} "
                         f"or {FORCED}KERNEL")
    forced = [FORCED + name.strip() for name in (kernels or "").split(",") if name.strip()]
    return [name for name in VARIANTS if name in chosen] + [n for n in chosen if n.startswith(FORCED)] + forced


def native_bf16() -> bool:
    from quikft.hardware import native_bf16 as native

    return native("cpu")[0]


# --------------------------------------------------------------------------------------------
# the Llama-3.2-1B-shaped model


def build_llama_1b(workdir: Path) -> Path:
    """A random-weight model with Llama-3.2-1B's shapes (bf16 on disk) and the default tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from quikft.models import load_tokenizer

    fp_dir = workdir / "fp"
    if (fp_dir / "config.json").exists():
        return fp_dir
    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA_1B, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    partial = workdir / "fp.partial"
    model.save_pretrained(partial)
    load_tokenizer(None).save_pretrained(partial)  # ids < 49152 are valid in a 128256 vocabulary
    partial.rename(fp_dir)
    return fp_dir


def pack_llama_1b(fp_dir: Path, bits: int) -> Path:
    """The random model packed with RTN at ``bits`` and 64 salient columns (built once)."""
    from quikft.config import QuantConfig, QuantizeJob
    from quikft.jobs.quantize import quantize

    out = fp_dir.parent / f"w{bits}-k{LLAMA_1B_SALIENT}-rtn"
    if not (out / "config.json").exists():
        # No clipping search: it only changes the rounding, and dominated the time (~100 s per block).
        job = QuantizeJob(quant=QuantConfig(bits=bits, salient=LLAMA_1B_SALIENT, method="rtn", nsamples=8,
                                            seqlen=256, clip_search=False), model=str(fp_dir), out=str(out),
                          eval_windows=0)
        quantize(job)
    return out


def every_cpu_kernel() -> str:
    """Every registered kernel but the reference that takes a llama-1b layer on this CPU in fp32."""
    import torch

    from quikft.nn import LayerLayout, available_kernels, get_kernel

    probe = LayerLayout(2048, 2048, 4, LLAMA_1B_SALIENT, (128,) * 15 + (64,), True)
    return ",".join(name for name in available_kernels()
                    if name != "torch" and get_kernel(name).check(probe, torch.device("cpu"), torch.float32) is None)


# --------------------------------------------------------------------------------------------
# driver


def planned_rows(args: argparse.Namespace) -> list[tuple[str, str, str | None]]:
    """(label, variant, packed dir) for every row to run."""
    if args.shape == "checkpoint":
        return [(Path(args.packed).name, v, args.packed) for v in selected_variants(args.only, args.kernels)]
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    fp_dir = build_llama_1b(workdir)
    args.model, args.no_ppl = str(fp_dir), True
    kernels = args.kernels if args.kernels is not None else every_cpu_kernel()
    rows = [("llama-1b fp", "fp32", None)] + ([("llama-1b fp", "bf16", None)] if native_bf16() else [])
    for bits in LLAMA_1B_BITS:
        packed = pack_llama_1b(fp_dir, bits)
        label = f"llama-1b w{bits} k{LLAMA_1B_SALIENT}"
        rows += [(label, v, str(packed)) for v in selected_variants("packed", kernels)]
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_MARK + json.dumps(run_worker(args)), flush=True)
        return
    from quikft.checkpoint import is_packed_checkpoint

    if args.packed and not is_packed_checkpoint(args.packed):
        raise SystemExit(f"{args.packed} is not a quikft packed checkpoint directory (run `quikft quantize`)")
    rows = planned_rows(args)
    if args.shape == "checkpoint" and not native_bf16():
        rows = [row for row in rows if row[1] != "bf16"]  # bf16 is a scalar loop here: not a real option
    done = load_results(args.results) if args.results else []
    measure_ppl = not args.no_ppl
    runs: dict[tuple[str, str], list[dict]] = {(label, variant): [] for label, variant, _ in rows}
    for result in done:
        key = (result.get("label"), result["variant"])
        if key in runs:
            runs[key].append(result)
    for round_index in range(args.rounds):
        args.no_ppl = not (measure_ppl and round_index == 0)  # ppl does not depend on load: once
        for label, variant, packed in rows:
            if len(runs[(label, variant)]) > round_index:
                continue  # finished in an earlier, interrupted run
            result = {**run_variant(variant, args, packed), "label": label, "round": round_index}
            runs[(label, variant)].append(result)
            if args.results:
                append_result(args.results, result)
            print(f"round {round_index + 1} {label} {variant}: prefill {result['prefill_tok_s']:.0f} tok/s, "
                  f"decode {result['decode_tok_s']:.2f} tok/s", file=sys.stderr, flush=True)
    table = [median_row(runs[(label, variant)]) for label, variant, _ in rows]
    for row in table:  # the first round measured ppl
        row.update({k: v for k, v in runs[(row["label"], row["variant"])][0].items() if k.startswith("ppl")})
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": table, "runs": [r for v in runs.values() for r in v]},
                                              indent=2) + "\n")
    print(markdown(table, args))


if __name__ == "__main__":
    main()
