"""Quantize a whole model held in memory: the library's entry point (:func:`quantize_model`).

It prepares the model's layout, chooses per-layer settings first under ``--target-bpw``
(:mod:`quikft.quant.budget`), then runs the block loop of :mod:`quikft.quant.pipeline` (and the
output layer when asked). The quantize job (:mod:`quikft.jobs.quantize`) drives the same loop with its
streaming hooks instead.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from quikft import arch
from quikft.config import QuantConfig
from quikft.hardware import resolve_device
from quikft.quant import budget
from quikft.quant.pipeline import (
    BlockHooks,
    QuantizedLayers,
    capture_block_inputs,
    quantize_blocks,
    quantize_head,
)
from quikft.quant.sensitivity import layer_sensitivity

__all__ = ["quantize_model"]


@torch.no_grad()
def quantize_model(model, calib: torch.Tensor, config: QuantConfig, progress: bool = True,
                   salient: dict[str, torch.Tensor] | None = None, device: str = "cpu",
                   batch_size: int = 8, plan: dict[str, Any] | None = None) -> QuantizedLayers:
    """Quantize every decoder projection of ``model`` in place (fake-quantized weights) and return
    the integer codes, scales and salient columns of each. ``salient`` may fix the index sets
    (Pre-GIFT-SW keeps the ones it trained). Each block is quantized on ``device`` (``auto``: cuda
    when present), its calibration forward runs ``batch_size`` windows at a time.

    Experts stored as 3-D parameters are unfused into per-expert linears first (see
    :mod:`quikft.arch.experts`); the model keeps that layout afterwards, and results are named
    after it. With ``config.quantize_lm_head`` the output layer is quantized last (untied from
    the embedding first if needed). With ``config.target_bpw`` each layer's bits and salient count
    are chosen by a measurement pass first (:mod:`quikft.quant.budget`), unless ``plan`` gives them
    (``{"layers": {name: {"bits": b, "salient": k}}}``; a plan needs ``target_bpw`` set too).
    """
    layout = arch.prepare(model, config.targets, config.ignore, config.quantize_lm_head)
    device = resolve_device(device)
    was_training = model.training
    model.eval()
    began = time.perf_counter()
    out = QuantizedLayers()
    if config.target_bpw is not None:
        out.plan = plan or _budget_plan(model, layout, calib, config, (device, batch_size), progress)
    inputs = capture_block_inputs(model, layout, calib, batch_size, device)
    quantize_blocks(model, layout, inputs, config, out, BlockHooks(), device, progress=progress, salient=salient)
    if config.quantize_lm_head:
        out.results.update(quantize_head(model, layout, inputs, config, out, device, salient))
    out.seconds = time.perf_counter() - began
    model.train(was_training)
    return out


def _budget_plan(model, layout: arch.ModelLayout, calib: torch.Tensor, config: QuantConfig,
                 where: tuple[str, int], progress: bool) -> dict[str, Any]:
    """--target-bpw in memory: the measurement pass on its own captured inputs, then the choice."""
    device, batch_size = where
    budget.check_budget(budget.layer_shapes(layout), config)
    began = time.perf_counter()
    sensitivity = None
    if budget.needs_sensitivity(config):
        sensitivity = layer_sensitivity(model, layout, calib, BlockHooks(), where, progress)
    inputs = capture_block_inputs(model, layout, calib, batch_size, device)
    measured = budget.measure_candidates(layout, inputs, config, BlockHooks(), device, progress,
                                         sensitivity=sensitivity)
    return budget.plan_budget(measured, config, time.perf_counter() - began)
