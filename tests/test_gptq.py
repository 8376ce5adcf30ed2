"""Tests of Hessian accumulation, salient-last GPTQ and RTN."""

import pytest
import torch

from quikft.quant.gptq import (
    HessianAccumulator,
    HessianNotPositiveDefiniteError,
    gptq_quantize,
    rtn_quantize,
)
from quikft.quant.grid import fake_quantize, fit_scale_zero
from quikft.quant.scheme import QuantScheme

pytestmark = pytest.mark.usefixtures("single_thread")


def make_layer(out: int = 48, inp: int = 96, tokens: int = 384, seed: int = 0):
    """An LLM-like layer: outlier weight columns, correlated inputs, a few huge channels."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.02
    w[:, torch.randperm(inp, generator=g)[:3]] *= 8
    latent = torch.randn(tokens, inp // 4, generator=g)
    mix = torch.randn(inp // 4, inp, generator=g)
    x = latent @ mix / 3 + 0.3 * torch.randn(tokens, inp, generator=g)
    x[:, torch.randperm(inp, generator=g)[:4]] *= 20
    acc = HessianAccumulator(inp)
    acc.add_batch(x)
    return w, x, acc.hessian()


def out_err(x, w, w_hat) -> float:
    return (x @ w.T - x @ w_hat.T).norm().item()


def reference_gptq(w, h, salient, bits, group_size, sym, act_order, percdamp=0.01):
    """Straightforward column-by-column GPTQ (no blocks, no lazy updates), salient columns last."""
    w, h = w.clone().float(), h.clone().float()
    n = w.shape[1]
    sal = sorted(int(j) for j in salient)
    dead = [j for j in range(n) if h[j, j] == 0]
    for j in dead:
        h[j, j] = 1.0
        if j not in sal:
            w[:, j] = 0.0
    rest = [j for j in range(n) if j not in sal]
    if act_order:
        rest = sorted(rest, key=lambda j: -h[j, j].item())  # sorted() is stable, like the module
    perm = torch.tensor(rest + sal)
    w, h = w[:, perm], h[perm][:, perm]
    h += percdamp * h.diagonal().mean() * torch.eye(n)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    m = len(rest)
    for i in range(m):
        if (group_size > 0 and i % group_size == 0) or (group_size <= 0 and i == 0):
            end = m if group_size <= 0 else min(i + group_size, m)
            scale, zero = fit_scale_zero(w[:, i:end], bits, sym)
        q = fake_quantize(w[:, i : i + 1], scale, zero, bits)[:, 0]
        err = (w[:, i] - q) / u[i, i]
        w[:, i:] -= err[:, None] * u[i, i:][None, :]
        w[:, i] = q
    result = torch.empty_like(w)
    result[:, perm] = w
    return result


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_beats_rtn_on_output_error(bits, group_size, act_order):
    w, x, h = make_layer()
    for k in (0, 6):
        sal = torch.arange(k) * 7
        scheme = QuantScheme(bits, group_size=group_size, act_order=act_order, block_size=16)
        g = gptq_quantize(w, h, sal, scheme)
        r = rtn_quantize(w, sal, QuantScheme(bits, group_size=group_size), hessian=h)
        assert out_err(x, w, g.weight) < 0.9 * out_err(x, w, r.weight)
        assert g.loss < r.loss
        # loss is ||X dW^T||^2 / n, the mean squared output error
        assert g.loss == pytest.approx(out_err(x, w, g.weight) ** 2 / x.shape[0], rel=1e-3)


@pytest.mark.parametrize("k", [0, 10])
@pytest.mark.parametrize("act_order", [True, False])
def test_matches_reference_gptq(k, act_order):
    # block_size 20 with group_size 32: groups start inside blocks, so this also checks
    # that groups are fitted on the current, error-updated weights.
    w, x, h = make_layer(seed=1)
    sal = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(5))[:k]
    res = gptq_quantize(w, h, sal, QuantScheme(3, group_size=32, act_order=act_order, block_size=20))
    ref = reference_gptq(w, h, sal, 3, 32, False, act_order)
    close = torch.isclose(res.weight, ref, rtol=1e-3, atol=1e-5)
    assert close.float().mean() > 0.995  # float32 order differences may flip a rare rounding
    assert out_err(x, w, res.weight) == pytest.approx(out_err(x, w, ref), rel=2e-3)
    if k:
        s = res.salient
        torch.testing.assert_close(res.salient_weight, ref[:, s].half().float(), rtol=2e-3, atol=1e-4)


def test_salient_columns_absorb_error_and_are_not_rounded():
    w, x, h = make_layer(seed=2)
    sal = torch.tensor([40, 3, 77, 12, 12])  # unsorted with a duplicate: normalised
    res = gptq_quantize(w, h, sal, QuantScheme(3, group_size=32))
    assert res.salient.tolist() == [3, 12, 40, 77]
    assert res.salient.dtype == torch.int64
    sw = res.salient_weight
    assert torch.equal(sw, res.weight[:, res.salient])
    assert torch.equal(sw, sw.half().float())
    # They absorbed error: GPTQ-updated, not the original values.
    assert (sw - w[:, res.salient]).abs().max() > 1e-3
    # Never rounded: mostly off the grid of their group.
    g = res.g_idx[res.salient].long()
    on_grid = fake_quantize(sw, res.scales[:, g], res.zeros[:, g], 3) == sw
    assert on_grid.float().mean() < 0.2
    # RTN keeps the originals, rounded to fp16.
    rtn = rtn_quantize(w, sal, QuantScheme(3, group_size=32))
    assert torch.equal(rtn.salient_weight, w[:, rtn.salient].half().float())


@pytest.mark.parametrize("method", ["gptq", "rtn"])
@pytest.mark.parametrize("sym", [False, True])
def test_invariant_base_plus_salient_is_weight(method, sym):
    w, x, h = make_layer(seed=3)
    sal = torch.tensor([0, 5, 50, 95])
    if method == "gptq":
        res = gptq_quantize(w, h, sal, QuantScheme(4, group_size=32, sym=sym))
    else:
        res = rtn_quantize(w, sal, QuantScheme(4, group_size=32, sym=sym))
    base = res.dequantized_base()
    assert bool((base[:, sal] == 0).all())
    rebuilt = base.clone()
    rebuilt[:, res.salient] = res.salient_weight
    assert torch.equal(rebuilt, res.weight)
    assert res.codes.dtype == torch.uint8 and res.g_idx.dtype == torch.int32
    assert torch.equal(res.scales, res.scales.half().float())
    assert torch.equal(res.zeros, res.zeros.round())
    assert torch.equal(res.codes[:, sal].float(), res.zeros[:, res.g_idx[sal].long()])
    if sym:
        assert bool((res.zeros == 8).all())


@pytest.mark.parametrize("k", [0, 64])
@pytest.mark.parametrize("act_order", [True, False])
def test_576_inputs_group_128(k, act_order):
    w, x, h = make_layer(out=16, inp=576, tokens=1024, seed=4)
    sal = torch.arange(k) * 9
    res = gptq_quantize(w, h, sal, QuantScheme(4, group_size=128, act_order=act_order))
    expected_groups = 5 if k == 0 else 4  # 576 -> 4 full + one of 64; 512 -> 4 full
    assert res.scales.shape == res.zeros.shape == (16, expected_groups)
    g = res.g_idx.long()
    assert bool((g >= 0).all()) and bool((g < expected_groups).all())
    ns = torch.ones(576, dtype=torch.bool)
    ns[sal] = False
    counts = torch.bincount(g[ns], minlength=expected_groups).tolist()
    assert counts == ([128] * 4 + [64] if k == 0 else [128] * 4)
    if k == 0 and not act_order:
        assert torch.equal(g, torch.arange(576) // 128)
    if not act_order:  # groups are consecutive in natural order, salient columns included
        assert bool((g[1:] >= g[:-1]).all())


def test_in_features_not_multiple_of_group_and_rtn_groups():
    w, x, h = make_layer(out=8, inp=100, tokens=256, seed=5)
    res = gptq_quantize(w, h, torch.tensor([], dtype=torch.int64), QuantScheme(3, group_size=32,
                                                                                act_order=False))
    assert res.scales.shape == (8, 4)
    assert torch.bincount(res.g_idx.long()).tolist() == [32, 32, 32, 4]
    sal = torch.tensor([1, 2, 99])
    rtn = rtn_quantize(w, sal, QuantScheme(3, group_size=32))
    ns = torch.tensor([j for j in range(100) if j not in (1, 2, 99)])
    for grp in range(rtn.scales.shape[1]):  # groups: consecutive non-salient columns
        cols = ns[grp * 32 : (grp + 1) * 32]
        scale, zero = fit_scale_zero(w[:, cols], 3, False)
        assert torch.equal(rtn.weight[:, cols], fake_quantize(w[:, cols], scale, zero, 3))
    assert rtn.loss == pytest.approx((rtn.weight - w).pow(2).mean().item())


def test_dead_columns_zeroed_only_when_not_salient():
    w, x, _ = make_layer(seed=6)
    x[:, [7, 30]] = 0.0
    acc = HessianAccumulator(x.shape[1])
    acc.add_batch(x)
    h = acc.hessian()
    res = gptq_quantize(w, h, torch.tensor([30, 60]), QuantScheme(3, group_size=32))
    assert bool((res.weight[:, 7] == 0).all())
    assert torch.equal(res.weight[:, 30], w[:, 30].half().float())  # dead but salient: kept as is
    assert torch.isfinite(res.weight).all()


def test_deterministic():
    w, x, h = make_layer(seed=7)
    sal = torch.tensor([2, 9, 31])
    a = gptq_quantize(w, h, sal, QuantScheme(3, group_size=32))
    b = gptq_quantize(w, h, sal, QuantScheme(3, group_size=32))
    for name in ("weight", "codes", "scales", "zeros", "g_idx", "salient", "salient_weight"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.loss == b.loss


def test_cholesky_retry_with_more_damping():
    w, x, h = make_layer(seed=8)
    evals, evecs = torch.linalg.eigh(h.double())
    u = evecs[:, :1]
    # Push the smallest eigenvalue to -5% of mean(diag): 1% damping fails, 10% works.
    target = -0.05 * h.diagonal().mean().item()
    bad = (h.double() + (target - evals[0]) * (u @ u.T)).float()
    with pytest.warns(RuntimeWarning, match="damping"):
        res = gptq_quantize(w, bad, torch.tensor([1]), QuantScheme(4, group_size=32))
    assert torch.isfinite(res.weight).all()
    assert out_err(x, w, res.weight) < out_err(x, w, torch.zeros_like(w))


def test_cholesky_gives_up_with_clear_error():
    w = torch.randn(4, 4)
    hopeless = torch.diag(torch.tensor([1000.0, 1000.0, 1000.0, -2990.0]))
    with pytest.raises(HessianNotPositiveDefiniteError, match="Cholesky"):
        gptq_quantize(w, hopeless, torch.tensor([], dtype=torch.int64), QuantScheme(4, group_size=-1))
    with pytest.raises(HessianNotPositiveDefiniteError):
        gptq_quantize(w, torch.full((4, 4), float("nan")), torch.tensor([0]), QuantScheme(4, group_size=-1))


def test_argument_checks():
    w, x, h = make_layer(out=4, inp=8, tokens=32)
    with pytest.raises(ValueError, match="smaller than in_features"):
        gptq_quantize(w, h, torch.arange(8), QuantScheme(4))
    with pytest.raises(ValueError, match="bits"):
        rtn_quantize(w, torch.tensor([0]), QuantScheme(5))
    with pytest.raises(ValueError, match="salient"):
        rtn_quantize(w, torch.tensor([8]), QuantScheme(4))
    with pytest.raises(ValueError, match="group_size"):
        rtn_quantize(w, torch.tensor([0]), QuantScheme(4, group_size=0))


def test_hessian_accumulator_streams():
    g = torch.Generator().manual_seed(9)
    batches = [torch.randn(2, 5, 6, generator=g), torch.randn(3, 4, 6, generator=g), torch.randn(0, 4, 6)]
    acc = HessianAccumulator(6)
    for xb in batches:
        acc.add_batch(xb)
    valid = torch.cat([xb.reshape(-1, 6) for xb in batches]).double()
    expected = (2 / valid.shape[0] * valid.T @ valid).float()
    assert acc.n_tokens == valid.shape[0]
    torch.testing.assert_close(acc.hessian(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError):
        HessianAccumulator(6).hessian()
