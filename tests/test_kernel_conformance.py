"""Every registered kernel against the exact product, on every exact-layer case it accepts here.

The bound each kernel must meet follows from the precision it declares (``QuikKernel.activations``):
``model`` kernels are exact up to float rounding of the partial sums in the input dtype, ``bf16``
kernels round the quantized part's inputs and product to bf16, and ``int8`` kernels quantize the
quantized part's inputs per block to int8 (symmetric, so each input moves by at most
max|x| / 254). A wrong column, group, code, zero-point or padding gives an error of the order of
the partial sums, far beyond every bound.

Every test here is parametrized over ``available_kernels()``, so a newly registered kernel is held to
the whole contract without tests of its own: its declared precision, the stored tensors it lets a
loader drop coming back bit for bit, and, if it claims ``differentiable``, the exact gradients. A
kernel runs on the first device of this machine where it takes some case (CPU, then CUDA); one that
takes none is skipped with its refusal's text (e.g. ``triton`` without a GPU; ``TRITON_INTERPRET``
only serves tests/test_triton_kernel.py), never passed vacuously.
"""

import functools

import pytest
import torch
from test_kernels import INT4_CASES, exact_input, exact_layer, expected

from quikft.nn import (
    LayerLayout,
    QuikLinear,
    RefusalKind,
    available_kernels,
    get_kernel,
    prepare_for_inference,
)

CPU = torch.device("cpu")
DEVICES = [CPU, *([torch.device("cuda")] if torch.cuda.is_available() else [])]
DTYPES = [torch.float32, torch.bfloat16]
KERNELS = available_kernels()
CASES = [*INT4_CASES, (8, 6, (48, 96), -1, True), (8, 4, (40, 160), 32, False), (2, 0, (32, 256), 128, True)]
ROUNDING = {torch.float32: 2.0**-22, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-10}


def bound(layer, x: torch.Tensor, dtype: torch.dtype, activations: str) -> torch.Tensor:
    """Largest allowed |y - exact| per output, from the kernel's declared activation precision."""
    reference = expected(layer, x)
    base = layer.dequantize_weight().double().abs()
    quantized = x.double().abs() @ base.t()  # partial sums of the quantized part
    allowed = 4 * ROUNDING[dtype] * reference.magnitude + 1e-6
    if activations == "bf16":
        allowed = allowed + 2 * 2.0**-8 * quantized
    elif activations == "int8":
        step = x.double().abs().amax(dim=1, keepdim=True) / 254  # half an int8 step of the largest input
        allowed = allowed + 1.01 * step * base.sum(dim=1)[None, :] + 2 * 2.0**-22 * quantized
    return allowed


CASE_IDS = [f"w{c[0]}-k{c[1]}-{c[2][0]}x{c[2][1]}-g{c[3]}" for c in CASES]


def make_layer(case) -> QuikLinear:
    return exact_layer(*case, bias=True, seed=sum(case[:2]))


@functools.cache
def layout_of(case) -> LayerLayout:
    return make_layer(case).layout()


def accepted(name: str, dtype: torch.dtype) -> tuple[torch.device, list]:
    """The first device where kernel ``name`` takes some case with ``dtype`` inputs, and the cases it
    takes there. None anywhere: skipped with the refusals' text, unless a refusal is about the layout,
    which means the kernel is for this machine and the cases miss the layouts it takes."""
    kernel = get_kernel(name)
    refusals = set()
    for device in DEVICES:
        checks = {case: kernel.check(layout_of(case), device, dtype) for case in CASES}
        taken = [case for case, refusal in checks.items() if refusal is None]
        if taken:
            return device, taken
        refusals |= set(checks.values())
    texts = "; ".join(sorted(refusal.text for refusal in refusals))
    if any(refusal.kind is RefusalKind.LAYOUT for refusal in refusals):
        pytest.fail(f"{name} refuses every case for its layout ({texts}): add a case it takes to CASES")
    pytest.skip(f"{name} takes no case on this machine with {dtype} inputs: {texts}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("rows", [1, 6])
def test_every_kernel_meets_its_declared_precision(name, dtype, rows):
    device, cases = accepted(name, dtype)
    for case in cases:
        layer = make_layer(case)
        x = exact_input(rows, case[2][1])
        exact, allowed = expected(layer, x).value, bound(layer, x, dtype, get_kernel(name).activations)
        layer.to(device).kernel = name
        y = layer(x.to(device, dtype))
        assert y.dtype == dtype and layer.kernel_name == name
        excess = (y.cpu().double() - exact).abs() - allowed
        assert float(excess.max()) <= 0, f"{name} {case}: max excess {float(excess.max()):.4g}"


def assert_same(tensors: dict[str, torch.Tensor], stored: dict[str, torch.Tensor], what: str) -> None:
    assert tensors.keys() == stored.keys(), what
    for key, tensor in stored.items():
        assert tensors[key].dtype == tensor.dtype and torch.equal(tensors[key], tensor), f"{what}: {key}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", KERNELS)
