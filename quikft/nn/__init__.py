"""Inference modules for quantized checkpoints, and the kernels that run them."""

import importlib
import pkgutil

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

# Every ``*_kernel`` module of this package registers its kernel on import: found by name, so adding a
# kernel is one module (plus nothing: tests/test_kernel_conformance.py runs every registered kernel).
for _module in sorted(info.name for info in pkgutil.iter_modules(__path__) if info.name.endswith("_kernel")):
    importlib.import_module(f"{__name__}.{_module}")

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
