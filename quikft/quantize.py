"""The ``quikft quantize`` job: load → calibrate → quantize block by block → save → report.

``quantize(config)`` is what the CLI calls; it is equally usable from Python. The output is a
packed checkpoint (:mod:`quikft.checkpoint`), or with ``fake_quant`` the dequantized float
weights, a debugging format any transformers install can read. Either way the directory also
holds every layer's salient indices and the report, and is written under a temporary name and
renamed at the end, so a crash or a bad setting never leaves a half-written run.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from quikft.atomic import atomic_directory, write_json
from quikft.checkpoint import DTYPE_REST, write_packed
from quikft.config import QuantConfig
from quikft.data import calibration_windows
from quikft.eval.ppl import PplResult, evaluate_ppl
from quikft.models import cache_root, load_model, model_label, resolve_model
from quikft.quant.pipeline import QuantizedLayers, linear_names, quantize_model
from quikft.runinfo import library_versions, peak_rss_mb

REPORT_NAME = "quantize_report.json"
SALIENT_NAME = "salient_indices.safetensors"


def default_out_dir(config: QuantConfig) -> Path:
    return Path("runs") / f"{model_label(config.model)}-w{config.bits}-k{config.salient}-{config.method}"


def quick_ppl(model, tokenizer, config: QuantConfig, label: str) -> PplResult:
    """WikiText-2 test ppl on the first ``eval_windows`` windows of the stride subset."""
    return evaluate_ppl(model, tokenizer, "wikitext2", config.eval_seqlen, config.eval_windows,
                        config.eval_stride, model_name=label)


def reference_ppl(model, tokenizer, config: QuantConfig) -> dict:
    """The full-precision model's quick ppl, cached per model and eval setting (it never changes)."""
    path = resolve_model(config.model)
    config_file = Path(path) / "config.json"
    stamp = config_file.stat().st_mtime_ns if config_file.exists() else 0
    key = json.dumps([path, stamp, config.eval_seqlen, config.eval_windows, config.eval_stride])
    cache = cache_root() / "ppl" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    result = quick_ppl(model, tokenizer, config, model_label(config.model)).to_dict()
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


def saved_model_ppl(model, tokenizer, quantized: QuantizedLayers, config: QuantConfig, label: str) -> dict | None:
    """Quick ppl of the checkpoint as saved: unquantized tensors rounded to ``dtype_rest``.

    The packed output stores them in that dtype; the quantized ``ppl`` beside it keeps them in
    float32, so the two numbers give the change the storage dtype causes. None when there is
    nothing to measure (no evaluation, float32 storage or the fake-quant format).
    """
    if config.eval_windows == 0 or config.dtype_rest == "fp32" or config.fake_quant:
        return None
    round_unquantized(model, quantized, DTYPE_REST[config.dtype_rest])
    return quick_ppl(model, tokenizer, config, label).to_dict()


def save_fake_quantized(model, tokenizer, out_dir: Path) -> None:
    """A dequantized HF checkpoint (the debugging format)."""
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def save_outputs(model, tokenizer, quantized: QuantizedLayers, config: QuantConfig, out_dir: Path) -> None:
    """The checkpoint in the configured format, plus every layer's salient indices.

    The indices are also inside a packed checkpoint; the separate file gives later jobs
    (e.g. Pre-GIFT-SW re-quantization with fixed sets) one place to read them in both formats.
    """
    if config.fake_quant:
        save_fake_quantized(model, tokenizer, out_dir)
    else:
        write_packed(model, tokenizer, quantized, out_dir, config)
    save_file({name: t.contiguous() for name, t in quantized.salient_indices().items()}, out_dir / SALIENT_NAME)


def quantize(config: QuantConfig, progress: bool = True) -> dict:
    """Run the whole quantize job for ``config``; returns the report that is also saved."""
    config.validate()
    out_dir = Path(config.out) if config.out else default_out_dir(config)
    began = time.perf_counter()
    torch.manual_seed(config.seed)
    model, tokenizer = load_model(config.model, dtype=torch.float32, device="cpu")
    linear_names(model)  # refuse unsupported architectures before any work
    with atomic_directory(out_dir, overwrite=True) as staging:
        eval_began = time.perf_counter()
        fp_ppl = reference_ppl(model, tokenizer, config) if config.eval_windows > 0 else None
        eval_seconds = time.perf_counter() - eval_began
        calib = calibration_windows(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed)
        quantized = quantize_model(model, calib, config, progress=progress)
        eval_began = time.perf_counter()
        ppl = quick_ppl(model, tokenizer, config, str(out_dir)).to_dict() if config.eval_windows > 0 else None
        saved_ppl = saved_model_ppl(model, tokenizer, quantized, config, str(out_dir))
        eval_seconds += time.perf_counter() - eval_began
        save_outputs(model, tokenizer, quantized, config, staging)
        report = build_report(config, quantized, time.perf_counter() - began, eval_seconds, fp_ppl, ppl)
        report["ppl_saved"] = saved_ppl
        write_json(staging / REPORT_NAME, report)
    report["out"] = str(out_dir)
    return report


def build_report(config: QuantConfig, quantized: QuantizedLayers, wall_seconds: float, eval_seconds: float,
                 fp_ppl: dict | None, ppl: dict | None) -> dict:
    layers = [asdict(layer) for layer in quantized.layers]
    total_in = sum(layer["in_features"] for layer in layers) or 1
    return {
        "job": "quantize",
        "config": config.to_dict(),
        "format": "fake-quant" if config.fake_quant else "packed",
        "quantize_seconds": quantized.seconds,  # the block-by-block loop alone
        "wall_seconds": wall_seconds,  # the whole job, including loading, evaluation and saving
        "eval_seconds": eval_seconds,
        "peak_rss_mb": peak_rss_mb(),
        "salient_fraction": sum(layer["salient"] for layer in layers) / total_in,
        "fp_ppl": fp_ppl,
        "ppl": ppl,
        "layers": layers,
        "versions": library_versions(),
    }
