"""Uniform quantization grids and their scale search.

Two grids live here, and each has exactly one purpose: their steps differ (at 2 bits the paper's
is the row max α, the symmetric storage grid's 2α/3), so using one for the other's purpose would
change the metric, the noise or the checkpoint without any error:

* **Storage grid** (``fit_scale_zero`` / ``quantize_codes`` / ``dequantize`` /
  ``fake_quantize``): the GPTQ convention the packed checkpoint uses. Codes are
  unsigned integers ``c`` in ``[0, 2^b - 1]`` and decode to ``(c - zero) * scale``.

  - asymmetric: the row range is widened to contain 0 (``xmin = min(min, 0)``,
    ``xmax = max(max, 0)``) so that 0 is exactly representable, then
    ``scale = (xmax - xmin) / (2^b - 1)`` and ``zero = round(-xmin / scale)``.
  - symmetric: ``zero = 2^(b-1)`` (fixed middle code) and
    ``scale = 2 * max|w| / (2^b - 1)``.

  Scales are rounded to fp16 precision because the checkpoint stores fp16 scales:
  the fake-quantized weight used during quantization and the weight unpacked from
  the checkpoint must be the very same numbers. Zero-points are returned as
  float32 tensors holding integer values (not int tensors) so that the
  dequantization ``(codes - zero) * scale`` is a float32 expression that is exact:
  ``codes - zero`` is a small integer and ``scale`` has an 11-bit mantissa, so
  their product fits in float32's 24-bit mantissa without rounding.

* **Paper grid** (``paper_step`` / ``paper_quantize``): GIFT-SW's signed grid
  ``delta * q`` with ``q`` in ``[-2^(b-1), 2^(b-1) - 1]`` and
  ``delta = alpha / (2^(b-1) - 1)``. It is used only by the saliency metric's ``Q``
  (the ``D_j`` term) and by the GIFT-SW training noise ``0.5 * delta * N(0, 1)``.
  At 2 bits ``delta = alpha`` and the levels are ``{-2d, -d, 0, d}``: four levels,
  none lost.

Both grids choose their clipping with the same search (paper Appendix A): the 80
shrink factors ``p = 1.00, 0.99, ..., 0.21`` are each applied to the row's
*original* range, and per row the factor with the least squared error is kept.
The public GIFT-SW code compounds the shrink across iterations by accident; this
module implements the clean, non-compounded search.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quikft.config import check_bits

# 1.00, 0.99, ..., 0.21: computed from integers so every value is the nearest
# double to the intended decimal, independent of accumulation order.
SHRINK_FACTORS = tuple((100 - i) / 100 for i in range(80))
# Every fourth (1.00, 0.96, ..., 0.24): --target-bpw's measurement estimates each candidate's loss with
# a quarter of the search; the error near the best factor is flat, so the estimate rises only slightly.
COARSE_SHRINK_FACTORS = SHRINK_FACTORS[::4]

# Smallest positive fp16 subnormal and largest finite fp16: scales are clamped
# into this range before the fp16 rounding so they never become 0 or inf.
_FP16_TINY = 2.0**-24
_FP16_MAX = 65504.0


def round_to_fp16(x: Tensor) -> Tensor:
    """Round float values to fp16 precision (kept as float32), saturating at the fp16 range.

    Saturating instead of overflowing keeps huge values finite; the checkpoint
    stores these tensors as fp16, so float32 copies must already hold fp16 values.
    """
    return x.float().clamp(-_FP16_MAX, _FP16_MAX).half().float()


# Rounding is done in place on fresh temporaries throughout: on this CPU build the
# out-of-place ``torch.round`` takes a path that is ~100x slower on small tensors
# when the two cores are contended, which dominated the whole GPTQ run.


def _fp16_scale(scale: Tensor) -> Tensor:
    """Make a positive scale fp16-exact, never 0 (division) nor inf (overflow)."""
    return scale.clamp(_FP16_TINY, _FP16_MAX).half().float()


# Widths. Every storage-grid function takes ``bits`` as an int, or as a (rows, 1) float tensor of
# widths, one per row: --target-bpw measures several widths of one layer in a single GPTQ pass over
# the weight's rows stacked once per width (quikft.quant.gptq.gptq_losses). The int path is the one
# every checkpoint is written with and stays as it was.
Bits = int | Tensor


def _check_widths(bits: Bits) -> None:
    if not isinstance(bits, Tensor):
        check_bits(bits)
        return
    for width in bits.unique().tolist():
        check_bits(int(width) if float(width).is_integer() else width)


def _clamp_to_grid(x: Tensor, maxq: int | Tensor) -> Tensor:
    """``x`` clamped in place to the codes ``[0, maxq]``."""
    if isinstance(maxq, Tensor):
        return torch.minimum(x.clamp_(min=0), maxq, out=x)
    return x.clamp_(0, maxq)


def _scale_zero_for_range(xmin: Tensor, xmax: Tensor, bits: Bits, sym: bool) -> tuple[Tensor, Tensor]:
    """Storage-grid scale and zero-point for per-row ranges ``[xmin, xmax]`` (0 inside)."""
    maxq = 2**bits - 1
    if sym:
        amax = torch.maximum(-xmin, xmax)
        # All-zero rows: any nonzero scale decodes the zero code back to exactly 0.
        scale = _fp16_scale(torch.where(amax > 0, 2 * amax / maxq, torch.ones_like(amax)))
        middle = 2 ** (bits - 1)
        zero = middle.expand_as(scale).clone() if isinstance(middle, Tensor) else torch.full_like(scale, float(middle))
        return scale, zero
    span = xmax - xmin
    scale = _fp16_scale(torch.where(span > 0, span / maxq, torch.ones_like(span)))
    # The zero-point is derived from the fp16-rounded scale so that codes and
    # decode use the same numbers.
    zero = _clamp_to_grid((-xmin / scale).round_(), maxq)
    return scale, zero


def _row_sq_error(w: Tensor, scale: Tensor, zero: Tensor, bits: Bits) -> Tensor:
    """Per-row sum of squared storage-grid error, shape (rows,)."""
    return (fake_quantize(w, scale, zero, bits) - w).pow(2).sum(dim=1)


def fit_scale_zero(w: Tensor, bits: Bits, sym: bool, clip_search: bool | tuple[float, ...] = True
                   ) -> tuple[Tensor, Tensor]:
    """Fit per-row storage-grid parameters on the columns of ``w`` (rows, cols).

    Returns ``scale`` (rows, 1) float32 holding fp16-exact values and ``zero``
    (rows, 1) float32 holding integers. With ``clip_search`` the row range is
    shrunk by each factor of ``SHRINK_FACTORS`` (or of the tuple given, which starts
    at 1.0: ``COARSE_SHRINK_FACTORS`` for --target-bpw's measurement) and the
    least-squared-error candidate is kept per row; ties keep the widest (first) candidate.
    """
    _check_widths(bits)
    w = w.float()
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    zeros_col = torch.zeros(w.shape[0], 1, dtype=w.dtype, device=w.device)
    if w.shape[1] == 0:
        return _scale_zero_for_range(zeros_col, zeros_col, bits, sym)
    xmin = torch.minimum(w.amin(dim=1, keepdim=True), zeros_col)
    xmax = torch.maximum(w.amax(dim=1, keepdim=True), zeros_col)
    best_scale, best_zero = _scale_zero_for_range(xmin, xmax, bits, sym)
    if not clip_search:
        return best_scale, best_zero
    best_err = _row_sq_error(w, best_scale, best_zero, bits)
    for p in (SHRINK_FACTORS if clip_search is True else clip_search)[1:]:
        scale, zero = _scale_zero_for_range(p * xmin, p * xmax, bits, sym)
        err = _row_sq_error(w, scale, zero, bits)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better[:, None], scale, best_scale)
        best_zero = torch.where(better[:, None], zero, best_zero)
    return best_scale, best_zero


def quantize_codes(w: Tensor, scale: Tensor, zero: Tensor, bits: Bits) -> Tensor:
    """Storage-grid codes ``clamp(round(w / scale) + zero, 0, 2^b - 1)`` as uint8."""
    maxq = 2**bits - 1
    return _clamp_to_grid((w.float() / scale).round_() + zero, maxq).to(torch.uint8)


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """Decode storage-grid codes: ``(codes - zero) * scale`` in float32 (exact, see module doc)."""
    return (codes.float() - zero) * scale


def fake_quantize(w: Tensor, scale: Tensor, zero: Tensor, bits: Bits) -> Tensor:
    """Quantize to the storage grid and decode again (float32)."""
    return dequantize(quantize_codes(w, scale, zero, bits), scale, zero)


def _paper_qrange(bits: int) -> tuple[int, int]:
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def paper_quantize(w: Tensor, delta: Tensor, bits: int) -> Tensor:
    """Round ``w`` onto the paper's signed grid: ``delta * clamp(round(w / delta), -2^(b-1), 2^(b-1) - 1)``."""
    qmin, qmax = _paper_qrange(bits)
    return delta * (w.float() / delta).round_().clamp_(qmin, qmax)


def paper_step(w: Tensor, bits: int, search: bool = True) -> Tensor:
    """Per-row step ``delta = alpha / (2^(b-1) - 1)`` of the paper grid, shape (rows, 1).

    ``alpha`` is ``p * max|w_row|`` for the shrink factor ``p`` with the least
    squared row error (``p = 1`` without ``search``). All-zero rows get
    ``delta = 1`` so callers never divide by zero.
    """
    check_bits(bits)
    w = w.float()
    denom = 2 ** (bits - 1) - 1
    amax = w.abs().amax(dim=1, keepdim=True) if w.shape[1] else w.new_zeros(w.shape[0], 1)
    # All-zero rows: amax = denom gives delta = 1 (every candidate has zero error,
    # so the first one, p = 1, is kept).
    amax = torch.where(amax > 0, amax, torch.full_like(amax, float(denom)))
    best_delta = amax / denom
    if not search:
        return best_delta
    best_err = (paper_quantize(w, best_delta, bits) - w).pow(2).sum(dim=1)
    for p in SHRINK_FACTORS[1:]:
        delta = p * amax / denom
        err = (paper_quantize(w, delta, bits) - w).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_delta = torch.where(better[:, None], delta, best_delta)
    return best_delta
