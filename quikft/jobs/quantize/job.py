"""The ``quikft quantize`` job: check → calibrate → quantize block by block → save → report, for any model size.

``quantize(job)`` is what the CLI calls; it is equally usable from Python. The model is never
loaded whole: its skeleton is built on the meta device and each decoder block is read from the
checkpoint's safetensors shards when its turn comes (:mod:`quikft.jobs.quantize.streaming`; a checkpoint
whose tensor names transformers must convert is loaded whole instead, and the report says so).
Each finished block is written at once into the job's resumable state beside the output
(``<out>.quantize-state/``); ``--resume`` continues a killed run bit-identically. The output is a
packed checkpoint (:mod:`quikft.format`), or with ``fake_quant`` the dequantized float
weights, a debugging format any transformers install can read; either way the directory also
holds every layer's salient indices and the report, and appears only when complete (one
rename), so a crash or a bad setting never leaves a half-written run. Every setting, the output
location and the calibration data are checked before the model is loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from quikft import arch
from quikft.atomic import atomic_directory, prepare_output, write_json
from quikft.bits import layer_bits
from quikft.config import QuantizeJob, salient_text
from quikft.data import calibration_windows, check_source, eval_text, tokenize_stream
from quikft.eval.ppl import PplResult, max_context, quick_ppl, window_starts
from quikft.format.inspect import stored_bits
from quikft.format.layout import DTYPE_REST
from quikft.format.writer import (
    build_quantization_config,
    pack_state,
    write_model_config,
    write_plain_config,
    write_salient_indices,
)
from quikft.hardware import DtypeChoice, native_bf16, resolve_device
from quikft.jobs.quantize.state import QuantizeState, directory_bytes
from quikft.jobs.quantize.streaming import (
    CALIBRATION,
    FP,
    QUANTIZED,
    SAVED,
    BlockShards,
    BlockWeights,
    EvalStreams,
    StreamingHooks,
    capture_streams,
    record_of,
    rest_of,
    restore_record,
    round_floating,
)
from quikft.jobs.quantize.weights import CheckpointWeights, load_outside_blocks, local_checkpoint, release
from quikft.models import (
    cache_root,
    check_seqlen,
    load_model,
    load_tokenizer,
    model_label,
    model_reference,
    resolve_model,
)
from quikft.quant.activations import store_batches
from quikft.quant.budget import check_budget, layer_shapes, measure_candidates, needs_sensitivity, plan_budget
from quikft.quant.pipeline import QuantizedLayers, capture_block_inputs, quantize_blocks, quantize_head
from quikft.quant.sensitivity import layer_sensitivity
from quikft.runinfo import library_versions, peak_rss_mb

REPORT_NAME = "quantize_report.json"
EVAL_DATASET = "wikitext2"
# Job settings that do not change the output tensors (a resumed run may differ in them).
# "model" as spelled (an alias, a relative path) is not the model: model_path (resolved) and the
# weights' identity are.
NOT_FINGERPRINTED = ("out", "overwrite", "resume", "offload_activations", "device", "model")


def default_out_dir(job: QuantizeJob) -> Path:
    scheme = job.quant
    setting = f"bpw{scheme.target_bpw:g}" if scheme.target_bpw is not None else \
        f"w{scheme.bits}-k{salient_text(scheme.salient)}"
    return Path("runs") / f"{model_label(job.model)}-{setting}-{scheme.method}"


def quantize_dtype(job: QuantizeJob) -> DtypeChoice:
    """Quantization computes in float32 (GPTQ's Hessian inverse needs it; blocks run in the checkpoint's
    dtype); the capability is recorded so reports of every job say what the machine could run fast."""
    return DtypeChoice(torch.float32, f"quantize computes in float32; {native_bf16(resolve_device(job.device))[1]}")


def _quick_ppl(model, tokenizer, job: QuantizeJob, label: str) -> dict | None:
    return quick_ppl(model, tokenizer, job.eval_windows, job.eval_stride, job.eval_seqlen, label)


def _reference_cache(job: QuantizeJob) -> Path:
    path = resolve_model(job.model)
    config_file = Path(path) / "config.json"
    stamp = config_file.stat().st_mtime_ns if config_file.exists() else 0
    key = json.dumps([path, stamp, job.eval_seqlen, job.eval_windows, job.eval_stride])
    return cache_root() / "ppl" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def reference_ppl(model, tokenizer, job: QuantizeJob) -> dict | None:
    """The full-precision model's quick ppl, cached per model and eval setting (it never changes)."""
    if job.eval_windows == 0:
        return None
    cache = _reference_cache(job)
    if cache.exists():
        return json.loads(cache.read_text())
    result = _quick_ppl(model, tokenizer, job, model_label(job.model))
    write_json(cache, result)
    return result


