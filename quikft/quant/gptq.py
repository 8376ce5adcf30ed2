"""Hessian accumulation, GPTQ with FP16 salient columns (QUIK style) and RTN.

The salient columns ``S`` of a linear layer stay in full precision; everything else
is quantized to the storage grid of :mod:`quikft.quant.grid`. GPTQ runs over the
non-salient columns only, with the salient ones permuted to the end so that they
receive (absorb) the propagated quantization error of every quantized column but
are never rounded themselves (as QUIK does).

Results are returned in the original column order. The quantized part and the
salient part are stored separately so a checkpoint can hold integer codes plus a
small dense fp16 matrix; ``QuantResult.weight`` is exactly their sum.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from quikft.config import check_bits
from quikft.quant.grid import COARSE_SHRINK_FACTORS, dequantize, round_to_fp16
from quikft.quant.scheme import QuantScheme


class HessianNotPositiveDefiniteError(RuntimeError):
    """Raised when the damped Hessian stays non positive-definite after all retries."""


class HessianAccumulator:
    """Streams ``H = 2/n * sum_t x_t x_t^T`` over the calibration tokens of one linear layer.

    Each batch's ``x^T x`` is a float32 GEMM (fast) and the running sum is kept in
    float64, so no re-normalisation is needed and millions of tokens do not lose
    precision. Calibration windows are full (no padding), so every token counts.
    """

    def __init__(self, in_features: int):
        self.in_features = in_features
        self.n_tokens = 0
        self._sum: Tensor | None = None

    def add_batch(self, x: Tensor) -> None:
        """Add inputs ``x`` (..., in)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with last dimension {self.in_features}, got {tuple(x.shape)}")
        x = x.reshape(-1, self.in_features)
        if x.shape[0] == 0:
            return
        x = x.detach().float()
        if self._sum is None:
            self._sum = torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=x.device)
        self._sum += (x.T @ x).double()
        self.n_tokens += x.shape[0]

    def hessian(self) -> Tensor:
        """The (in, in) float32 Hessian ``2/n X^T X``."""
        if self._sum is None or self.n_tokens == 0:
            raise ValueError("HessianAccumulator.hessian(): no tokens were added")
        return (self._sum * (2.0 / self.n_tokens)).float()


@dataclass
class QuantResult:
    """A quantized linear weight: integer codes for the non-salient part plus fp16 salient columns.

    Invariant: ``dequantized_base()`` with ``salient_weight`` scattered into the
    salient columns equals ``weight`` bit for bit.
    """

    weight: Tensor  # (out, in) float32 fake-quantized weight
    codes: Tensor  # (out, in) uint8; == zero-point at salient columns
    scales: Tensor  # (out, n_groups) float32, fp16-exact
    zeros: Tensor  # (out, n_groups) float32, integer-valued
    g_idx: Tensor  # (in,) int32 group of every original column
    salient: Tensor  # (k,) int64 sorted unique column indices
    salient_weight: Tensor  # (out, k) float32, fp16-exact
    loss: float
    bits: int
    group_size: int
    sym: bool

    def dequantized_base(self) -> Tensor:
        """Decode the codes with each column's group parameters; exactly 0 at salient columns."""
        g = self.g_idx.long()
        return dequantize(self.codes, self.scales[:, g], self.zeros[:, g])


def hessian_objective(delta: Tensor, hessian: Tensor) -> float:
    """``1/2 * sum_rows delta H delta^T``, i.e. ``||X delta^T||_F^2 / n`` for ``H = 2 X^T X / n``.

    The same number is reported by GPTQ and RTN so their losses are comparable: it
    is the mean (over calibration tokens) squared output error of the layer.
    """
    # float32 GEMM (cheap on every device); the final sum in float64 keeps the report stable.
    delta = delta.float()
    return float(0.5 * ((delta @ hessian.to(delta)) * delta).sum(dtype=torch.float64))


def _check_args(weight: Tensor, salient: Tensor, scheme: QuantScheme) -> Tensor:
    """Validate shared arguments; return ``salient`` as sorted unique int64 on the weight's device."""
    check_bits(scheme.bits)
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    if scheme.group_size != -1 and scheme.group_size <= 0:
        raise ValueError(f"group_size must be a positive integer or -1 (per row); got {scheme.group_size}")
    in_features = weight.shape[1]
    salient = torch.unique(salient.to(device=weight.device, dtype=torch.int64).reshape(-1))
    if salient.numel() and (salient[0] < 0 or salient[-1] >= in_features):
        raise ValueError(f"salient column indices must lie in [0, {in_features})")
    if salient.numel() >= in_features:
        raise ValueError(
            f"the number of salient columns ({salient.numel()}) must be smaller than in_features ({in_features})"
        )
    return salient


