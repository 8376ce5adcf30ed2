"""The Triton kernel against the reference, run by Triton's interpreter on the CPU.

``TRITON_INTERPRET=1`` is set in conftest.py before anything imports triton; the kernel then
runs on CPU tensors with the same indexing, masking and arithmetic as on a GPU.
"""

import os

import pytest
import torch

from quikft.nn import KernelState, QuikKernel, RefusalKind, register_kernel, triton_kernel, unregister_kernel

assert os.environ.get("TRITON_INTERPRET") == "1", "conftest.py sets TRITON_INTERPRET before triton loads"
from test_kernels import exact_input, exact_layer, expected  # noqa: E402

from quikft.nn import triton_ops  # noqa: E402  -- triton is a test dependency (the [dev] extra)

CASES = [  # bits, k, (out, in), group size, act-order
    (2, 5, (40, 100), 32, True),
    (3, 5, (40, 100), 32, True),  # 3-bit codes straddle int32 words
    (3, 0, (24, 70), 16, False),
    (4, 9, (40, 100), -1, True),
    (8, 5, (40, 100), 32, False),
    (3, 7, (33, 130), 64, True),  # in_features - k not a multiple of the group size, odd out
]


@pytest.mark.parametrize("bits,k,shape,group_size,act_order", CASES)
@pytest.mark.parametrize("rows", [1, 20])  # the GEMV (decode) and the tiled GEMM
def test_triton_kernel_equals_the_reference(bits, k, shape, group_size, act_order, rows):
    layer = exact_layer(bits, k, shape, group_size, act_order, bias=bits != 2, seed=bits * 3 + k)
    x = exact_input(rows, shape[1])
    y = triton_ops.quik_linear(x, layer)
    # every number is exact in fp32 (see exact_layer), so the kernel must match to the last bit
    # up to summation order
    torch.testing.assert_close(y.double(), expected(layer, x).value, rtol=1e-6, atol=1e-5)
    half = triton_ops.quik_linear(x.half(), layer)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), expected(layer, x).value, rtol=2e-3, atol=2e-2)


def test_triton_kernel_through_the_layer_and_registry():
    """Forced on a CPU layer (the interpreter), the registered forward is the reference's equal."""
    layer = exact_layer(3, 6, (40, 100), 32, True, bias=True)
    interpreted = QuikKernel("triton-interpret", lambda layout, device, dtype: None,
                             lambda lay, device, dtype: KernelState(interpreted, device, dtype),
                             triton_kernel.forward_triton, priority=-1)
    register_kernel(interpreted)
    try:
        x = exact_input(3, 100).view(1, 3, 100)
        layer.kernel = "torch"  # the exact reference (the measured choice may run int8 activations)
        reference = layer(x)
        layer.kernel = "triton-interpret"
        y = layer(x)
        assert layer.kernel_name == "triton-interpret" and y.shape == (1, 3, 40)
        torch.testing.assert_close(y, reference, rtol=1e-6, atol=1e-5)
    finally:
        unregister_kernel("triton-interpret")


def test_triton_kernel_is_registered_for_cuda_only():
    layout = exact_layer(3, 6, (40, 100), 32, True, bias=False).layout()
    refusal = triton_kernel.check_triton(layout, torch.device("cpu"), torch.float16)
    assert refusal.kind is RefusalKind.SCOPE and refusal.text == "runs on CUDA only"
    if triton_kernel.triton_available():
        assert triton_kernel.check_triton(layout, torch.device("cuda"), torch.float16) is None
