"""``recover_report.json``: what a recovery run records (``quikft report`` reads it back)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from quikft.format.inspect import stored_bits
from quikft.format.reader import is_packed_checkpoint
from quikft.recovery.loss import Loss
from quikft.recovery.modes import Prepared
from quikft.recovery.run import Run
from quikft.recovery.session import Curve
from quikft.runinfo import library_versions, peak_rss_mb


@dataclass(frozen=True)
class Outcome:
    """What finishing measured: the quick ppl after training, the trained parameters, the run's seconds
    and the output's bits per weight."""

    ppl_after: dict | None
    trainable_params: int
    seconds: float
    bits: dict | None = None


def run_settings(run: Run, prepared: Prepared | None = None) -> dict:
    """The config as it ran: noise, noise bits and compute dtype resolved, and the KD teacher when the
    loss has one (what reports and resume compare)."""
    settings = run.config.to_dict()
    settings["noise_bits"] = run.mode.noise_bits(run.config)
    settings["noise"] = settings["noise_bits"] is not None
    settings["compute_dtype"] = run.dtype.name
    if prepared is not None and Loss(run.config.loss).needs_teacher:
        settings["teacher"] = prepared.teacher(run.config)
    return settings


def bits_per_weight(output: Path) -> dict | None:
    """``{"linear", "model"}`` bits per weight of a packed output, counted from its files (quikft.bits);
    None for a LoRA baseline, whose fp32 adapter is stored apart from the packed base."""
    return stored_bits(output).to_dict() if is_packed_checkpoint(output) else None


def build_report(run: Run, prepared: Prepared, curve: Curve, outcome: Outcome) -> dict:
    config = run.config
    steps = curve.step_seconds
    # The first step includes one-off costs (allocations, caches): leave it out of the mean if we can.
    typical = steps[1:] or steps
    step_seconds = sum(typical) / len(typical) if typical else None
    return {
        "job": "recover",
        "config": run_settings(run, prepared),
        # What the output is quantized to (post modes: the input checkpoint's).
        "bits": prepared.quantization.get("bits"),
        "salient": prepared.quantization.get("salient"),
        "bits_per_weight": outcome.bits,
        "source_model": prepared.source_model,
        "device": run.device,
        "compute_dtype": run.dtype.to_dict(),
        "fp_ppl": prepared.fp_ppl,
        "ppl_before": prepared.ppl_before,
        "ppl_after": outcome.ppl_after,
        "trainable_params": outcome.trainable_params,
        "processes": curve.processes,  # data-parallel processes; batch_size is their sum
        "step_seconds": step_seconds,
        "train_seconds": sum(steps),
        "tokens_per_s": config.batch_size * config.grad_accum * config.seqlen / step_seconds if step_seconds else None,
        "seconds": outcome.seconds,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_mb_per_process": curve.peak_rss_mb_per_process,  # during training
        "sharding": config.sharding if curve.processes > 1 else None,
        "loss_curve": curve.loss_curve,
        "eval_curve": curve.eval_curve,
        "versions": library_versions(),
        "threads": torch.get_num_threads(),
    }