def _nonsalient_order(in_features: int, salient: Tensor, diag: Tensor | None) -> Tensor:
    """Original indices of the non-salient columns in processing order.

    With ``diag`` (act-order) they are sorted by descending Hessian diagonal; a
    stable sort keeps ties in natural order so results are reproducible.
    """
    mask = torch.ones(in_features, dtype=torch.bool, device=salient.device)
    mask[salient] = False
    order = torch.nonzero(mask).flatten()
    if diag is not None:
        order = order[torch.argsort(diag[order], descending=True, stable=True)]
    return order


def _group_index(in_features: int, order: Tensor, salient: Tensor, group_size: int) -> Tensor:
    """Group of every original column (int64).

    Non-salient columns belong to the group of their position in processing order.
    A salient column borrows the group of the nearest preceding non-salient column
    in original order (the following one if none precedes); its code equals that
    group's zero-point, so the choice only keeps ``g_idx`` valid and monotone when
    act-order is off.
    """
    m = order.numel()
    pos = torch.arange(m, device=order.device)
    g_idx = torch.empty(in_features, dtype=torch.int64, device=order.device)
    g_idx[order] = pos // group_size if group_size > 0 else torch.zeros_like(pos)
    if salient.numel():
        cols = torch.arange(in_features, device=order.device)
        is_ns = torch.ones(in_features, dtype=torch.bool, device=order.device)
        is_ns[salient] = False
        prev = torch.where(is_ns, cols, torch.full_like(cols, -1)).cummax(dim=0).values
        first_ns = cols[is_ns][0]
        neighbour = torch.where(prev >= 0, prev, first_ns)
        g_idx[salient] = g_idx[neighbour[salient]]
    return g_idx


def _assemble(order: Tensor, quantized: tuple[Tensor, Tensor, Tensor], salient: Tensor, salient_values: Tensor,
              scheme: QuantScheme) -> QuantResult:
    """Build a ``QuantResult`` in original column order from processing-order codes and their
    group scales and zeros (``quantized``)."""
    codes_ord, scales, zeros = quantized
    out_features = codes_ord.shape[0]
    in_features = order.numel() + salient.numel()
    g_idx = _group_index(in_features, order, salient, scheme.group_size)
    codes = torch.empty(out_features, in_features, dtype=torch.uint8, device=codes_ord.device)
    codes[:, order] = codes_ord
    # Code == zero-point makes the quantized part decode to exactly 0 at salient columns.
    codes[:, salient] = zeros[:, g_idx[salient]].to(torch.uint8)
    salient_weight = round_to_fp16(salient_values)
    result = QuantResult(
        weight=codes.new_empty(0),
        codes=codes,
        scales=scales,
        zeros=zeros,
        g_idx=g_idx.to(torch.int32),
        salient=salient,
        salient_weight=salient_weight,
        loss=0.0,
        bits=scheme.bits,
        group_size=scheme.group_size,
        sym=scheme.sym,
    )
    # Built from the stored parts so the bit-exact invariant holds by construction.
    weight = result.dequantized_base()
    weight[:, salient] = salient_weight
    result.weight = weight
    return result