# ------------------------------------------------------------------------------------ the model source

def open_model(job: QuantizeJob) -> tuple:
    """``(model, tokenizer, weights, loading)``: a meta skeleton plus the checkpoint to stream blocks
    from, or (when the checkpoint cannot stream) the whole model in float32 and ``weights`` None."""
    path = resolve_model(job.model)
    local = local_checkpoint(path)
    weights, reason = None, "no local safetensors checkpoint"
    if local is not None:
        try:
            weights = CheckpointWeights(local)
        except ValueError as err:  # no safetensors files (e.g. .bin only)
            reason = str(err)
    if weights is not None:
        model = weights.skeleton(job.trust_remote_code)
        unmatched = weights.plan(model)
        if not unmatched:
            return model, load_tokenizer(job.model, job.trust_remote_code), weights, "streamed block by block"
        reason = f"no stored tensor (under any name transformers maps) provides {unmatched[0]}"
    model, tokenizer = load_model(job.model, dtype=torch.float32, device="cpu", trust_remote_code=job.trust_remote_code)
    return model, tokenizer, None, f"whole model in memory: {reason}"


def fingerprint(job: QuantizeJob, weights: CheckpointWeights | None) -> dict:
    """Everything that changes the output tensors: settings, the model's identity, the libraries."""
    settings = {key: value for key, value in job.to_dict().items() if key not in NOT_FINGERPRINTED}
    path = Path(resolve_model(job.model))
    config_file = path / "config.json"
    identity = hashlib.sha256(config_file.read_bytes()).hexdigest() if config_file.is_file() else str(path)
    versions = library_versions()
    return {**json.loads(json.dumps(settings, default=str)), "model_path": str(path.resolve()),
            "model_config_sha256": identity, "model_bytes": weights.nbytes if weights else None,
            "model_weights": weights.identity() if weights else None,
            "device_type": torch.device(resolve_device(job.device)).type, "threads": torch.get_num_threads(),
            "torch": versions["torch"], "transformers": versions["transformers"]}


# ------------------------------------------------------------------------------------ the job

def eval_windows(model, tokenizer, job: QuantizeJob) -> tuple[list[torch.Tensor], int, int]:
    """The quick evaluation's ``(1, seqlen)`` windows as :func:`quikft.eval.ppl.evaluate_ppl` picks them,
    the window length and the number of full windows in the split."""
    if job.eval_windows == 0:
        return [], 0, 0
    seqlen = max_context(model, job.eval_seqlen)
    ids = tokenize_stream(tokenizer, eval_text(EVAL_DATASET, "test"), add_special_tokens=True)
    starts = window_starts(ids.numel(), seqlen, job.eval_windows, job.eval_stride)
    if not starts:
        raise ValueError(f"{EVAL_DATASET}: {ids.numel()} tokens give no window of {seqlen}; use a smaller "
                         f"--eval-seqlen")
    return [ids[s:s + seqlen].unsqueeze(0) for s in starts], seqlen, ids.numel() // seqlen


def check_cache() -> None:
    """``$QUIKFT_CACHE`` must be a directory (or creatable): the job writes its reference ppl there at the end."""
    root = cache_root()
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"QUIKFT_CACHE={root}: {existing} is not a directory; point QUIKFT_CACHE at a directory")


def check(job: QuantizeJob) -> Path:
    """Everything that can be checked before the model loads; returns the output directory."""
    job.validate()
    check_cache()
    check_source(job.quant.calib, "--calib")
    check_seqlen(job.model, job.quant.seqlen, trust_remote_code=job.trust_remote_code)
    out_dir = Path(job.out) if job.out else default_out_dir(job)
    return prepare_output(out_dir, REPORT_NAME, job.overwrite, inputs=[resolve_model(job.model)])


def quantize(job: QuantizeJob, progress: bool = True) -> dict:
    """Run the whole quantize job; returns the report that is also saved."""
    out_dir = check(job)
    began = time.perf_counter()
    torch.manual_seed(job.quant.seed)
    model, tokenizer, weights, loading = open_model(job)
    # Refuse unsupported architectures (and patterns that select nothing) before any work.
    layout = arch.prepare(model, job.quant.targets, job.quant.ignore, job.quant.quantize_lm_head)
    if job.quant.target_bpw is not None:  # a budget no setting meets is refused before any work
        check_budget(layer_shapes(layout), job.quant)
    state = QuantizeState.begin(out_dir, fingerprint(job, weights), job.resume)
    try:
        report = _Run(job, model, tokenizer, weights, layout, state, out_dir, progress).run(began, loading)
    finally:
        state.release()  # also when the job fails: a caller in the same process may run it again
    report["out"] = str(out_dir)
    return report


