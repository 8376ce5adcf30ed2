"""Every registered kernel against the exact product, on every exact-layer case it accepts here.

The bound each kernel must meet follows from the precision it declares (``QuikKernel.activations``):
``model`` kernels are exact up to float rounding of the partial sums in the input dtype, ``bf16``
kernels round the quantized part's inputs and product to bf16, and ``int8`` kernels quantize the
quantized part's inputs per block to int8 (symmetric, so each input moves by at most
max|x| / 254). A wrong column, group, code, zero-point or padding gives an error of the order of
the partial sums, far beyond every bound.
"""

import pytest
import torch
from test_kernels import INT4_CASES, exact_input, exact_layer, expected

from quikft.nn import available_kernels, get_kernel, why_not

CPU = torch.device("cpu")
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


def runnable(case, dtype):
    layer = exact_layer(*case, bias=True, seed=sum(case[:2]))
    return [name for name in available_kernels()
            if why_not(get_kernel(name), layer.layout(), CPU, dtype) is None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=[f"w{c[0]}-k{c[1]}-{c[2][0]}x{c[2][1]}-g{c[3]}" for c in CASES])
@pytest.mark.parametrize("rows", [1, 6])
def test_every_kernel_meets_its_declared_precision(case, dtype, rows):
    names = runnable(case, dtype)
    assert "torch" in names
    x = exact_input(rows, case[2][1])
    for name in names:
        layer = exact_layer(*case, bias=True, seed=sum(case[:2]))
        layer.kernel = name
        y = layer(x.to(dtype))
        assert y.dtype == dtype and layer.kernel_name == name
        excess = (y.double() - expected(layer, x).value).abs() - bound(layer, x, dtype, get_kernel(name).activations)
        assert float(excess.max()) <= 0, f"{name}: max excess {float(excess.max()):.4g}"


def test_the_cpu_kernels_are_all_exercised_here():
    """The conformance cases reach every CPU kernel this machine can run (a kernel that refused every
    case would pass the test above vacuously)."""
    from quikft.nn.ort_kernel import ort_available

    seen = {name for case in CASES for dtype in (torch.float32, torch.bfloat16) for name in runnable(case, dtype)}
    expected_here = {"torch", "cpu-int4", "cpu-int8"} | ({"cpu-ort", "cpu-ort-int8"} if ort_available() else set())
    assert expected_here <= seen
