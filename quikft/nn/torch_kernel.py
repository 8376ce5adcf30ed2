"""The reference kernel: plain PyTorch on any device, exact, differentiable.

Every other kernel is tested against it; it runs whatever they refuse (fp32 activations on a
CPU, odd group layouts, training through a frozen layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from quikft.nn.kernels import KernelState, LayerLayout, QuikKernel, Refusal, register_kernel
from quikft.nn.quik_linear import QuikLinear

# Uncached, inputs of at least this many rows run as one GEMM on the full weight, shorter
# ones as one GEMM per part (see reference_forward for the measurements behind the number).
FULL_WEIGHT_MIN_TOKENS = 1024


def operand_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the reference's GEMMs take their operands in for inputs of ``dtype`` on ``device``."""
    # CPU half-precision GEMM is slow (and missing on some builds), so fp16 inputs are computed
    # in fp32 on CPU; everything else runs in the input's dtype.
    return torch.float32 if dtype == torch.float16 and device.type == "cpu" else dtype


def reference_forward(layer: QuikLinear, state: KernelState, x: Tensor) -> Tensor:
    """``y = x[..., N] @ deq(W_q).T + x[..., S] @ W_S.T + b`` in one of two forms.

    - Full weight: scatter the dequantized stored columns and the salient weights into one
      (in, out) weight, then one GEMM. Used for long inputs (prefill), and always with
      ``cache_dequantized``, where that weight is built once and reused.
    - Split: gather ``x[..., perm]`` and ``x[..., S]`` and run a GEMM against each compact
      part, so no full weight is built. Used for short uncached inputs (decode).

    Measured on CPU (one thread, 3 bits, k = 128, the default model's shapes), uncached: at
    2048 tokens the full-weight form was as fast or 2-23% faster (the scatter is one pass over
    the weight, 0.1-0.4 ms, while the split form pays for two input gathers and a skinny second
    GEMM); from 1 to 512 tokens the split form was 1-25% faster, most at 1-16 tokens, where
    building the full weight costs as much as the GEMM. Cached, one GEMV on the full weight
    beat the split form on cached parts by 5-8 us per layer and token, hence the cache holds
    the full weight. The two forms agree to float rounding, not bit for bit.
    """
    if not x.is_floating_point():
        raise TypeError(f"QuikLinear expects a floating-point input, got {x.dtype}")
    dtype = operand_dtype(x.dtype, x.device)
    bias = None if layer.bias is None else layer.bias.to(dtype)
    tokens = x.numel() // max(layer.in_features, 1)
    if layer.cache_dequantized or layer.k == 0 or tokens >= FULL_WEIGHT_MIN_TOKENS:
        return F.linear(x.to(dtype), layer.cached_weight_t(dtype).t(), bias).to(x.dtype)
    y = split_linear(layer, x.to(dtype).reshape(-1, layer.in_features), bias)
    return y.view(*x.shape[:-1], layer.out_features).to(x.dtype)


def split_linear(layer: QuikLinear, x: Tensor, bias: Tensor | None) -> Tensor:
    """(tokens, in) -> (tokens, out) as x[:, perm] @ deq(W_q).T + x[:, S] @ W_S.T + b, in x's dtype."""
    rows_t = layer.quantized_rows_t().to(x.dtype)
    y = F.linear(x.index_select(1, layer.nonsalient_index()), rows_t.t(), bias)
    if layer.k == 0:
        return y
    # In place: linear's backward does not need its output, so autograd allows it.
    return y.addmm_(x.index_select(1, layer.salient_idx.long()), layer.salient_weight.t().to(x.dtype))


def _accepts_everything(layout: LayerLayout, device: torch.device, dtype: torch.dtype) -> Refusal | None:
    return None


def _prepare(layer: QuikLinear, device: torch.device, dtype: torch.dtype) -> KernelState:
    return KernelState(TORCH_KERNEL, device, dtype)


TORCH_KERNEL = QuikKernel("torch", _accepts_everything, _prepare, reference_forward, priority=0,
                          differentiable=True, reads_codes=True)
register_kernel(TORCH_KERNEL)