class _Run:
    """One quantize run's moving parts (see the module docstring)."""

    def __init__(self, job, model, tokenizer, weights, layout, state, out_dir, progress):
        self.job, self.model, self.tokenizer, self.weights = job, model, tokenizer, weights
        self.layout, self.state, self.out_dir, self.progress = layout, state, out_dir, progress
        self.device = resolve_device(job.device)
        self.head = arch.head_name(model)
        self.head_loaded = weights is None or self.head is None or arch.head_is_tied(model)
        self.rest_dtype = None if job.fake_quant else DTYPE_REST[job.quant.dtype_rest]
        self.scratch = state.directory / "scratch"
        self.head_results: dict = {}

    def run(self, began: float, loading: str) -> dict:
        job, scheme = self.job, self.job.quant
        if self.weights is not None:
            load_outside_blocks(self.weights, self.model, self.layout.blocks,
                                skip=[] if self.head_loaded else [self.head])
        first = self.state.next_block
        calib = calibration_windows(self.tokenizer, scheme.calib, scheme.nsamples, scheme.seqlen, scheme.seed)
        windows, eval_seqlen, total_windows = eval_windows(self.model, self.tokenizer, job)
        cache = _reference_cache(job)
        fp_cached = json.loads(cache.read_text()) if job.eval_windows and cache.exists() else None
        out = QuantizedLayers()
        if scheme.target_bpw is not None:  # chosen once; a resumed run quantizes with the recorded choice
            out.plan = (self.state.progress or {}).get("plan") or self._measure(calib)
        calibration, evals = self._capture(calib, windows, fp_cached is None, out)
        shards = BlockShards(self.state.blocks_dir, scheme.to_dict(), not job.fake_quant, self.rest_dtype)
        hooks = StreamingHooks(self.model, self.layout, self.weights, calibration, evals, shards, self.state,
                               self.rest_dtype, lambda o: record_of(o, len(self.layout), evals))
        quantize_blocks(self.model, self.layout, calibration, scheme, out, hooks, self.device, first=first,
                        progress=self.progress)
        self._load_head()
        ppl = self._evaluate(evals, windows, eval_seqlen, total_windows, fp_cached, calibration, out, cache)
        report = self._write(shards, out, ppl, loading, began, hooks.block_state_bytes, first)
        self.state.discard()
        return report

    def _capture(self, calib, windows, need_fp: bool, out: QuantizedLayers):
        """Block-0 inputs (and every block's call arguments) of the calibration and evaluation streams;
        on a resumed run the activations come from the state instead."""
        job, layout = self.job, self.layout
        names = [] if not windows else [*([FP] if need_fp else []), QUANTIZED,
                                        *([SAVED] if self.rest_dtype not in (None, torch.float32) else [])]
        if self.state.progress:
            names = self.state.progress["eval_streams"]
        block0 = layout.blocks[0]
        if self.weights is not None:
            self.weights.load(self.model, layout.block_name(0))
        rounded = self._rounded_outside() if SAVED in names else None
        calibration = capture_block_inputs(self.model, layout, calib, job.batch_size, self.device)
        evals = capture_streams(self.model, layout, windows, names, job.offload_activations, self.device,
                                self.scratch, rounded)
        if self.weights is not None:
            release(block0)
        calibration.batches = store_batches(calibration.batches, job.offload_activations, self.device, self.scratch)
        if self.state.progress:
            restore_record(self.state.progress, out, evals)
            calibration.advance(self.state.restore(CALIBRATION, job.offload_activations, self.device, self.scratch))
            for name, stream in evals.inputs.items():
                stream.advance(self.state.restore(f"eval-{name}", job.offload_activations, self.device,
                                                  self.scratch))
        return calibration, evals

    def _measure(self, calib: torch.Tensor) -> dict:
        """--target-bpw: the layers' loss sensitivity if the error needs it, the measurement pass over the
        full-precision blocks, then the per-layer choice."""
        began = time.perf_counter()
        hooks = BlockWeights(self.model, self.layout, self.weights)
        sensitivity = None
        if needs_sensitivity(self.job.quant):
            self._load_block_zero()
            self._load_head()
            sensitivity = layer_sensitivity(self.model, self.layout, calib, hooks, (self.device, self.job.batch_size),
                                            self.progress)
        self._load_block_zero()
        inputs = capture_block_inputs(self.model, self.layout, calib, self.job.batch_size, self.device)
        inputs.batches = store_batches(inputs.batches, self.job.offload_activations, self.device, self.scratch)
        measured = measure_candidates(self.layout, inputs, self.job.quant, hooks, self.device, self.progress,
                                      done=self.state.measurement(), on_block=self.state.save_measurement,
                                      sensitivity=sensitivity)
        return plan_budget(measured, self.job.quant, time.perf_counter() - began)

    def _load_block_zero(self) -> None:
        """Block 0's weights present: catching the block inputs runs it."""
        if self.weights is not None:
            self.weights.load(self.model, self.layout.block_name(0))

    def _rounded_outside(self) -> dict[str, torch.Tensor]:
        """The loaded tensors outside the blocks, rounded to ``dtype_rest`` (the saved stream's start)."""
        return {name: t.to(self.rest_dtype).to(t.dtype) for name, t in rest_of(self.model, self.layout).items()
                if t.is_floating_point() and not t.is_meta}

    def _load_head(self) -> None:
        if not self.head_loaded:
            self.weights.load(self.model, self.head)
            self.head_loaded = True

    def _evaluate(self, evals: EvalStreams, windows, seqlen, total_windows, fp_cached, calibration, out, cache):
        """FP, quantized and as-saved ppl of the streams; quantizes the head in between if asked."""
        label = str(self.out_dir)

        def result(name: str, model_name: str) -> dict | None:
            if name not in evals.inputs:
                return None
            nll, tokens = evals.nll(name, self.model, self.layout, self.device)
            seconds = evals.seconds.get(name, 0.0)
            return PplResult(model=model_name, dataset=EVAL_DATASET, seqlen=seqlen, windows=len(windows),
                             total_windows=total_windows, window_stride=self.job.eval_stride, tokens=tokens,
                             ppl=math.exp(nll / tokens), nll=nll / tokens, seconds=seconds,
                             tokens_per_s=len(windows) * seqlen / seconds if seconds else 0.0).to_dict()

        fp_ppl = fp_cached or result(FP, model_label(self.job.model))
        if fp_ppl is not None and fp_cached is None:
            write_json(cache, fp_ppl)
        if self.job.quant.quantize_lm_head:
            self.head_results = quantize_head(self.model, self.layout, calibration, self.job.quant, out,
                                              self.device)
        ppl = result(QUANTIZED, label)
        saved = None
        if SAVED in evals.inputs:
            round_floating(self.model, self.rest_dtype, skip={f"{name}.{part}" for name in self.head_results
                                                              for part in ("weight", "bias")})
            saved = result(SAVED, label)
        return {"fp_ppl": fp_ppl, "ppl": ppl, "ppl_saved": saved, "eval_seconds": sum(evals.seconds.values())}

    def _write(self, shards: BlockShards, out: QuantizedLayers, ppl: dict, loading: str, began: float,
               block_state_bytes: list[int], first: int) -> dict:
        job = self.job
        rest = rest_of(self.model, self.layout)
        if not job.fake_quant:
            rest = pack_state(rest, self.head_results, self.rest_dtype)
        with atomic_directory(self.out_dir, overwrite=job.overwrite, marker=REPORT_NAME) as staging:
            salient = shards.assemble(staging, len(self.layout), rest)
            salient.update({name: r.salient.to(torch.int32) for name, r in self.head_results.items()})
            if job.fake_quant:
                write_plain_config(self.model, staging)
            else:
                qconfig = build_quantization_config(out, job.quant, source_model=model_reference(job.model))
                write_model_config(self.model, qconfig, staging)
            self.tokenizer.save_pretrained(staging)
            write_salient_indices(staging, salient)
            report = build_report(job, out, time.perf_counter() - began, ppl["eval_seconds"], ppl["fp_ppl"],
                                  ppl["ppl"], bits_per_weight(job, out, staging))
            if out.plan is not None:
                report["target_bpw"] = out.plan
            report.update(ppl_saved=ppl["ppl_saved"], loading=loading, resumed_from_block=first,
                          state_peak_bytes=self.state.peak_bytes,
                          state_bytes_per_block=max(block_state_bytes, default=0),
                          output_bytes=directory_bytes(staging))
            write_json(staging / REPORT_NAME, report)
        return report


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


def build_report(job: QuantizeJob, quantized: QuantizedLayers, wall_seconds: float, eval_seconds: float,
                 fp_ppl: dict | None, ppl: dict | None, bits: dict | None = None) -> dict:
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
        "eval_seconds": eval_seconds,
        "peak_rss_mb": peak_rss_mb(),
        "salient_fraction": sum(layer["salient"] for layer in layers) / total_in,
        "bits_per_weight": bits,  # {"linear": quantized linears, "model": every stored tensor} (quikft.bits)
        "input_groups": quantized.input_groups,  # projections found to share one input, per block
        "experts": quantized.experts,  # MoE experts modules quantized expert by expert
        "starved_layers": quantized.starved(),  # layers whose statistics did not come from their own tokens
        "head": quantized.head,
        "untied_head": quantized.untied_head,
        "fp_ppl": fp_ppl,
        "ppl": ppl,
        "layers": layers,
        "versions": library_versions(),
        "threads": torch.get_num_threads(),  # GPTQ's rounding depends on it (quant/state.py ADVISORY)
    }
