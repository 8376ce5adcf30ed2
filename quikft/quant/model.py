"""A whole model held in memory: the library's entry points :func:`quantize_model` and
:func:`select_salient_model`.

Each prepares the model's layout and runs the block loop (:mod:`quikft.quant.loop`) with its step
(:mod:`quikft.quant.steps`), then the output layer when asked. Under ``--target-bpw`` the per-layer
settings are chosen first (:mod:`quikft.quant.budget`). The quantize job (:mod:`quikft.jobs.quantize`)
runs the same loop and steps with its streaming steps beside them.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch

from quikft import arch
from quikft.config import QuantConfig, salient_text
from quikft.hardware import resolve_device
from quikft.quant import budget
from quikft.quant.blocks import capture_block_inputs
from quikft.quant.layer import choose_salient
from quikft.quant.loop import Walk, run_blocks
from quikft.quant.sensitivity import layer_sensitivity
from quikft.quant.statistics import head_statistics
from quikft.quant.steps import QuantizedLayers, QuantizeLayers, SelectSalient, quantize_head, quantize_label

__all__ = ["quantize_model", "select_salient_model"]


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
    walk = Walk(resolve_device(device), progress=progress)
    was_training = model.training
    model.eval()
    began = time.perf_counter()
    out = QuantizedLayers()
    if config.target_bpw is not None:
        out.plan = plan or _budget_plan(model, layout, calib, config, (walk, batch_size))
    inputs = capture_block_inputs(model, layout, calib, batch_size, walk.device)
    step = QuantizeLayers(config, out, salient)
    run_blocks(layout, inputs, [step], replace(walk, label=quantize_label(config, out)))
    if config.quantize_lm_head:
        out.results.update(quantize_head(model, layout, inputs, step, walk.device))
    out.seconds = time.perf_counter() - began
    model.train(was_training)
    return out


def _budget_plan(model, layout: arch.ModelLayout, calib: torch.Tensor, config: QuantConfig,
                 where: tuple[Walk, int]) -> dict[str, Any]:
    """--target-bpw in memory: the measurement pass on its own captured inputs, then the choice."""
    walk, batch_size = where
    budget.check_budget(budget.layer_shapes(layout), config)
    began = time.perf_counter()
    sensitivity = None
    if budget.needs_sensitivity(config):
        sensitivity = layer_sensitivity(model, layout, calib, walk, batch_size)
    inputs = capture_block_inputs(model, layout, calib, batch_size, walk.device)
    measured = budget.measure_candidates(layout, inputs, budget.CandidateMeasurement(config, sensitivity), walk)
    return budget.plan_budget(measured, config, time.perf_counter() - began)


@torch.no_grad()
def select_salient_model(model, calib: torch.Tensor, config: QuantConfig, progress: bool = True,
                         device: str = "cpu", batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Salient columns of every decoder projection of the full-precision model (Pre-GIFT-SW).

    The same statistics and metric as :func:`quantize_model`, block by block on the
    calibration windows, without quantizing anything (so each block's outputs are simply
    its full-precision outputs).
    """
    layout = arch.prepare(model, config.targets, config.ignore, config.quantize_lm_head)
    device = resolve_device(device)
    was_training = model.training
    model.eval()
    inputs = capture_block_inputs(model, layout, calib, batch_size, device)
    step = SelectSalient(config)
    run_blocks(layout, inputs, [step], Walk(device, progress=progress, label=f"select k{salient_text(config.salient)}"))
    salient = step.salient
    if config.quantize_lm_head:
        arch.untie_head(model)  # the head trains and quantizes on its own weights; the embedding stays FP
        name = arch.head_name(model)
        stats = head_statistics(model, layout, inputs, device, hessian=False)
        weight = arch.weight_of(model.get_submodule(name)).float()
        salient[name] = choose_salient(weight, stats.columns, config, name).cpu()
    model.train(was_training)
    return salient