def _inverse_hessian_factor(hessian: Tensor, percdamp: float, retries: int = 4) -> Tensor:
    """Upper Cholesky factor of ``(H + damp*I)^-1``, increasing damping tenfold on failure.

    Calibration Hessians are often near-singular (few tokens, correlated features);
    more damping trades a little accuracy for a factorisation that exists.
    """
    n = hessian.shape[0]
    mean_diag = float(hessian.diagonal().mean())
    base = abs(mean_diag) if mean_diag != 0 else 1.0
    frac = percdamp
    eye = torch.eye(n, dtype=hessian.dtype, device=hessian.device)
    for attempt in range(retries + 1):
        chol, info = torch.linalg.cholesky_ex(hessian + (frac * base) * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                if attempt:
                    warnings.warn(
                        f"GPTQ: Hessian needed damping {frac:g} x mean(diag) to be positive-definite",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                return upper
        frac = frac * 10 if frac > 0 else 0.01
    raise HessianNotPositiveDefiniteError(
        f"GPTQ: Cholesky of the damped Hessian failed even with damping {frac / 10:g} x mean(diag); "
        "the calibration inputs are degenerate (too few tokens or NaN/inf activations?)"
    )


def _block_bounds(m: int, block_size: int, group_size: int) -> list[int]:
    """Block boundaries over the ``m`` non-salient columns, also split at every group start.

    At a block start every earlier error has been propagated to all later columns,
    so fitting a group there sees the current, error-updated weights, exactly as a
    column-by-column GPTQ would. The lazy block update is exact, so extra
    boundaries change nothing else.
    """
    starts = set(range(0, m, block_size))
    if group_size > 0:
        starts |= set(range(0, m, group_size))
    return sorted(starts) + [m]


def _gptq_columns(w: Tensor, hinv_u: Tensor, m: int, scheme: QuantScheme) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize the first ``m`` columns of ``w`` in place with error feedback (lazy-batch GPTQ).

    ``w`` is in processing order (salient columns last); its columns from ``m`` on
    are updated but never rounded. Returns codes (out, m) and the per-group
    scales and zeros (out, n_groups).
    """
    group_size = scheme.group_size
    out_features = w.shape[0]
    codes = torch.empty(out_features, m, dtype=torch.uint8, device=w.device)
    scales: list[Tensor] = []
    zeros: list[Tensor] = []
    if group_size <= 0:
        scale, zero = scheme.fit(w[:, :m])
        scales.append(scale)
        zeros.append(zero)
    bounds = _block_bounds(m, scheme.block_size, group_size)
    for i1, i2 in zip(bounds[:-1], bounds[1:], strict=True):
        if group_size > 0 and i1 % group_size == 0:
            scale, zero = scheme.fit(w[:, i1 : min(i1 + group_size, m)])
            scales.append(scale)
            zeros.append(zero)
        w1 = w[:, i1:i2]  # a view: in-block updates land in w directly
        h1 = hinv_u[i1:i2, i1:i2]
        err1 = torch.empty_like(w1)
        for i in range(i2 - i1):
            col = w1[:, i : i + 1]
            code = scheme.codes(col, scale, zero)
            codes[:, i1 + i] = code[:, 0]
            err = (col - dequantize(code, scale, zero)) / h1[i, i]
            err1[:, i : i + 1] = err
            w1[:, i:] -= err * h1[i : i + 1, i:]
        w[:, i2:] -= err1 @ hinv_u[i1:i2, i2:]
    return codes, torch.cat(scales, dim=1), torch.cat(zeros, dim=1)


def gptq_quantize(weight: Tensor, hessian: Tensor, salient: Tensor, scheme: QuantScheme) -> QuantResult:
    """GPTQ over the non-salient columns with the salient columns last and kept in fp16.

    ``hessian`` is ``2/n X^T X`` of the layer inputs (see ``HessianAccumulator``).
    Groups of ``scheme.group_size`` are formed over the non-salient columns in processing
    order (act-order permutes only those); ``-1`` is one group per row.
    ``QuantResult.loss`` is :func:`hessian_objective` of the final error.
    """
    salient = _check_args(weight, salient, scheme)
    if scheme.block_size <= 0:
        raise ValueError(f"block_size must be positive; got {scheme.block_size}")
    in_features = weight.shape[1]
    if hessian.shape != (in_features, in_features):
        raise ValueError(
            f"hessian must have shape ({in_features}, {in_features}); got {tuple(hessian.shape)}"
        )
    w, hinv_u, order = _prepared(weight, hessian, salient, scheme)
    m = order.numel()
    quantized = _gptq_columns(w, hinv_u, m, scheme)

    result = _assemble(order, quantized, salient, w[:, m:], scheme)
    result.loss = hessian_objective(result.weight - weight.float(), hessian.float())
    return result


def _prepared(weight: Tensor, hessian: Tensor, salient: Tensor, scheme: QuantScheme
              ) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ's starting point: the weight (a copy) in processing order with the salient columns last, the
    upper Cholesky factor of its damped inverse Hessian in that order, and the non-salient order."""
    w = weight.detach().float().clone()
    h = hessian.detach().to(device=w.device, dtype=torch.float32).clone()

    # Dead inputs carry no information: unit diagonal keeps H invertible, and their
    # (non-salient) weights are zeroed as GPTQ does. Salient ones keep their values.
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    zero_cols = dead.clone()
    zero_cols[salient] = False
    w[:, zero_cols] = 0.0

    order = _nonsalient_order(weight.shape[1], salient, h.diagonal() if scheme.act_order else None)
    perm = torch.cat([order, salient])
    return w[:, perm], _inverse_hessian_factor(h[perm][:, perm], scheme.percdamp), order


def gptq_row_losses(weight: Tensor, hessian: Tensor, salient: Tensor, widths: list[int], scheme: QuantScheme
                    ) -> Tensor:
    """Each row's share of :func:`hessian_objective` (float64, shape (len(widths), rows)) of
    :func:`gptq_quantize` at each of ``widths`` (same salient columns, the grid and GPTQ settings of
    ``scheme``, the clipping search over :data:`~quikft.quant.grid.COARSE_SHRINK_FACTORS`), from one GPTQ pass.

    GPTQ treats every row on its own given the Hessian, so the rows are stacked once per width (each copy
    with its own width) and share the column order, the Cholesky factor and the column loop: --target-bpw's
    measurement pays one loop per salient set instead of one per candidate. The losses equal separate runs'
    (:func:`gptq_quantize` with ``clip_search=COARSE_SHRINK_FACTORS``) up to float rounding in the block
    updates (a larger matrix product may sum in another order)."""
    salient = _check_args(weight, salient, replace(scheme, bits=max(widths)))
    for width in widths:
        check_bits(width)
    rows = weight.shape[0]
    w, hinv_u, order = _prepared(weight.repeat(len(widths), 1), hessian, salient, scheme)
    target = w.clone()
    per_row = torch.tensor(widths, dtype=torch.float32, device=w.device).repeat_interleave(rows)[:, None]
    m, group_size = order.numel(), scheme.group_size
    search = COARSE_SHRINK_FACTORS if scheme.clip_search else False
    codes, scales, zeros = _gptq_columns(w, hinv_u, m, replace(scheme, bits=per_row, clip_search=search))
    group = torch.arange(m, device=w.device) // group_size if group_size > 0 else torch.zeros(m, dtype=torch.long)
    delta = torch.cat([dequantize(codes, scales[:, group], zeros[:, group]), round_to_fp16(w[:, m:])], 1) - target
    perm = torch.cat([order, salient])
    h = hessian.detach().to(device=w.device, dtype=torch.float32)[perm][:, perm]
    return row_objective(delta, h).reshape(len(widths), rows)


def row_objective(delta: Tensor, hessian: Tensor | None) -> Tensor:
    """Each row's share of :func:`hessian_objective` (float64); the squared error without a Hessian."""
    delta = delta.float()
    if hessian is None:
        return delta.square().sum(dim=1, dtype=torch.float64)
    return 0.5 * ((delta @ hessian.to(delta)) * delta).sum(dim=1, dtype=torch.float64)


def rtn_quantize(weight: Tensor, salient: Tensor, scheme: QuantScheme, hessian: Tensor | None = None
                 ) -> QuantResult:
    """Round-to-nearest baseline on the same grid: no error feedback, salient columns kept in fp16.

    Groups are consecutive runs of ``scheme.group_size`` non-salient columns in natural
    order (GPTQ's settings of ``scheme`` are not used). ``loss`` is :func:`hessian_objective`
    when ``hessian`` is given, else the plain mean squared weight error.
    """
    salient = _check_args(weight, salient, scheme)
    w = weight.detach().float()
    order = _nonsalient_order(w.shape[1], salient, None)
    w_ns = w[:, order]
    m = order.numel()
    size = scheme.group_size if scheme.group_size > 0 else m
    codes_parts, scales, zeros = [], [], []
    for start in range(0, m, size):
        block = w_ns[:, start : start + size]
        scale, zero = scheme.fit(block)
        codes_parts.append(scheme.codes(block, scale, zero))
        scales.append(scale)
        zeros.append(zero)
    quantized = (torch.cat(codes_parts, dim=1), torch.cat(scales, dim=1), torch.cat(zeros, dim=1))
    result = _assemble(order, quantized, salient, w[:, salient], scheme)
    delta = result.weight - w
    result.loss = (
        hessian_objective(delta, hessian.float()) if hessian is not None else float(delta.pow(2).mean())
    )
    return result

