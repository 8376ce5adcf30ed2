"""Tests of the storage grid (GPTQ convention) and the paper's signed grid."""

import math

import pytest
import torch

from quikft.config import BITS, check_bits
from quikft.quant.grid import (
    SHRINK_FACTORS,
    dequantize,
    fake_quantize,
    fit_scale_zero,
    paper_quantize,
    paper_step,
    quantize_codes,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _weights(rows: int = 24, cols: int = 64, seed: int = 0) -> torch.Tensor:
    """Gaussian rows with a few heavy outliers, so clipping has something to gain."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[:, 3] *= 15
    w[::3, cols - 5] += 0.5
    w[1] = w[1].abs() + 0.01  # an all-positive row: xmin must be widened to 0
    return w


def _storage_candidate(w: torch.Tensor, bits: int, sym: bool, p: float) -> torch.Tensor:
    """Row errors of one shrink factor, written independently of the module (one row at a time)."""
    maxq = 2**bits - 1
    errs = []
    for row in w:
        lo, hi = min(row.min().item(), 0.0), max(row.max().item(), 0.0)
        if sym:
            amax = p * max(-lo, hi)
            s = 2 * amax / maxq if amax > 0 else 1.0
            z = 2 ** (bits - 1)
        else:
            span = p * (hi - lo)
            s = span / maxq if span > 0 else 1.0
        s = float(torch.tensor(s).half())
        if not sym:
            z = min(max(round(-p * lo / s), 0), maxq)
        q = torch.clamp(torch.round(row / s) + z, 0, maxq)
        errs.append(((q - z) * s - row).pow(2).sum())
    return torch.stack(errs)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [False, True])
def test_codes_in_range_and_error_within_half_step(bits, sym):
    w = _weights()
    scale, zero = fit_scale_zero(w, bits, sym)
    codes = quantize_codes(w, scale, zero, bits)
    assert codes.dtype == torch.uint8
    assert int(codes.max()) <= 2**bits - 1
    lo, hi = (0 - zero) * scale, (2**bits - 1 - zero) * scale
    inside = (w >= lo) & (w <= hi)
    err = (dequantize(codes, scale, zero) - w).abs()
    assert inside.float().mean() > 0.5  # 2-bit clipping cuts deep
    assert bool((err[inside] <= (scale / 2).expand_as(w)[inside] * (1 + 1e-6)).all())
    # Values clipped away land on the nearest end of the grid.
    fq = fake_quantize(w, scale, zero, bits)
    assert torch.equal(fq[w > hi], hi.expand_as(w)[w > hi])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("sym", [False, True])
def test_scales_fp16_exact_zero_integer(bits, sym):
    scale, zero = fit_scale_zero(_weights(seed=1), bits, sym)
    assert scale.shape == zero.shape == (24, 1)
    assert scale.dtype == zero.dtype == torch.float32
    assert torch.equal(scale, scale.half().float())
    assert bool((scale > 0).all())
    assert torch.equal(zero, zero.round())
    assert bool(((zero >= 0) & (zero <= 2**bits - 1)).all())
    if sym:
        assert bool((zero == 2 ** (bits - 1)).all())


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("sym", [False, True])
def test_clip_search_picks_least_error_candidate(bits, sym):
    w = _weights(rows=12, cols=40, seed=2)
    brute = torch.stack([_storage_candidate(w, bits, sym, p) for p in SHRINK_FACTORS])  # (80, rows)
    scale, zero = fit_scale_zero(w, bits, sym, clip_search=True)
    got = (fake_quantize(w, scale, zero, bits) - w).pow(2).sum(dim=1)
    torch.testing.assert_close(got, brute.min(dim=0).values, rtol=1e-5, atol=1e-9)
    # Without the search the candidate p = 1 is used; the outliers make clipping pay off.
    scale1, zero1 = fit_scale_zero(w, bits, sym, clip_search=False)
    got1 = (fake_quantize(w, scale1, zero1, bits) - w).pow(2).sum(dim=1)
    torch.testing.assert_close(got1, brute[0], rtol=1e-5, atol=1e-9)
    assert bool((got < got1).any())


def test_shrink_factors_are_the_80_clean_candidates():
    assert len(SHRINK_FACTORS) == 80
    assert SHRINK_FACTORS[0] == 1.0 and SHRINK_FACTORS[-1] == pytest.approx(0.21)
    diffs = [a - b for a, b in zip(SHRINK_FACTORS[:-1], SHRINK_FACTORS[1:], strict=True)]
    assert all(d == pytest.approx(0.01) for d in diffs)


def test_storage_grid_hand_example():
    # asym 2 bits on [-1, 1]: scale = fp16(2/3) = 0.66650390625, zero = round(1.5004) = 2.
    w = torch.tensor([[-1.0, 0.0, 0.5, 1.0]])
    scale, zero = fit_scale_zero(w, 2, sym=False, clip_search=False)
    assert scale.item() == 0.66650390625 and zero.item() == 2.0
    assert quantize_codes(w, scale, zero, 2).tolist() == [[0, 2, 3, 3]]
    # sym 4 bits: scale = fp16(2 * 1.5 / 15) = fp16(0.2), zero = 8.
    w = torch.tensor([[-0.7, 0.3, 1.5]])
    scale, zero = fit_scale_zero(w, 4, sym=True, clip_search=False)
    assert scale.item() == float(torch.tensor(0.2).half()) and zero.item() == 8.0
    assert quantize_codes(w, scale, zero, 4).tolist() == [[4, 10, 15]]


@pytest.mark.parametrize("sym", [False, True])
def test_degenerate_rows(sym):
    w = torch.zeros(3, 16)
    w[1] = 1e-12  # underflows fp16: the scale must still be positive and finite
    w[2, 5] = -3.0
    for bits in BITS:
        scale, zero = fit_scale_zero(w, bits, sym)
        fq = fake_quantize(w, scale, zero, bits)
        assert torch.isfinite(scale).all() and bool((scale > 0).all())
        assert not torch.isnan(fq).any()
        assert bool((fq[0] == 0).all())
        assert fq[2, 5].item() < -2.0  # the single value is still represented roughly


def test_check_bits():
    for b in BITS:
        check_bits(b)
    with pytest.raises(ValueError, match="2, 3, 4, 8"):
        check_bits(5)
    with pytest.raises(ValueError):
        fit_scale_zero(torch.ones(2, 2), 5, sym=False)


def test_paper_grid_two_bits_has_four_levels():
    w = torch.linspace(-3, 3, 101).reshape(1, -1)
    assert paper_step(w, 2, search=False).item() == pytest.approx(3.0)  # at 2 bits delta = alpha
    delta = torch.tensor([[0.5]])
    levels = torch.unique(paper_quantize(w, delta, 2) / delta)
    assert levels.tolist() == [-2.0, -1.0, 0.0, 1.0]
    # The clipping search uses the -2 delta level: a row of mostly large negative values.
    w = torch.tensor([[-1.0, -1.0, -1.0, -0.5, 0.1]])
    delta = paper_step(w, 2)
    assert (paper_quantize(w, delta, 2) / delta).min().item() == -2.0


def test_paper_grid_hand_example():
    # 3 bits, alpha = 1: delta = 1/3, q in [-4, 3].
    w = torch.tensor([[1.0, -0.5, 0.25, 0.0, -1.0]])
    delta = paper_step(w, 3, search=False)
    assert delta.item() == pytest.approx(1 / 3)
    q = paper_quantize(w, delta, 3) / delta
    torch.testing.assert_close(q, torch.tensor([[3.0, -2.0, 1.0, 0.0, -3.0]]))


@pytest.mark.parametrize("bits", BITS)
def test_paper_step_search_is_least_error(bits):
    w = _weights(rows=10, cols=48, seed=3)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    amax = w.abs().amax(dim=1, keepdim=True)
    errs = []
    for p in SHRINK_FACTORS:
        d = p * amax / (2 ** (bits - 1) - 1)
        errs.append((d * torch.clamp(torch.round(w / d), qmin, qmax) - w).pow(2).sum(dim=1))
    brute = torch.stack(errs)
    delta = paper_step(w, bits, search=True)
    got = (paper_quantize(w, delta, bits) - w).pow(2).sum(dim=1)
    torch.testing.assert_close(got, brute.min(dim=0).values, rtol=1e-5, atol=1e-9)
    alpha = delta * (2 ** (bits - 1) - 1)
    assert bool((alpha <= amax * (1 + 1e-6)).all()) and bool((alpha >= 0.21 * amax * (1 - 1e-6)).all())
    if bits < 8:
        assert bool((got < brute[0]).any())


def test_paper_step_zero_row_is_finite():
    delta = paper_step(torch.zeros(2, 5), 4)
    assert torch.equal(delta, torch.ones(2, 1))
    assert not math.isnan(paper_quantize(torch.zeros(2, 5), delta, 4).sum().item())
