from dataclasses import dataclass

import pytest
import torch

from quikft.nn import (
    QuikLinear,
    available_kernels,
    register_kernel,
    select_kernel,
    unregister_kernel,
)

BITS = (2, 3, 4, 8)
IN, OUT, GROUP = 100, 24, 16


@dataclass
class Quantized:
    """Synthetic quantizer output honouring the contract QuikLinear builds on."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    salient: torch.Tensor
    salient_weight: torch.Tensor
    bias: torch.Tensor | None
    bits: int

    def base(self) -> torch.Tensor:
        g = self.g_idx.long()
        return (self.codes.float() - self.zeros[:, g]) * self.scales[:, g]

    def fake_quant(self) -> torch.Tensor:
        weight = self.base()
        weight[:, self.salient] = self.salient_weight
        return weight

    def layer(self, **kwargs: object) -> QuikLinear:
        return QuikLinear.from_quantized(
            self.codes,
            self.scales,
            self.zeros,
            self.g_idx,
            self.salient,
            self.salient_weight,
            self.bias,
            self.bits,
            GROUP,
            **kwargs,
        )


def make_quantized(bits: int, k: int, bias: bool, seed: int = 0) -> Quantized:
    gen = torch.Generator().manual_seed(seed)
    salient = torch.randperm(IN, generator=gen)[:k].sort().values
    rest = torch.tensor([c for c in range(IN) if c not in set(salient.tolist())])
    # Groups over a random order of the non-salient columns, as act-order
    # produces: g_idx is not monotone in the original column order.
    order = rest[torch.randperm(rest.numel(), generator=gen)]
    n_groups = -(-rest.numel() // GROUP)
    g_idx = torch.zeros(IN, dtype=torch.int32)
    g_idx[order] = (torch.arange(order.numel()) // GROUP).int()
    g_idx[salient] = torch.randint(0, n_groups, (k,), generator=gen, dtype=torch.int32)

    top = (1 << bits) - 1
    scales = (torch.rand(OUT, n_groups, generator=gen) * 0.02 / top + 1e-3).half().float()
    zeros = torch.randint(0, top + 1, (OUT, n_groups), generator=gen).float()
    codes = torch.randint(0, top + 1, (OUT, IN), generator=gen, dtype=torch.uint8)
    codes[0, rest[0]] = top  # full code range, whatever the draw
    codes[:, salient] = zeros[:, g_idx[salient].long()].to(torch.uint8)
    salient_weight = torch.randn(OUT, k, generator=gen).half().float()
    bias_t = torch.randn(OUT, generator=gen) if bias else None
    return Quantized(codes, scales, zeros, g_idx, salient, salient_weight, bias_t, bits)


def reference_forward(q: Quantized, x: torch.Tensor) -> torch.Tensor:
    y = x.double() @ q.fake_quant().double().T
    return (y if q.bias is None else y + q.bias.double()).float()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", [0, 6])
@pytest.mark.parametrize("bias", [False, True])
def test_dequant_and_forward_fp32(bits: int, k: int, bias: bool) -> None:
    q = make_quantized(bits, k, bias, seed=bits * 10 + k)
    layer = q.layer()
    assert torch.equal(layer.dequantize_weight(), q.base())
    assert torch.equal(layer.effective_weight(), q.fake_quant())
    x = torch.randn(2, 5, IN)
    y = layer(x)
    assert y.shape == (2, 5, OUT) and y.dtype == torch.float32
    torch.testing.assert_close(y, reference_forward(q, x), rtol=1e-5, atol=1e-5)


def test_salient_columns_matter() -> None:
    # Guards against a forward that drops the salient GEMM: with k > 0 the
    # output must differ from the base-only product.
    q = make_quantized(4, 6, bias=False)
    x = torch.randn(3, IN)
    base_only = x @ q.base().T
    assert (q.layer()(x) - base_only).abs().max() > 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input(dtype: torch.dtype) -> None:
    q = make_quantized(3, 6, bias=True)
    layer = q.layer()
    x = torch.randn(4, IN)
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    ref = reference_forward(q, x.to(dtype).float())
    assert ((y.float() - ref).norm() / ref.norm()).item() < 2e-2


def test_dequant_cache() -> None:
    q = make_quantized(3, 6, bias=True)
    plain, cached = q.layer(), q.layer(cache_dequantized=True)
    x = torch.randn(3, IN)
    expected = plain(x)
    assert cached._cache is None
    assert torch.equal(cached(x), expected)
    first = cached._cache
    assert first is not None and first[0] == (torch.float32, torch.device("cpu"))
    assert torch.equal(cached(x), expected)
    assert cached._cache[1] is first[1]  # reused, not rebuilt
    cached(x.bfloat16())  # another dtype replaces the entry
    assert cached._cache[0][0] == torch.bfloat16
    cached.to("cpu")
    assert cached._cache is None
    with torch.inference_mode():
        cached(x)
    assert not cached._cache[1].is_inference()


def test_to_dtype_keeps_stored_precision() -> None:
    q = make_quantized(3, 6, bias=True)
    layer = q.layer()
    x = torch.randn(3, IN)
    expected = layer(x)
    layer.to(torch.bfloat16)
    layer.half()
    assert layer.scales.dtype == torch.float16
    assert layer.salient_weight.dtype == torch.float16
    assert layer.bias.dtype == torch.float32
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("bias", [False, True])
def test_state_dict_roundtrip(bias: bool) -> None:
    q = make_quantized(3, 6, bias=bias)
    layer = q.layer()
    n_groups = q.scales.shape[1]
    fresh = QuikLinear.empty(IN, OUT, 3, GROUP, 6, n_groups, bias, cache_dequantized=True)
    x = torch.randn(3, IN)
    fresh(x)  # populate the cache, which loading must invalidate
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh(x), layer(x))
    state = layer.state_dict()
    assert state["qweight"].dtype == torch.int32 and state["qzeros"].dtype == torch.int32
    assert state["scales"].shape == (n_groups, OUT) and state["scales"].dtype == torch.float16
    assert state["g_idx"].dtype == torch.int32 and state["salient_idx"].dtype == torch.int32
    assert ("bias" in state) == bias


def test_extra_repr() -> None:
    text = repr(make_quantized(2, 6, bias=False).layer())
    assert "bits=2" in text and "k=6" in text and f"group_size={GROUP}" in text


def test_rejects_non_fp16_exact_scales() -> None:
    q = make_quantized(4, 6, bias=False)
    q.scales = q.scales + 1e-6
    with pytest.raises(ValueError, match="float16"):
        q.layer()


def test_kernel_registry_dispatch() -> None:
    q = make_quantized(4, 6, bias=False)
    layer = q.layer()
    x = torch.randn(2, IN)
    calls = []

    def fake_kernel(lay: QuikLinear, inp: torch.Tensor) -> torch.Tensor:
        calls.append(inp.shape)
        return torch.zeros(*inp.shape[:-1], lay.out_features)

    register_kernel("fake", fake_kernel, lambda lay, inp: inp.shape[0] == 2, priority=10)
    try:
        assert available_kernels()[0] == "fake"
        assert torch.equal(layer(x), torch.zeros(2, OUT))
        assert select_kernel(layer, torch.randn(3, IN)).name == "torch"
        layer.kernel = "torch"
        torch.testing.assert_close(layer(x), reference_forward(q, x), rtol=1e-5, atol=1e-5)
        assert len(calls) == 1
        with pytest.raises(ValueError):
            register_kernel("fake", fake_kernel)
    finally:
        unregister_kernel("fake")
    assert "fake" not in available_kernels()
