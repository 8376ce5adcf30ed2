"""Salient-column selection with the generalized sensitivity metric.

For a weight ``W`` (out x in) and the layer's calibration inputs ``X`` the score of
input column ``j`` is

    s_j = ||D_j||_tau ** d_power * ||X_j||_rho ** gamma,   D_j = W[:, j] - Q(W[:, j])

where ``Q`` is the paper's signed per-row grid (:func:`quikft.quant.grid.paper_step`
with a full-row clipping search, since the salient set is not known yet). The
input norms come from :class:`ColumnStats`, which streams per-column running
statistics so activations are never stored.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from quikft.config import PRESETS, MetricSpec, SaliencyMetric
from quikft.quant.grid import paper_quantize, paper_step


def _as_float(value: float | str | None) -> float | None:
    """Accept numbers or strings such as ``"inf"`` (CLI and YAML values)."""
    return None if value is None else float(value)


def resolve_metric(
    name: str | None = "gift",
    tau: float | str | None = None,
    rho: float | str | None = None,
    gamma: float | str | None = None,
) -> MetricSpec:
    """Build a ``MetricSpec`` from a preset name, free values, or a preset with overrides.

    With ``name`` the preset is the base and any of ``tau``/``rho``/``gamma`` given
    replaces its value. With ``name=None`` (or ``custom``), ``rho`` and ``gamma`` are
    required and ``tau=None`` means ``D`` is ignored.
    """
    tau_f, rho_f, gamma_f = _as_float(tau), _as_float(rho), _as_float(gamma)
    if name is not None and name != SaliencyMetric.CUSTOM:
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown saliency metric {name!r}; presets: {', '.join(PRESETS)}")
        base = PRESETS[key]
        return MetricSpec(
            tau=base.tau if tau_f is None else tau_f,
            rho=base.rho if rho_f is None else rho_f,
            gamma=base.gamma if gamma_f is None else gamma_f,
            d_power=base.d_power,
        )
    if rho_f is None or gamma_f is None:
        raise ValueError("a free metric needs rho and gamma (tau=None ignores the weight term)")
    return MetricSpec(tau=tau_f, rho=rho_f, gamma=gamma_f)


class ColumnStats:
    """Streamed per-column statistics of a linear layer's inputs.

    Keeps the running max ``|x|`` and float64 running sums of ``x^2`` and ``|x|``
    per input column, plus the token count; enough for ``||X_j||_rho`` with rho in
    {inf, 2, 1}. Calibration windows are full (no padding), so every token counts.
    """

    def __init__(self, in_features: int):
        self.in_features = in_features
        self.n_tokens = 0
        self.max_abs: Tensor | None = None
        self.sum_sq: Tensor | None = None
        self.sum_abs: Tensor | None = None

    def update(self, x: Tensor) -> None:
        """Add inputs ``x`` (..., in)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with last dimension {self.in_features}, got {tuple(x.shape)}")
        ax = x.reshape(-1, self.in_features).detach().float().abs()
        if ax.shape[0] == 0:
            return
        if self.max_abs is None:
            self.max_abs = torch.zeros(self.in_features, dtype=torch.float32, device=ax.device)
            self.sum_sq = torch.zeros(self.in_features, dtype=torch.float64, device=ax.device)
            self.sum_abs = torch.zeros(self.in_features, dtype=torch.float64, device=ax.device)
        self.max_abs = torch.maximum(self.max_abs, ax.amax(dim=0))
        # Per-batch partial sums in float32 (a few thousand tokens), the running total in
        # float64: converting the whole activation tensor to float64 cost more than the GEMM.
        self.sum_sq += (ax * ax).sum(dim=0).double()
        self.sum_abs += ax.sum(dim=0).double()
        self.n_tokens += ax.shape[0]

    def norm(self, rho: float) -> Tensor:
        """(in,) float32 ``||X_j||_rho`` over all valid tokens seen so far."""
        if self.max_abs is None:
            raise ValueError("ColumnStats.norm(): no tokens were added")
        rho = float(rho)
        if rho == math.inf:
            return self.max_abs.clone()
        if rho == 2.0:
            return self.sum_sq.sqrt().float()
        if rho == 1.0:
            return self.sum_abs.float()
        raise ValueError(f"rho must be one of 1, 2, inf; got {rho}")


def column_scores(weight: Tensor, stats: ColumnStats, spec: MetricSpec, bits: int) -> Tensor:
    """(in,) sensitivity ``s_j = ||D_j||_tau^d_power * ||X_j||_rho^gamma`` of every input column."""
    w = weight.detach().float()
    x_term = stats.norm(spec.rho).to(w.device).pow(spec.gamma)
    if spec.tau is None:
        return x_term
    delta = paper_step(w, bits, search=True)
    d = w - paper_quantize(w, delta, bits)
    d_term = torch.linalg.vector_norm(d, ord=spec.tau, dim=0).pow(spec.d_power)
    return d_term * x_term


def select_salient(scores: Tensor, k: int) -> Tensor:
    """Sorted unique int64 indices of the ``k`` highest scores (``k`` capped at ``len(scores)``)."""
    k = max(0, min(int(k), scores.numel()))
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=scores.device)
    idx = torch.topk(scores.float(), k).indices
    return torch.sort(idx).values.to(torch.int64)
