"""The fast QuikLinear kernels against the reference: layout, exactness, memory, fallbacks."""

import warnings
from types import SimpleNamespace

import pytest
import torch

from quikft.nn import (
    PackedShape,
    QuikLinear,
    cpu_kernel,
    get_kernel,
    nonsalient_columns,
    prepare_for_inference,
    why_not,
)
from quikft.nn.kernels import LayerLayout, RefusalKind

CPU = torch.device("cpu")


def exact_layer(bits: int, k: int, shape: tuple[int, int], group_size: int, act_order: bool, bias: bool,
                seed: int = 0) -> QuikLinear:
    """A layer whose every number is exact in bf16: power-of-two scales, small integer zeros and
    salient weights in steps of 1/8. With inputs in steps of 1/4 every product and partial sum is
    exact in fp32, so a kernel can only differ from the exact result by the final rounding;
    a layout bug (wrong column, group or code) shows as an O(1) error."""
    out_features, in_features = shape
    gen = torch.Generator().manual_seed(seed)
    salient = torch.randperm(in_features, generator=gen)[:k].sort().values
    rest = nonsalient_columns(in_features, salient)
    order = rest[torch.randperm(rest.numel(), generator=gen)] if act_order else rest
    size = group_size if group_size > 0 else rest.numel()
    n_groups = -(-rest.numel() // size)
    g_idx = torch.zeros(in_features, dtype=torch.int32)
    g_idx[order] = (torch.arange(order.numel()) // size).int()
    top = (1 << bits) - 1
    scales = 2.0 ** -torch.randint(3, 7, (out_features, n_groups), generator=gen).float()
    zeros = torch.randint(0, top + 1, (out_features, n_groups), generator=gen).float()
    codes = torch.randint(0, top + 1, (out_features, in_features), generator=gen, dtype=torch.uint8)
    codes[:, salient] = zeros[:, g_idx[salient].long()].to(torch.uint8)
    salient_weight = torch.randint(-16, 17, (out_features, k), generator=gen).float() / 8
    bias_t = torch.randint(-8, 9, (out_features,), generator=gen).float() / 4 if bias else None
    quantized = SimpleNamespace(codes=codes, scales=scales, zeros=zeros, g_idx=g_idx, salient=salient,
                                salient_weight=salient_weight, bits=bits, group_size=group_size)
    return QuikLinear.from_quantized(quantized, bias_t)


def exact_input(rows: int, in_features: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 9, (rows, in_features), generator=gen).float() / 4


class Expected:
    """The exact product and the size of its partial sums (what bf16 rounding is relative to)."""

    def __init__(self, layer: QuikLinear, x: torch.Tensor) -> None:
        weight = layer.effective_weight().double()
        bias = layer.bias.double() if layer.bias is not None else torch.zeros(layer.out_features).double()
        self.value = x.double() @ weight.t() + bias
        self.magnitude = x.double().abs() @ weight.abs().t() + bias.abs()

    def view(self, *shape: int) -> "Expected":
        self.value, self.magnitude = self.value.view(*shape), self.magnitude.view(*shape)
        return self


def expected(layer: QuikLinear, x: torch.Tensor) -> Expected:
    return Expected(layer, x)


def assert_bf16_close(y: torch.Tensor, reference: Expected, ulps: int = 2) -> None:
    """Within a few bf16 roundings (8-bit significand) of the partial sums of the exact value; a wrong
    column, group or code gives an error of the order of the partial sums themselves."""
    assert y.dtype == torch.bfloat16
    excess = (y.double() - reference.value).abs() - ulps * 2.0**-8 * reference.magnitude
    assert float(excess.max()) <= 0, f"max excess {float(excess.max()):.4g}"


INT4_CASES = [  # bits, k, (out, in), group size, act-order
    (3, 7, (64, 160), 32, True),
    (2, 7, (64, 160), 64, False),
    (4, 0, (64, 160), 64, True),
    (3, 5, (24, 100), 32, True),  # out not a multiple of 16, last group 31 columns (zero-padded)
    (4, 9, (48, 300), 128, True),  # groups cut into sub-groups of 128 and a short last one
    (3, 6, (32, 96), -1, False),  # one group per row: 90 columns, cut into 32-column sub-groups
    (2, 3, (16, 67), 32, True),
]


@pytest.mark.parametrize("bits,k,shape,group_size,act_order", INT4_CASES)
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("bias", [False, True])
def test_cpu_int4_equals_the_exact_product(bits, k, shape, group_size, act_order, rows, bias):
    layer = exact_layer(bits, k, shape, group_size, act_order, bias, seed=bits + k)
    layer.kernel = "cpu-int4"
    x = exact_input(rows, shape[1])
    y = layer(x.bfloat16())
    assert layer.kernel_name == "cpu-int4"
    assert_bf16_close(y, expected(layer, x))
    # the reference kernel on the same bf16 input agrees with the exact product too
    layer.kernel = "torch"
    assert_bf16_close(layer(x.bfloat16()), expected(layer, x))


def test_cpu_int4_keeps_leading_dimensions_and_large_activations():
    layer = exact_layer(3, 8, (32, 128), 64, True, bias=True)
    layer.kernel = "cpu-int4"
    x = exact_input(6, 128).view(2, 3, 128)
    assert_bf16_close(layer(x.bfloat16()), expected(layer, x.view(6, 128)).view(2, 3, 32))
    # a one-token input whose salient activation exceeds fp16's range (65504): the scaled fp16 GEMV holds
    big = exact_input(1, 128)
    big[0, layer.salient_idx[0]] = 2.0**17
    assert_bf16_close(layer(big.bfloat16()), expected(layer, big))


@pytest.mark.parametrize("group_size", [32, -1])
def test_cpu_int8_equals_the_reference_for_one_group_per_row(group_size):
    layer = exact_layer(8, 6, (48, 96), group_size, True, bias=True)
    x = exact_input(3, 96)
    reason = why_not(get_kernel("cpu-int8"), layer.layout(), CPU, torch.bfloat16)
    if group_size == -1:
        assert reason is None
        layer.kernel = "cpu-int8"
        assert_bf16_close(layer(x.bfloat16()), expected(layer, x), ulps=4)
    else:  # the int8 operator takes one scale per row: grouped 8-bit layers use another kernel
        assert "one scale per row" in reason.text


@pytest.mark.parametrize("bits,group_size", [(3, 32), (2, 64), (4, -1), (8, -1)])
def test_released_codes_are_rebuilt_bit_for_bit(bits, group_size):
    layer = exact_layer(bits, 5, (40, 130), group_size, True, bias=False)
    stored = {name: t.clone() for name, t in layer.state_dict().items()}
    weight = layer.effective_weight()
    x = exact_input(2, 130).bfloat16()
    layer.kernel = "cpu-int8" if bits == 8 else "cpu-int4"
    before = layer(x)
    prepare_for_inference(layer, CPU, torch.bfloat16)
    assert layer.qweight is None  # the kernel's copy is the only one now
    state = layer.state_dict()
    assert state.keys() == stored.keys() and all(torch.equal(state[n], stored[n]) for n in stored)
    assert torch.equal(layer.effective_weight(), weight)
    assert torch.equal(layer(x), before)
    layer.to("cpu")  # a move drops the prepared kernel after putting the codes back
    assert torch.equal(layer.qweight, stored["qweight"]) and layer.kernel_state is None
    assert torch.equal(layer(x), before)


def test_released_layer_holds_four_bits_per_quantized_weight():
    layer = exact_layer(3, 128, (576, 576), 128, True, bias=False)
    prepare_for_inference(layer, CPU, torch.bfloat16, kernel="cpu-int4")
    kernel_bytes = {name: t.numel() * t.element_size() for name, t in layer.named_buffers()
                    if name.startswith("kernel_")}
    assert kernel_bytes["kernel_int4"] == 576 * 448 // 2  # 448 columns cut into 64-wide sub-groups: no padding
    assert "qweight" not in dict(layer.named_buffers())


def test_unsupported_layouts_are_refused_with_a_reason():
    layer = exact_layer(3, 4, (32, 100), 16, True, bias=False)  # groups of 16: no operator group size fits
    reason = why_not(get_kernel("cpu-int4"), layer.layout(), CPU, torch.bfloat16)
    assert reason is not None and "multiples of 32" in reason.text
    x = exact_input(2, 100)
    y = layer(x.bfloat16())  # the measured choice runs it with a kernel that accepts it
    assert layer.kernel_name != "cpu-int4"
    exact = expected(layer, x).value  # (each kernel's own bound: tests/test_kernel_conformance.py)
    assert float((y.double() - exact).norm() / exact.norm()) < 2e-2
    layer.kernel = "cpu-int4"
    with pytest.raises(RuntimeError, match="multiples of 32"):
        layer(x.bfloat16())


def test_a_priority_fallback_is_noted_once(monkeypatch):
    """Where kernels are chosen by priority (no measurement: off the CPU), a faster kernel that refuses
    a layer's layout is noted once per reason."""
    from quikft.nn import kernels

    layouts = [exact_layer(3, 4, (32, 100), 16, True, bias=False, seed=s).layout() for s in (0, 5)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for layout in layouts:
            kernel = kernels.select_kernel(layout, CPU, torch.bfloat16)
            kernels.note_fallback(layout, CPU, torch.bfloat16, kernel)
    notes = [w for w in caught if "multiples of 32" in str(w.message)]
    assert len(notes) <= 1  # once per reason, not per layer (0 if an earlier test noted it)


def test_int4_group_size_choice():
    def layout(sizes, contiguous=True):
        return LayerLayout(sum(sizes) + 4, 32, 3, 4, tuple(sizes), contiguous)

    assert cpu_kernel.int4_group_size(layout([128, 128, 128])) == 128
    assert cpu_kernel.int4_group_size(layout([128, 128, 64])) == 64  # no padding beats larger sub-groups
    assert cpu_kernel.int4_group_size(layout([128, 128, 7])) == 128  # the last group is padded anyway
    assert cpu_kernel.int4_group_size(layout([192, 192, 7])) == 64
    assert cpu_kernel.int4_group_size(layout([96, 96, 96])) == 32
    assert cpu_kernel.int4_group_size(layout([448])) == 64
    assert cpu_kernel.int4_group_size(layout([450])) == 256  # one group: cut into 256s, padded
    assert cpu_kernel.int4_group_size(layout([100, 100])) is None
    assert cpu_kernel.int4_group_size(layout([128, 128], contiguous=False)) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 5])
def test_fp32_and_fp16_inputs_run_the_int4_operator_in_a_bf16_island(dtype, rows):
    """The quantized part's inputs and product are rounded to bf16, nothing else: the salient product
    and the bias stay exact (fp32), so the error is bounded by bf16 roundings of the quantized part."""
    layer = exact_layer(3, 7, (64, 160), 32, True, bias=True)
    layer.kernel = "cpu-int4"
    x = exact_input(rows, 160)
    y = layer(x.to(dtype))
    assert y.dtype == dtype and layer.kernel_state.meta.operator_dtype == cpu_kernel.operator_dtype(dtype)
    reference = expected(layer, x)
    base = layer.dequantize_weight().double()
    quantized_magnitude = x.double().abs() @ base.abs().t()
    bound = 2 * 2.0**-8 * quantized_magnitude + (2.0**-10 if dtype == torch.float16 else 1e-6) * reference.magnitude
    assert float(((y.double() - reference.value).abs() - bound).max()) <= 0


def test_the_reference_is_exact_for_fp32_inputs():
    layer = exact_layer(3, 7, (64, 160), 32, True, bias=True)
    layer.kernel = "torch"
    x = exact_input(3, 160)
    torch.testing.assert_close(layer(x).double(), expected(layer, x).value, rtol=0, atol=1e-5)


def test_upgrade_from_format_1_keeps_the_weight():
    from quikft.packing import pack_codes

    new = exact_layer(3, 6, (32, 96), 32, True, bias=False)
    keep = nonsalient_columns(96, new.salient_idx)
    # the same layer in format 1: ascending non-salient columns, act-order groups in that order
    position = torch.empty(96, dtype=torch.long)
    position[new.perm.long()] = torch.arange(new.perm.numel())
    old = QuikLinear(PackedShape(96, 32, 3, 32, 6, new.n_groups))
    old.load_state_dict({**new.state_dict(), "qweight": pack_codes(new.codes()[:, position[keep]], 3),
                         "g_idx": new.g_idx[position[keep]], "perm": keep.int()})
    old.perm = None
    old.upgrade_from_v1()
    assert torch.equal(old.perm, new.perm) and torch.equal(old.g_idx, new.g_idx)
    assert torch.equal(old.qweight, new.qweight)
    assert torch.equal(old.effective_weight(), new.effective_weight())


def test_info_lists_layout_refusals_only():
    """``quikft info`` names what a layer's own layout costs it, not kernels for other devices or widths:
    it goes by the refusal's kind, with the texts as the JSON summary records them."""
    from quikft.format.inspect import _kernel_cell

    layout = exact_layer(3, 4, (32, 100), 16, True, bias=False).layout()
    refusals = {name: why_not(get_kernel(name), layout, CPU, torch.bfloat16) for name in ("cpu-int4", "cpu-int8")}
    assert [r.kind for r in refusals.values()] == [RefusalKind.LAYOUT, RefusalKind.SCOPE]
    layer = {"kernel": "torch", "prefill_kernel": "torch", "refused": {n: r.text for n, r in refusals.items()},
             "refusal_kinds": {n: r.kind.value for n, r in refusals.items()}}
    cell = _kernel_cell([layer])
    assert f"cpu-int4: {refusals['cpu-int4']}" in cell and "cpu-int8" not in cell
