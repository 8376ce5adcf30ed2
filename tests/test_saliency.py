"""Tests of streamed column statistics, the (tau, rho, gamma) metric and top-k selection."""

import math

import pytest
import torch

from quikft.quant.saliency import (
    PRESETS,
    ColumnStats,
    MetricSpec,
    column_scores,
    resolve_metric,
    select_salient,
)

pytestmark = pytest.mark.usefixtures("single_thread")


# A tiny layer with explicit numbers: 2 output rows, 4 input columns.
W = torch.tensor([[0.9, -0.2, 0.05, 0.4], [-0.3, 0.6, -1.2, 0.1]])
X = torch.tensor([[1.0, -2.0, 0.5, 0.0], [-3.0, 1.0, 0.5, 0.25], [0.5, 0.0, -0.5, 4.0]])


def paper_residual(w: torch.Tensor, bits: int) -> torch.Tensor:
    """D = W - Q(W) on the paper's signed grid, one row at a time with plain Python numbers."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    rows = []
    for row in w.tolist():
        amax = max(abs(v) for v in row)
        best = None
        for i in range(80):
            delta = (100 - i) / 100 * amax / qmax
            q = [delta * min(max(round(v / delta), qmin), qmax) for v in row]
            err = sum((v - u) ** 2 for v, u in zip(row, q, strict=True))
            if best is None or err < best[0] - 1e-12:
                best = (err, [v - u for v, u in zip(row, q, strict=True)])
        rows.append(best[1])
    return torch.tensor(rows)


def stats_of(x: torch.Tensor) -> ColumnStats:
    stats = ColumnStats(x.shape[-1])
    stats.update(x)
    return stats


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_presets_match_hand_computed_scores(bits):
    d = paper_residual(W, bits).abs()
    x_inf = torch.tensor([3.0, 2.0, 0.5, 4.0])
    x_2sq = torch.tensor([1 + 9 + 0.25, 4 + 1 + 0, 0.25 + 0.25 + 0.25, 0 + 0.0625 + 16])
    expected = {
        "gift": d.amax(dim=0) * x_inf,
        "quik": x_inf,
        "owq": d.pow(2).sum(dim=0) * x_2sq,
        "wanda": d.sum(dim=0) * x_2sq.sqrt(),
    }
    stats = stats_of(X)
    for name, want in expected.items():
        got = column_scores(W, stats, PRESETS[name], bits)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)


def test_hand_residual_sanity():
    # 2 bits, row [1, -2, 0, -1]: p = 1 gives delta = 2 and error 1 + 1 (both +-1 round
    # to 0); p = 0.5 gives delta = 1 and the levels {-2, -1, 0, 1} hold the row exactly.
    w = torch.tensor([[1.0, -2.0, 0.0, -1.0]])
    assert paper_residual(w, 2).abs().max().item() == 0.0
    stats = stats_of(torch.ones(2, 4))
    assert column_scores(w, stats, PRESETS["gift"], 2).abs().max().item() == 0.0
    # At 3 bits it is exact with delta = 0.5 (p = 0.75): -2 is the lowest level, -4 delta.
    assert paper_residual(w, 3).abs().max().item() < 1e-6


def test_free_metric_with_gamma_and_tau():
    spec = resolve_metric(None, tau=2, rho="inf", gamma=0.5)
    assert spec == MetricSpec(tau=2.0, rho=math.inf, gamma=0.5)
    d = paper_residual(W, 4)
    want = d.norm(dim=0) * torch.tensor([3.0, 2.0, 0.5, 4.0]).sqrt()
    torch.testing.assert_close(column_scores(W, stats_of(X), spec, 4), want, rtol=1e-5, atol=1e-7)


def test_quik_ignores_weights():
    stats = stats_of(X)
    a = column_scores(W, stats, PRESETS["quik"], 3)
    b = column_scores(torch.randn(7, 4), stats, PRESETS["quik"], 3)
    assert torch.equal(a, b)
    assert not torch.equal(
        column_scores(W, stats, PRESETS["gift"], 3), column_scores(2 * W, stats, PRESETS["gift"], 3)
    )


def test_streamed_stats_equal_concatenation():
    g = torch.Generator().manual_seed(0)
    batches = [
        torch.randn(2, 7, 16, generator=g),
        torch.randn(5, 16, generator=g),
        torch.randn(1, 3, 16, generator=g) * 9,
    ]
    streamed = ColumnStats(16)
    for xb in batches:
        streamed.update(xb)
    whole = stats_of(torch.cat([xb.reshape(-1, 16) for xb in batches]))
    assert streamed.n_tokens == whole.n_tokens == 22
    for rho in (1, 2, math.inf):
        torch.testing.assert_close(streamed.norm(rho), whole.norm(rho))
    allx = torch.cat([xb.reshape(-1, 16) for xb in batches])
    torch.testing.assert_close(streamed.norm(2), allx.norm(dim=0))
    torch.testing.assert_close(streamed.norm(math.inf), allx.abs().amax(dim=0))
    torch.testing.assert_close(streamed.norm(1), allx.abs().sum(dim=0))


def test_empty_batches_are_ignored():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 8, generator=g)
    stats = ColumnStats(8)
    stats.update(x)
    stats.update(x[:, :0])
    assert stats.n_tokens == 15
    for rho in (1, 2, math.inf):
        torch.testing.assert_close(stats.norm(rho), stats_of(x.reshape(-1, 8)).norm(rho))


def test_select_salient():
    scores = torch.tensor([0.5, 3.0, -1.0, 2.0, 10.0, 0.1])
    idx = select_salient(scores, 3)
    assert idx.tolist() == [1, 3, 4]
    assert idx.dtype == torch.int64
    assert select_salient(scores, 0).numel() == 0
    assert select_salient(scores, 0).dtype == torch.int64
    assert select_salient(scores, 100).tolist() == list(range(6))


def test_gift_picks_columns_with_error_and_activation_outliers():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 64, generator=g) * 0.02
    x = torch.randn(256, 64, generator=g)
    x[:, 10] *= 50  # activation outlier channel
    w[:, 20] = 0.013  # column off the grid, but tiny activations
    x[:, 20] *= 0.01
    stats = stats_of(x)
    gift = select_salient(column_scores(w, stats, PRESETS["gift"], 3), 4)
    assert 10 in gift.tolist() and 20 not in gift.tolist()


def test_resolve_metric():
    assert resolve_metric() == PRESETS["gift"]
    assert resolve_metric("OWQ") == MetricSpec(2.0, 2.0, 2.0, d_power=2.0)
    assert resolve_metric("wanda") == MetricSpec(1.0, 2.0, 1.0)
    assert resolve_metric("quik").tau is None
    assert resolve_metric("gift", gamma=2).gamma == 2.0
    with pytest.raises(ValueError, match="gift, quik, owq, wanda"):
        resolve_metric("magnitude")
    with pytest.raises(ValueError, match="rho"):
        resolve_metric(None, tau=1)
    with pytest.raises(ValueError, match="rho"):
        MetricSpec(tau=1.0, rho=3.0, gamma=1.0)
    with pytest.raises(ValueError):
        ColumnStats(4).norm(2)
