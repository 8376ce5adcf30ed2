"""The quantize job's quick evaluation (WikiText-2 windows, the cached full-precision reference) and its report."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from quikft.atomic import write_json
from quikft.bits import layer_bits
from quikft.config import QuantizeJob
from quikft.data import eval_text, tokenize_stream
from quikft.eval.ppl import PplResult, max_context, quick_ppl, window_starts
from quikft.format.inspect import stored_bits
from quikft.hardware import DtypeChoice, native_bf16, resolve_device
from quikft.models import cache_root, model_label, model_reference, resolve_model
from quikft.quant.steps import QuantizedLayers
from quikft.runinfo import library_versions, peak_rss_mb

REPORT_NAME = "quantize_report.json"
EVAL_DATASET = "wikitext2"


def quantize_dtype(job: QuantizeJob) -> DtypeChoice:
    """Quantization computes in float32 (GPTQ's Hessian inverse needs it; blocks run in the checkpoint's
    dtype); the capability is recorded so reports of every job say what the machine could run fast."""
    return DtypeChoice(torch.float32, f"quantize computes in float32; {native_bf16(resolve_device(job.device))[1]}")


def reference_cache(job: QuantizeJob) -> Path:
    """Where the full-precision model's quick ppl is cached (per model and eval setting)."""
    path = resolve_model(job.model)
    config_file = Path(path) / "config.json"
    stamp = config_file.stat().st_mtime_ns if config_file.exists() else 0
    key = json.dumps([path, stamp, job.eval_seqlen, job.eval_windows, job.eval_stride])
    return cache_root() / "ppl" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def reference_ppl(model, tokenizer, job: QuantizeJob) -> dict | None:
    """The full-precision model's quick ppl, cached per model and eval setting (it never changes)."""
    if job.eval_windows == 0:
        return None
    cache = reference_cache(job)
    if cache.exists():
        return json.loads(cache.read_text())
    result = quick_ppl(model, tokenizer, job, model_label(job.model))
    write_json(cache, result)
    return result


@dataclass
class EvalWindows:
    """The quick evaluation's ``(1, seqlen)`` windows, their length and the number of full windows in the split."""

    windows: list[torch.Tensor]
    seqlen: int = 0
    total: int = 0


def eval_windows(model, tokenizer, job: QuantizeJob) -> EvalWindows:
    """The quick evaluation's windows as :func:`quikft.eval.ppl.evaluate_ppl` picks them."""
    if job.eval_windows == 0:
        return EvalWindows([])
    seqlen = max_context(model, job.eval_seqlen)
    ids = tokenize_stream(tokenizer, eval_text(EVAL_DATASET, "test"), add_special_tokens=True)
    starts = window_starts(ids.numel(), seqlen, job.eval_windows, job.eval_stride)
    if not starts:
        raise ValueError(f"{EVAL_DATASET}: {ids.numel()} tokens give no window of {seqlen}; use a smaller "
                         f"--eval-seqlen")
    return EvalWindows([ids[s:s + seqlen].unsqueeze(0) for s in starts], seqlen, ids.numel() // seqlen)


def ppl_record(job: QuantizeJob, windows: EvalWindows, model_name: str, measured: tuple[float, int, float]) -> dict:
    """A stream's ppl as :func:`quikft.eval.ppl.evaluate_ppl` records it, from ``measured``: its summed
    NLL, the predictions and the seconds it took."""
    nll, tokens, seconds = measured
    return PplResult(model=model_name, dataset=EVAL_DATASET, seqlen=windows.seqlen, windows=len(windows.windows),
                     total_windows=windows.total, window_stride=job.eval_stride, tokens=tokens,
                     ppl=math.exp(nll / tokens), nll=nll / tokens, seconds=seconds,
                     tokens_per_s=len(windows.windows) * windows.seqlen / seconds if seconds else 0.0).to_dict()


def bits_per_weight(job: QuantizeJob, quantized: QuantizedLayers, directory: Path) -> dict:
    """The report's ``{"linear", "model"}`` bits per weight, counted from the written checkpoint. A
    fake-quant output stores float weights: it gets the linear figure its packed checkpoint would
    have (predicted from the layers' shapes and k) and no model figure."""
    if not job.fake_quant:
        return stored_bits(directory).to_dict()
    scheme = job.quant
    linear = sum(layer_bits(layer.in_features, layer.out_features, layer.bits or scheme.bits, layer.salient,
                            scheme.group_size) for layer in quantized.layers)
    weights = sum(layer.in_features * layer.out_features for layer in quantized.layers)
    return {"linear": linear / weights if weights else None, "model": None}


def build_report(job: QuantizeJob, quantized: QuantizedLayers, wall_seconds: float, ppl: dict,
                 bits: dict | None = None) -> dict:
    """The report of a quantize run (``ppl``: ``fp_ppl``, ``ppl`` and ``eval_seconds`` of the quick evaluation)."""
    layers = [asdict(layer) for layer in quantized.layers]
    total_in = sum(layer["in_features"] for layer in layers) or 1
    blocks = len(quantized.input_groups) or 1
    return {
        "job": "quantize",
        "config": job.to_dict(),
        "source_model": model_reference(job.model),
        "compute_dtype": quantize_dtype(job).to_dict(),
        "format": "fake-quant" if job.fake_quant else "packed",
        "quantize_seconds": quantized.seconds,  # the block-by-block loop alone
        "seconds_per_block": quantized.seconds / blocks,
        "wall_seconds": wall_seconds,  # the whole job, including loading, evaluation and saving
        "eval_seconds": ppl["eval_seconds"],
        "peak_rss_mb": peak_rss_mb(),
        "salient_fraction": sum(layer["salient"] for layer in layers) / total_in,
        "bits_per_weight": bits,  # {"linear": quantized linears, "model": every stored tensor} (quikft.bits)
        "input_groups": quantized.input_groups,  # projections found to share one input, per block
        "experts": quantized.experts,  # MoE experts modules quantized expert by expert
        "starved_layers": quantized.starved(),  # layers whose statistics did not come from their own tokens
        "head": quantized.head,
        "untied_head": quantized.untied_head,
        "fp_ppl": ppl["fp_ppl"],
        "ppl": ppl["ppl"],
        "layers": layers,
        "versions": library_versions(),
        "threads": torch.get_num_threads(),  # GPTQ's rounding depends on it (jobs/quantize/state.py ADVISORY)
    }
