"""The ``quikft quantize`` job: check → load → calibrate → quantize block by block → save → report.

``quantize(job)`` is what the CLI calls; it is equally usable from Python. The output is a
packed checkpoint (:mod:`quikft.checkpoint`), or with ``fake_quant`` the dequantized float
weights, a debugging format any transformers install can read. Either way the directory also
holds every layer's salient indices and the report, and is written under a temporary name and
renamed at the end, so a crash or a bad setting never leaves a half-written run. Every setting,
the output location and the calibration data are checked before the model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from quikft import arch
from quikft.atomic import atomic_directory, prepare_output, write_json
from quikft.checkpoint import DTYPE_REST, write_packed
from quikft.config import QuantizeJob
from quikft.data import calibration_windows, check_source
from quikft.eval.ppl import quick_ppl
from quikft.hardware import DtypeChoice, native_bf16, resolve_device
from quikft.models import cache_root, check_seqlen, load_model, model_label, model_reference, resolve_model
from quikft.quant.pipeline import QuantizedLayers, quantize_model
from quikft.runinfo import library_versions, peak_rss_mb

REPORT_NAME = "quantize_report.json"
SALIENT_NAME = "salient_indices.safetensors"


def default_out_dir(job: QuantizeJob) -> Path:
    return Path("runs") / f"{model_label(job.model)}-w{job.quant.bits}-k{job.quant.salient}-{job.quant.method}"


def compute_dtype(job: QuantizeJob) -> DtypeChoice:
    """Quantization always computes in float32 (GPTQ's Hessian inverse needs it); the capability is recorded
    so reports of every job say what the machine could run fast."""
    return DtypeChoice(torch.float32, f"quantize computes in float32; {native_bf16(resolve_device(job.device))[1]}")


def _quick_ppl(model, tokenizer, job: QuantizeJob, label: str) -> dict | None:
    return quick_ppl(model, tokenizer, job.eval_windows, job.eval_stride, job.eval_seqlen, label)


def reference_ppl(model, tokenizer, job: QuantizeJob) -> dict | None:
    """The full-precision model's quick ppl, cached per model and eval setting (it never changes)."""
    if job.eval_windows == 0:
        return None
    path = resolve_model(job.model)
    config_file = Path(path) / "config.json"
    stamp = config_file.stat().st_mtime_ns if config_file.exists() else 0
    key = json.dumps([path, stamp, job.eval_seqlen, job.eval_windows, job.eval_stride])
    cache = cache_root() / "ppl" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    result = _quick_ppl(model, tokenizer, job, model_label(job.model))
    write_json(cache, result)
    return result


def round_unquantized(model, quantized: QuantizedLayers, dtype: torch.dtype) -> int:
    """Round every stored unquantized floating tensor to ``dtype`` in place (kept in its own dtype):
    the values the packed checkpoint will hold. Returns how many tensors were rounded."""
    quantized_keys = {f"{name}.{part}" for name in quantized.results for part in ("weight", "bias")}
    tensors = {t.data_ptr(): t for key, t in model.state_dict().items()
               if t.is_floating_point() and key not in quantized_keys}  # tied tensors once
    for tensor in tensors.values():
        tensor.copy_(tensor.to(dtype))
    return len(tensors)


def saved_model_ppl(model, tokenizer, quantized: QuantizedLayers, job: QuantizeJob, label: str) -> dict | None:
    """Quick ppl of the checkpoint as saved: unquantized tensors rounded to ``dtype_rest``.

    The packed output stores them in that dtype; the quantized ``ppl`` beside it keeps them in
    float32, so the two numbers give the change the storage dtype causes. None when there is
    nothing to measure (no evaluation, float32 storage or the fake-quant format).
    """
    if job.eval_windows == 0 or job.quant.dtype_rest == "fp32" or job.fake_quant:
        return None
    round_unquantized(model, quantized, DTYPE_REST[job.quant.dtype_rest])
    return _quick_ppl(model, tokenizer, job, label)


def save_fake_quantized(model, tokenizer, out_dir: Path) -> None:
    """A dequantized HF checkpoint (the debugging format), in the model's own layout (experts fused)."""
    arch.fuse_all_experts(model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def save_outputs(model, tokenizer, quantized: QuantizedLayers, job: QuantizeJob, out_dir: Path) -> None:
    """The checkpoint in the configured format, plus every layer's salient indices.

    The indices are also inside a packed checkpoint; the separate file gives later jobs
    (e.g. Pre-GIFT-SW re-quantization with fixed sets) one place to read them in both formats.
    """
    if job.fake_quant:
        save_fake_quantized(model, tokenizer, out_dir)
    else:
        write_packed(model, tokenizer, quantized, out_dir, job.quant, source_model=model_reference(job.model))
    save_file({name: t.contiguous() for name, t in quantized.salient_indices().items()}, out_dir / SALIENT_NAME)


def check(job: QuantizeJob) -> Path:
    """Everything that can be checked before the model loads; returns the output directory."""
    job.validate()
    check_source(job.quant.calib, "--calib")
    check_seqlen(job.model, job.quant.seqlen, trust_remote_code=job.trust_remote_code)
    out_dir = Path(job.out) if job.out else default_out_dir(job)
    return prepare_output(out_dir, REPORT_NAME, job.overwrite, inputs=[resolve_model(job.model)])


def quantize(job: QuantizeJob, progress: bool = True) -> dict:
    """Run the whole quantize job; returns the report that is also saved."""
    out_dir = check(job)
    began = time.perf_counter()
    torch.manual_seed(job.quant.seed)
    model, tokenizer = load_model(job.model, dtype=torch.float32, device="cpu",
                                  trust_remote_code=job.trust_remote_code)
    # Refuse unsupported architectures (and patterns that select nothing) before any work.
    arch.check_supported(model, job.quant.targets, job.quant.ignore, job.quant.quantize_lm_head)
    with atomic_directory(out_dir, overwrite=job.overwrite, marker=REPORT_NAME) as staging:
        eval_began = time.perf_counter()
        fp_ppl = reference_ppl(model, tokenizer, job)
        eval_seconds = time.perf_counter() - eval_began
        calib = calibration_windows(tokenizer, job.quant.calib, job.quant.nsamples, job.quant.seqlen, job.quant.seed)
        quantized = quantize_model(model, calib, job.quant, progress=progress, device=job.device,
                                   batch_size=job.batch_size)
        eval_began = time.perf_counter()
        ppl = _quick_ppl(model, tokenizer, job, str(out_dir))
        saved_ppl = saved_model_ppl(model, tokenizer, quantized, job, str(out_dir))
        eval_seconds += time.perf_counter() - eval_began
        save_outputs(model, tokenizer, quantized, job, staging)
        report = build_report(job, quantized, time.perf_counter() - began, eval_seconds, fp_ppl, ppl)
        report["ppl_saved"] = saved_ppl
        write_json(staging / REPORT_NAME, report)
    report["out"] = str(out_dir)
    return report


def build_report(job: QuantizeJob, quantized: QuantizedLayers, wall_seconds: float, eval_seconds: float,
                 fp_ppl: dict | None, ppl: dict | None) -> dict:
    layers = [asdict(layer) for layer in quantized.layers]
    total_in = sum(layer["in_features"] for layer in layers) or 1
    return {
        "job": "quantize",
        "config": job.to_dict(),
        "source_model": model_reference(job.model),
        "compute_dtype": compute_dtype(job).to_dict(),
        "format": "fake-quant" if job.fake_quant else "packed",
        "quantize_seconds": quantized.seconds,  # the block-by-block loop alone
        "wall_seconds": wall_seconds,  # the whole job, including loading, evaluation and saving
        "eval_seconds": eval_seconds,
        "peak_rss_mb": peak_rss_mb(),
        "salient_fraction": sum(layer["salient"] for layer in layers) / total_in,
        "input_groups": quantized.input_groups,  # projections found to share one input, per block
        "experts": quantized.experts,  # MoE experts modules quantized expert by expert
        "starved_layers": quantized.starved(),  # layers whose statistics did not come from their own tokens
        "head": quantized.head,
        "untied_head": quantized.untied_head,
        "fp_ppl": fp_ppl,
        "ppl": ppl,
        "layers": layers,
        "versions": library_versions(),
    }
