"""Inference modules for quantized checkpoints, and the kernels that run them."""

from quikft.nn import cpu_kernel, ort_kernel, torch_kernel, triton_kernel  # noqa: F401  -- register the built-in kernels
from quikft.nn.kernels import (
    KernelState,
    LayerLayout,
    QuikKernel,
    Refusal,
    RefusalKind,
    available_kernels,
    get_kernel,
    register_kernel,
    select_kernel,
    unregister_kernel,
    why_not,
)
from quikft.nn.quik_linear import (
    PackedShape,
    QuikLinear,
    kernel_counts,
    nonsalient_columns,
    prepare_for_inference,
    quik_layers,
    set_dequantized_cache,
    set_kernel,
)
from quikft.nn.stored_head import keep_tied_head_in_bf16

__all__ = [
    "KernelState",
    "LayerLayout",
    "PackedShape",
    "QuikKernel",
    "QuikLinear",
    "Refusal",
    "RefusalKind",
    "available_kernels",
    "get_kernel",
    "keep_tied_head_in_bf16",
    "kernel_counts",
    "nonsalient_columns",
    "prepare_for_inference",
    "quik_layers",
    "register_kernel",
    "select_kernel",
    "set_dequantized_cache",
    "set_kernel",
    "unregister_kernel",
    "why_not",
]
