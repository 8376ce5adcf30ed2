"""The GPU kernel: one Triton kernel per layer for 2/3/4/8-bit codes (see :mod:`quikft.nn.triton_ops`).

Registered for CUDA devices when the ``triton`` package is installed; ``triton`` itself is
imported at the first forward, so ``import quikft`` never pays for it. The kernel reads the
checkpoint's own tensors (no repacking, nothing extra held), so it takes every layout the
format allows: any group size, act-order, odd shapes.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from quikft.nn.kernels import KernelState, LayerLayout, QuikKernel, Refusal, register_kernel
from quikft.nn.quik_linear import QuikLinear

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def check_triton(layout: LayerLayout, device: torch.device, dtype: torch.dtype) -> Refusal | None:
    if device.type != "cuda":
        return Refusal.scope("runs on CUDA only")
    if not triton_available():
        return Refusal.scope("runs on machines with the triton package only (pip install triton)")
    if dtype not in DTYPES:
        return Refusal.scope("runs on fp16/bf16/fp32 activations only")
    return None


def prepare_triton(layer: QuikLinear, device: torch.device, dtype: torch.dtype) -> KernelState:
    return KernelState(TRITON_KERNEL, device, dtype)  # reads the layer's own tensors: nothing to prepare


def forward_triton(layer: QuikLinear, state: KernelState, x: Tensor) -> Tensor:
    from quikft.nn.triton_ops import quik_linear

    return quik_linear(x, layer)


TRITON_KERNEL = QuikKernel("triton", check_triton, prepare_triton, forward_triton, priority=20)
register_kernel(TRITON_KERNEL)
