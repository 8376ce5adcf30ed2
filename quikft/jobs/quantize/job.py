"""The ``quikft quantize`` job: check → calibrate → quantize block by block → save → report, for any model size.

``quantize(job)`` is what the CLI calls; it is equally usable from Python. The model is never
loaded whole: its skeleton is built on the meta device and each decoder block is read from the
checkpoint's safetensors shards when its turn comes (:mod:`quikft.jobs.quantize.source`; a checkpoint
that cannot stream is loaded whole instead, and the report says so). The blocks are walked by the block
loop of :mod:`quikft.quant.loop` with the quantization step of :mod:`quikft.quant.steps` and the job's
streaming step (:mod:`quikft.jobs.quantize.streaming`).
Each finished block is written at once into the job's resumable state beside the output
(``<out>.quantize-state/``); ``--resume`` continues a killed run bit-identically. The output is a
packed checkpoint (:mod:`quikft.format`), or with ``fake_quant`` the dequantized float
weights, a debugging format any transformers install can read; either way the directory also
holds every layer's salient indices and the report, and appears only when complete (one
rename), so a crash or a bad setting never leaves a half-written run. Every setting, the output
location and the calibration data are checked before the model is loaded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from quikft import arch
from quikft.atomic import atomic_directory, prepare_output, write_json
from quikft.config import QuantizeJob, salient_text
from quikft.data import calibration_windows, check_source
from quikft.format.layout import DTYPE_REST
from quikft.format.writer import (
    build_quantization_config,
    pack_state,
    write_model_config,
    write_plain_config,
    write_salient_indices,
)
from quikft.hardware import resolve_device
from quikft.jobs.quantize.report import (
    REPORT_NAME,
    bits_per_weight,
    build_report,
    eval_windows,
    ppl_record,
    reference_cache,
    reference_ppl,
)
from quikft.jobs.quantize.source import ModelSource, fingerprint, open_model
from quikft.jobs.quantize.state import QuantizeState, directory_bytes
from quikft.jobs.quantize.streaming import (
    CALIBRATION,
    FP,
    QUANTIZED,
    SAVED,
    BlockOutput,
    BlockShards,
    BlockWeights,
    StreamingStep,
    capture_streams,
    rest_of,
    restore_record,
    round_floating,
)
from quikft.jobs.quantize.weights import load_outside_blocks, release
from quikft.models import cache_root, check_seqlen, model_label, model_reference, resolve_model
from quikft.quant.activations import Offload
from quikft.quant.blocks import BlockInputs, capture_block_inputs
from quikft.quant.budget import (
    CandidateMeasurement,
    check_budget,
    layer_shapes,
    measure_candidates,
    needs_sensitivity,
    plan_budget,
)
from quikft.quant.loop import Walk, run_blocks
from quikft.quant.sensitivity import layer_sensitivity
from quikft.quant.steps import QuantizedLayers, QuantizeLayers, quantize_head, quantize_label

__all__ = ["REPORT_NAME", "check", "quantize", "reference_ppl"]


def default_out_dir(job: QuantizeJob) -> Path:
    scheme = job.quant
    setting = f"bpw{scheme.target_bpw:g}" if scheme.target_bpw is not None else \
        f"w{scheme.bits}-k{salient_text(scheme.salient)}"
    return Path("runs") / f"{model_label(job.model)}-{setting}-{scheme.method}"


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
    source = open_model(job)
    # Refuse unsupported architectures (and patterns that select nothing) before any work.
    source.layout = arch.prepare(source.model, job.quant.targets, job.quant.ignore, job.quant.quantize_lm_head)
    if job.quant.target_bpw is not None:  # a budget no setting meets is refused before any work
        check_budget(layer_shapes(source.layout), job.quant)
    state = QuantizeState.begin(out_dir, fingerprint(job, source.weights), job.resume)
    try:
        report = _Run(job, source, state, out_dir, progress).run(began)
    finally:
        state.release()  # also when the job fails: a caller in the same process may run it again
    report["out"] = str(out_dir)
    return report


class _Run:
    """One quantize run's moving parts (see the module docstring)."""

    def __init__(self, job: QuantizeJob, source: ModelSource, state: QuantizeState, out_dir: Path, progress: bool):
        self.job, self.source, self.state, self.out_dir = job, source, state, out_dir
        self.model, self.weights, self.layout = source.model, source.weights, source.layout
        self.device = resolve_device(job.device)
        self.head = arch.head_name(self.model)
        self.head_loaded = self.weights is None or self.head is None or arch.head_is_tied(self.model)
        self.rest_dtype = None if job.fake_quant else DTYPE_REST[job.quant.dtype_rest]
        self.offload = Offload(job.offload_activations, self.device, state.directory / "scratch")
        self.walk = Walk(self.device, BlockWeights(self.model, self.weights), progress)
        self.out = QuantizedLayers()
        self.head_results: dict = {}

    def run(self, began: float) -> dict:
        job, scheme = self.job, self.job.quant
        if self.weights is not None:
            load_outside_blocks(self.weights, self.model, self.layout.blocks,
                                skip=[] if self.head_loaded else [self.head])
        first = self.state.next_block
        calib = calibration_windows(self.source.tokenizer, scheme.calib, scheme.nsamples, scheme.seqlen, scheme.seed)
        self.windows = eval_windows(self.model, self.source.tokenizer, job)
        self.cache = reference_cache(job)
        self.fp_cached = json.loads(self.cache.read_text()) if job.eval_windows and self.cache.exists() else None
        if scheme.target_bpw is not None:  # chosen once; a resumed run quantizes with the recorded choice
            self.out.plan = (self.state.progress or {}).get("plan") or self._measure(calib)
        calibration, evals = self._capture(calib)
        shards = BlockShards(self.state.blocks_dir, scheme.to_dict(), not job.fake_quant, self.rest_dtype)
        stream = StreamingStep(self.model, self.weights, BlockOutput(evals, shards, self.state, len(self.layout)),
                               self.out)
        quantizer = QuantizeLayers(scheme, self.out, keep=False)
        run_blocks(self.layout, calibration, [quantizer], Walk(self.device, stream, self.walk.progress,
                                                               quantize_label(scheme, self.out), first))
        self._load_head()
        report = self._write(shards, self._evaluate(stream, (quantizer, calibration)), began, first)
        self.state.discard()
        return report

    def _capture(self, calib: torch.Tensor):
        """Block-0 inputs (and every block's call arguments) of the calibration and evaluation streams;
        on a resumed run the activations come from the state instead."""
        job, layout = self.job, self.layout
        names = [] if not self.windows.windows else [
            *([FP] if self.fp_cached is None else []), QUANTIZED,
            *([SAVED] if self.rest_dtype not in (None, torch.float32) else [])]
        if self.state.progress:
            names = self.state.progress["eval_streams"]
        block0 = layout.blocks[0]
        self._load_block_zero()
        rounded = self._rounded_outside() if SAVED in names else None
        calibration = capture_block_inputs(self.model, layout, calib, job.batch_size, self.device)
        evals = capture_streams(layout, self.windows.windows, names, self.offload, rounded)
        if self.weights is not None:
            release(block0)
        calibration.batches = self.offload.store(calibration.batches)
        if self.state.progress:
            restore_record(self.state.progress, self.out, evals)
            calibration.advance(self.state.restore(CALIBRATION, self.offload))
            for name, stream in evals.inputs.items():
                stream.advance(self.state.restore(f"eval-{name}", self.offload))
        return calibration, evals

    def _measure(self, calib: torch.Tensor) -> dict:
        """--target-bpw: the layers' loss sensitivity if the error needs it, the measurement pass over the
        full-precision blocks, then the per-layer choice."""
        began = time.perf_counter()
        sensitivity = None
        if needs_sensitivity(self.job.quant):
            self._load_block_zero()
            self._load_head()
            sensitivity = layer_sensitivity(self.model, self.layout, calib, self.walk, self.job.batch_size)
        self._load_block_zero()
        inputs = capture_block_inputs(self.model, self.layout, calib, self.job.batch_size, self.device)
        inputs.batches = self.offload.store(inputs.batches)
        measurement = CandidateMeasurement(self.job.quant, sensitivity, done=self.state.measurement(),
                                           on_block=self.state.save_measurement)
        measured = measure_candidates(self.layout, inputs, measurement, self.walk)
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

    def _evaluate(self, stream: StreamingStep, head: tuple[QuantizeLayers, BlockInputs]) -> dict:
        """FP, quantized and as-saved ppl of the streams; quantizes the head in between if asked (with
        ``head``'s step, on its calibration activations leaving the last block)."""
        evals, label = stream.output.evals, str(self.out_dir)

        def result(name: str, model_name: str) -> dict | None:
            if name not in evals.inputs:
                return None
            nll, tokens = evals.nll(name, self.model, self.layout, self.device)
            return ppl_record(self.job, self.windows, model_name, (nll, tokens, evals.seconds.get(name, 0.0)))

        fp_ppl = self.fp_cached or result(FP, model_label(self.job.model))
        if fp_ppl is not None and self.fp_cached is None:
            write_json(self.cache, fp_ppl)
        if self.job.quant.quantize_lm_head:
            self.head_results = quantize_head(self.model, self.layout, head[1], head[0], self.device)
        ppl = result(QUANTIZED, label)
        saved = None
        if SAVED in evals.inputs:
            round_floating(self.model, self.rest_dtype, skip={f"{name}.{part}" for name in self.head_results
                                                              for part in ("weight", "bias")})
            saved = result(SAVED, label)
        return {"fp_ppl": fp_ppl, "ppl": ppl, "ppl_saved": saved, "eval_seconds": sum(evals.seconds.values()),
                "block_state_bytes": stream.block_state_bytes}

    def _write(self, shards: BlockShards, ppl: dict, began: float, first: int) -> dict:
        job, out = self.job, self.out
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
            self.source.tokenizer.save_pretrained(staging)
            write_salient_indices(staging, salient)
            report = build_report(job, out, time.perf_counter() - began, ppl, bits_per_weight(job, out, staging))
            if out.plan is not None:
                report["target_bpw"] = out.plan
            report.update(ppl_saved=ppl["ppl_saved"], loading=self.source.loading, resumed_from_block=first,
                          state_peak_bytes=self.state.peak_bytes,
                          state_bytes_per_block=max(ppl["block_state_bytes"], default=0),
                          output_bytes=directory_bytes(staging))
            write_json(staging / REPORT_NAME, report)
        return report
