import math
from dataclasses import dataclass

import pytest
import torch

from quikft.nn import (
    KernelState,
    PackedShape,
    QuikKernel,
    QuikLinear,
    Refusal,
    available_kernels,
    nonsalient_columns,
    register_kernel,
    select_kernel,
    torch_kernel,
    unregister_kernel,
)
from quikft.packing import unpack_codes
from quikft.quant.gptq import gptq_quantize, rtn_quantize
from quikft.quant.scheme import QuantScheme

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
    group_size: int = GROUP

    def base(self) -> torch.Tensor:
        g = self.g_idx.long()
        return (self.codes.float() - self.zeros[:, g]) * self.scales[:, g]

    def fake_quant(self) -> torch.Tensor:
        weight = self.base()
        weight[:, self.salient] = self.salient_weight
        return weight

    def layer(self, **kwargs: object) -> QuikLinear:
        """The packed layer, running the exact reference kernel unless ``kernel`` says otherwise (the
        measured choice may take a faster kernel of lower activation precision)."""
        kwargs.setdefault("kernel", "torch")
        return QuikLinear.from_quantized(self, self.bias, **kwargs)


def make_quantized(bits: int, k: int, bias: bool, seed: int = 0, shape: tuple[int, int] = (OUT, IN),
                   group_size: int = GROUP) -> Quantized:
    out_features, in_features = shape
    gen = torch.Generator().manual_seed(seed)
    salient = torch.randperm(in_features, generator=gen)[:k].sort().values
    rest = nonsalient_columns(in_features, salient)
    # Groups over a random order of the non-salient columns, as act-order
    # produces: g_idx is not monotone in the original column order.
    order = rest[torch.randperm(rest.numel(), generator=gen)]
    n_groups = -(-rest.numel() // group_size)
    g_idx = torch.zeros(in_features, dtype=torch.int32)
    g_idx[order] = (torch.arange(order.numel()) // group_size).int()
    g_idx[salient] = torch.randint(0, n_groups, (k,), generator=gen, dtype=torch.int32)

    top = (1 << bits) - 1
    scales = (torch.rand(out_features, n_groups, generator=gen) * 0.02 / top + 1e-3).half().float()
    zeros = torch.randint(0, top + 1, (out_features, n_groups), generator=gen).float()
    codes = torch.randint(0, top + 1, (out_features, in_features), generator=gen, dtype=torch.uint8)
    codes[0, rest[0]] = top  # full code range, whatever the draw
    codes[:, salient] = zeros[:, g_idx[salient].long()].to(torch.uint8)
    salient_weight = torch.randn(out_features, k, generator=gen).half().float()
    bias_t = torch.randn(out_features, generator=gen) if bias else None
    return Quantized(codes, scales, zeros, g_idx, salient, salient_weight, bias_t, bits, group_size)


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


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", [0, 6])
def test_only_non_salient_columns_are_packed_group_contiguous(bits: int, k: int) -> None:
    q = make_quantized(bits, k, bias=False, seed=bits + k)
    layer = q.layer()
    keep = nonsalient_columns(IN, q.salient)
    assert keep.numel() == IN - k and bool((keep.diff() > 0).all())
    assert layer.qweight.shape == (math.ceil((IN - k) * bits / 32), OUT)
    perm = layer.perm.long()
    # perm and salient_idx partition the input columns
    assert torch.equal(torch.sort(torch.cat([perm, q.salient])).values, torch.arange(IN))
    # every group is one run of stored columns, ascending columns inside a group
    assert torch.equal(layer.g_idx, q.g_idx[perm])
    assert bool((layer.g_idx.diff() >= 0).all())
    same_group = layer.g_idx[1:] == layer.g_idx[:-1]
    assert bool((perm.diff()[same_group] > 0).all())
    # GPTQ bit stream along the input dimension, in storage order
    assert torch.equal(unpack_codes(layer.qweight, bits, IN - k), q.codes[:, perm])
    assert torch.equal(layer.codes(), q.codes[:, perm])
    assert set(layer.state_dict()) == {"qweight", "qzeros", "scales", "g_idx", "perm", "salient_idx",
                                       "salient_weight"}


@pytest.mark.parametrize("method", ["gptq", "rtn"])
@pytest.mark.parametrize("k", [0, 9])
def test_matches_the_quantizer_bit_for_bit(method: str, k: int) -> None:
    gen = torch.Generator().manual_seed(k)
    weight = torch.randn(OUT, IN, generator=gen)
    salient = torch.randperm(IN, generator=gen)[:k]
    if method == "gptq":
        x = torch.randn(256, IN, generator=gen)
        result = gptq_quantize(weight, 2 * x.T @ x / 256, salient,
                               QuantScheme(3, group_size=GROUP, act_order=True))
    else:
        result = rtn_quantize(weight, salient, QuantScheme(3, group_size=GROUP))
    layer = QuikLinear.from_quantized(result, kernel="torch")
    assert torch.equal(layer.dequantize_weight(), result.dequantized_base())
    assert torch.equal(layer.effective_weight(), result.weight)
    inputs = torch.randn(2, 7, IN, generator=gen)
    expected = (inputs.double() @ result.weight.double().T).float()
    torch.testing.assert_close(layer(inputs), expected, rtol=1e-5, atol=1e-5)


def test_rejects_salient_codes_that_do_not_decode_to_zero() -> None:
    q = make_quantized(4, 6, bias=False)
    column = int(q.salient[0])
    q.codes[:, column] = (q.codes[:, column] + 1) % 16
    with pytest.raises(ValueError, match="zero-point"):
        q.layer()


# The default model's linear shapes (out, in) and how often each occurs per block.
DEFAULT_MODEL_SHAPES = {(576, 576): 2, (192, 576): 2, (1536, 576): 2, (576, 1536): 1}


def limit_bits(out_features: int, in_features: int, k: int, n_groups: int, bits: int) -> int:
    """Information content: b bits per quantized and 16 per salient weight, fp16 scale and b-bit zero per group."""
    return out_features * (bits * (in_features - k) + 16 * k + n_groups * (16 + bits))


def test_packed_size_within_five_percent_of_the_limit() -> None:
    """3 bits, k = 128, group size 128 on the default model's shapes: at most 5% over the limit."""
    packed_total = limit_total = 0
    for (out_features, in_features), count in DEFAULT_MODEL_SHAPES.items():
        q = make_quantized(3, 128, bias=False, shape=(out_features, in_features), group_size=128)
        # every stored tensor, the index tensors (g_idx, perm, salient_idx) included
        packed = sum(t.numel() * t.element_size() for t in q.layer().state_dict().values())
        limit = limit_bits(out_features, in_features, 128, q.scales.shape[1], 3) / 8
        assert packed <= 1.05 * limit, (out_features, in_features, packed / limit)
        packed_total += count * packed
        limit_total += count * limit
    assert packed_total <= 1.05 * limit_total


@pytest.mark.parametrize("form", ["split", "full"])
@pytest.mark.parametrize("k", [0, 6])
def test_both_forward_forms(monkeypatch: pytest.MonkeyPatch, form: str, k: int) -> None:
    # Force one form whatever the input length; the default picks by token count.
    monkeypatch.setattr(torch_kernel, "FULL_WEIGHT_MIN_TOKENS", 0 if form == "full" else 1 << 30)
    q = make_quantized(3, k, bias=True, seed=k)
    layer = q.layer()
    x = torch.randn(2, 5, IN, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, reference_forward(q, x.detach()), rtol=1e-5, atol=1e-5)
    # Input gradients flow through either form (GIFT-SW trains around frozen layers).
    y.square().sum().backward()
    expected_grad = (2 * y.detach()) @ q.fake_quant()
    torch.testing.assert_close(x.grad, expected_grad, rtol=1e-5, atol=1e-4)


def test_long_inputs_use_one_full_weight_gemm() -> None:
    q = make_quantized(4, 6, bias=False)
    layer = q.layer()
    x = torch.randn(2, torch_kernel.FULL_WEIGHT_MIN_TOKENS // 2, IN)
    expected = torch.nn.functional.linear(x, q.fake_quant())  # the same single GEMM
    assert torch.equal(layer(x), expected)
    torch.testing.assert_close(layer(x[:, :3]), expected[:, :3], rtol=1e-5, atol=1e-5)


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
    plain, cached = q.layer(), q.layer(cache_dequantized=True, kernel=None)
    x = torch.randn(3, IN)
    expected = plain(x)  # short input, uncached: the split form
    assert cached._cache is None
    torch.testing.assert_close(cached(x), expected, rtol=1e-6, atol=1e-6)
    first = cached._cache
    assert first is not None and first[0] == (torch.float32, torch.device("cpu"))
    assert torch.equal(cached(x), cached(x))
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
    layer = q.layer(cache_dequantized=True)
    n_groups = q.scales.shape[1]
    fresh = QuikLinear(PackedShape(IN, OUT, 3, GROUP, 6, n_groups, bias), cache_dequantized=True)
    x = torch.randn(3, IN)
    fresh(x)  # populate the cache and prepare a kernel, which loading must invalidate
    assert fresh.kernel_state is not None and fresh._cache is not None
    fresh.load_state_dict(layer.state_dict())
    assert fresh.kernel_state is None and fresh._cache is None
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
    layer = q.layer(kernel=None)
    x = torch.randn(2, IN)
    calls = []

    def forward(lay: QuikLinear, state: KernelState, inp: torch.Tensor) -> torch.Tensor:
        calls.append(inp.shape)
        return torch.zeros(*inp.shape[:-1], lay.out_features, dtype=inp.dtype)

    def check(layout, device, dtype):
        return None if dtype == torch.float64 else Refusal.scope("runs on float64 only")

    fake = QuikKernel("fake", check, lambda lay, device, dtype: KernelState(fake, device, dtype), forward,
                      priority=50)
    register_kernel(fake)
    try:
        assert available_kernels()[0] == "fake"
        assert torch.equal(layer(x.double()), torch.zeros(2, OUT, dtype=torch.float64))
        assert layer.kernel_name == "fake"  # accepted, and measured fastest: it computes nothing
        fake_calls = len(calls)  # the forward, after the measurement's timed calls
        # another dtype re-selects: the fake kernel refuses it, a kernel that accepts it runs
        y = layer(x)
        assert layer.kernel_name != "fake"
        reference = reference_forward(q, x)
        assert float((y - reference).norm() / reference.norm()) < 2e-2
        assert select_kernel(layer.layout(), "cpu", torch.float64).name == "fake"
        assert select_kernel(layer.layout(), "cpu", torch.float32).name != "fake"
        layer.kernel = "torch"
        torch.testing.assert_close(layer(x.double()).float(), reference_forward(q, x), rtol=1e-5, atol=1e-5)
        assert len(calls) == fake_calls  # the forced reference ran, not the fake
        layer.kernel = "fake"
        with pytest.raises(RuntimeError, match="runs on float64 only"):
            layer(x)
        with pytest.raises(ValueError):
            register_kernel(fake)
        # training through a frozen layer needs a differentiable kernel: the reference
        layer.kernel = None
        y = layer(x.double().requires_grad_())
        assert layer.kernel_name == "torch" and y.requires_grad
    finally:
        unregister_kernel("fake")
    assert "fake" not in available_kernels()
