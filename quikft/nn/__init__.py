"""Inference modules for quantized checkpoints."""

from quikft.nn.quik_linear import (
    QuikKernel,
    QuikLinear,
    available_kernels,
    nonsalient_columns,
    register_kernel,
    select_kernel,
    set_dequantized_cache,
    unregister_kernel,
)

__all__ = [
    "QuikKernel",
    "QuikLinear",
    "available_kernels",
    "nonsalient_columns",
    "register_kernel",
    "select_kernel",
    "set_dequantized_cache",
    "unregister_kernel",
]
