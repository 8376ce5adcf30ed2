"""One projection: its salient columns by the configured metric, then its quantization (GPTQ or RTN).

A layer no calibration token reached has no Hessian: it is quantized by RTN, its salient columns
chosen by the metric's weight term alone (every input column weighs the same).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from quikft import arch
from quikft.config import QuantConfig, QuantMethod, resolve_salient, salient_request, salient_text
from quikft.quant.gptq import QuantResult, gptq_quantize, rtn_quantize
from quikft.quant.saliency import ColumnStats, column_scores, resolve_metric, select_salient
from quikft.quant.scheme import QuantScheme
from quikft.quant.statistics import LayerStats, uniform_stats


def effective_salient(salient: int | float, in_features: int, name: str) -> int:
    """The layer's k (:func:`~quikft.config.resolve_salient`), warning once per layer width when capped."""
    k = resolve_salient(salient, in_features)
    if k >= salient_request(salient, in_features):
        return k
    # No layer name in the message: the warnings registry then shows it once per width.
    warnings.warn(f"--salient {salient_text(salient)} asks {salient_request(salient, in_features)} >= in_features "
                  f"{in_features} columns; capped at {k} for such layers (first: {'.'.join(name.rsplit('.', 2)[-2:])})",
                  stacklevel=3)
    return k


def choose_salient(weight: torch.Tensor, stats: ColumnStats, config: QuantConfig, name: str) -> torch.Tensor:
    """The layer's k salient input columns by the configured metric (sorted, int64)."""
    k = effective_salient(config.salient, weight.shape[1], name)
    metric = resolve_metric(config.metric, config.tau, config.rho, config.gamma)
    if stats.n_tokens == 0:
        stats = uniform_stats(weight.shape[1])
    return select_salient(column_scores(weight, stats, metric, config.bits), k)


def quantize_linear(linear: nn.Module, stats: LayerStats, config: QuantConfig, salient: torch.Tensor | None = None,
                    name: str = "layer") -> QuantResult:
    """Select salient columns (unless given) and quantize one projection's weight with the grid and
    GPTQ settings of ``config``; ``name`` is what a warning calls the layer.

    Without a Hessian (none gathered, or no calibration token reached the layer) the method is RTN.
    """
    weight = arch.weight_of(linear).float()
    hessian = stats.hessian_matrix()
    if salient is None:
        salient = choose_salient(weight, stats.columns, config, name)
    scheme = QuantScheme.of(config)
    if config.method == QuantMethod.RTN or hessian is None:
        return rtn_quantize(weight, salient, scheme, hessian=hessian)
    return gptq_quantize(weight, hessian, salient, scheme)


def layer_scheme(config: QuantConfig, plan: Mapping[str, Any] | None, name: str) -> QuantConfig:
    """The scheme one layer is quantized with: ``config``, or its bits and salient count from a
    per-layer ``plan`` (``--target-bpw``: name -> {"bits", "salient"})."""
    if not plan or name not in plan:
        return config
    return dataclasses.replace(config, bits=plan[name]["bits"], salient=plan[name]["salient"])