def test_released_tensors_come_back_bit_for_bit(name, dtype):
    """Prepared for inference, a kernel holds alone what it can rebuild (the loader drops the layer's
    copy); ``state_dict()`` is the checkpoint all along and ``restore_codes()`` puts back every stored
    tensor bit for bit, after which the forward is unchanged."""
    device, cases = accepted(name, dtype)
    kernel = get_kernel(name)
    for case in cases:
        layer = make_layer(case).to(device)
        stored = {key: t.clone() for key, t in layer.state_dict().items()}
        x = exact_input(2, case[2][1]).to(device, dtype)
        prepare_for_inference(layer, device, dtype, kernel=name)
        assert layer.kernel_name == name
        # released exactly when the kernel can rebuild the codes and its forward does not read them
        assert (layer.qweight is None) == (kernel.restore_codes is not None and not kernel.reads_codes), name
        y = layer(x)
        assert_same(layer.state_dict(), stored, f"{name} {case}: state_dict while released")
        layer.restore_codes()
        buffers = dict(layer.named_buffers())
        assert_same({key: buffers[key] for key in stored}, stored, f"{name} {case}: restored buffers")
        assert_same(layer.state_dict(), stored, f"{name} {case}: state_dict after restore_codes")
        assert torch.equal(layer(x), y), f"{name} {case}: the forward changed after restore_codes"


@pytest.mark.parametrize("name", [name for name in KERNELS if get_kernel(name).differentiable])
def test_a_differentiable_kernel_gives_the_exact_gradients(name):
    """Gradients w.r.t. the input and, as a fine-tune of the salient columns trains them, w.r.t.
    ``salient_weight``: exact here (every number is exact in fp32), which is what the reference gives.
    Only kernels that claim ``differentiable`` take part (the reference always does)."""
    device, cases = accepted(name, torch.float32)
    for case, rows in ((case, rows) for case in cases for rows in (1, 6)):
        layer = make_layer(case)
        x, grad_y = exact_input(rows, case[2][1]), exact_input(rows, case[2][0], seed=2)
        exact_x = grad_y.double() @ layer.effective_weight().double()
        exact_salient = grad_y.double().t() @ x.double()[:, layer.salient_idx.long()]
        layer.to(device).kernel = name
        layer.salient_weight.requires_grad_(layer.k > 0)
        x = x.to(device).requires_grad_()
        layer(x).backward(grad_y.to(device))
        assert layer.kernel_name == name
        torch.testing.assert_close(x.grad.cpu().double(), exact_x, rtol=1e-6, atol=1e-5)
        if layer.k:
            assert layer.salient_weight.grad is not None, f"{name} {case}: no gradient reaches salient_weight"
            torch.testing.assert_close(layer.salient_weight.grad.cpu().double(), exact_salient, rtol=1e-3, atol=0)


def test_the_cpu_kernels_are_all_exercised_here():
    """The conformance cases reach every CPU kernel this machine can run (a kernel that refused every
    case would only be skipped above)."""
    from quikft.nn.ort_kernel import ort_available

    seen = {name for name in KERNELS for dtype in DTYPES for case in CASES
            if get_kernel(name).check(layout_of(case), CPU, dtype) is None}
    expected_here = {"torch", "cpu-int4", "cpu-int8"} | ({"cpu-ort", "cpu-ort-int8"} if ort_available() else set())
    assert expected_here <= seen
