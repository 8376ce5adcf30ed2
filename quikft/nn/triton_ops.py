"""Triton kernels for the two-path QuikLinear: ``y = Kq(x[..., perm]) + x[..., S] · W_Sᵀ + b``.

Imported only when a Triton kernel runs (``import triton`` is slow and needs the package).
Tests run these kernels on CPU tensors with ``TRITON_INTERPRET=1`` set before triton is
imported; on a GPU they compile.

One kernel reads the stored layout directly, nothing is repacked:

- the input columns of a K-tile are gathered through ``perm`` (and ``salient_idx`` for the
  salient loop) with pointer arithmetic, so ``x`` is never copied;
- code ``j`` of output row ``n`` sits at bit ``b·j`` of the little-endian stream formed by
  column ``n`` of ``qweight`` (:mod:`quikft.packing`); for 2/4/8 bits it lies inside one word,
  for 3 bits it may straddle two, so both words are loaded and joined in 64 bits;
- zero-points are unpacked the same way along the output dimension of ``qzeros``;
- ``w = (code - zero) · scale`` in fp32, cast to the activation dtype for ``tl.dot``
  (fp32 accumulation), as the reference kernel computes in that dtype.

``quik_gemm`` tiles M x N (``tl.dot`` needs tiles of at least 16); for inputs of at most
``GEMV_MAX_ROWS`` rows (decode) ``quik_gemv`` computes one row per program with a
multiply-and-sum, which wastes no tensor-core lanes on padding rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl
from torch import Tensor

if TYPE_CHECKING:
    from quikft.nn.quik_linear import QuikLinear

GEMV_MAX_ROWS = 4


@triton.jit
def _dequant_tile(  # noqa: PLR0913  -- a @triton.jit kernel takes each pointer and size as a scalar argument
        qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, n_stored, n_out,
        zero_words, BITS: tl.constexpr):
    """The (BLOCK_K, BLOCK_N) fp32 weights of stored columns ``offs_k`` and output rows ``offs_n``."""
    mask_k = offs_k < n_stored
    mask_n = offs_n < n_out
    mask = mask_k[:, None] & mask_n[None, :]
    maxq: tl.constexpr = (1 << BITS) - 1
    bit = offs_k * BITS
    word = bit // 32
    shift = (bit % 32).to(tl.int64)
    low = tl.load(qweight_ptr + word[:, None] * n_out + offs_n[None, :], mask=mask, other=0).to(tl.int64) & 0xFFFFFFFF
    if BITS == 3:  # a code may continue in the next word
        n_words = (n_stored * BITS + 31) // 32
        next_mask = mask & ((word + 1) < n_words)[:, None]
        high = tl.load(qweight_ptr + (word + 1)[:, None] * n_out + offs_n[None, :], mask=next_mask, other=0)
        low = low | ((high.to(tl.int64) & 0xFFFFFFFF) << 32)
    code = (low >> shift[:, None]) & maxq

    group = tl.load(g_idx_ptr + offs_k, mask=mask_k, other=0)
    zbit = offs_n * BITS
    zword = zbit // 32
    zshift = (zbit % 32).to(tl.int64)
    zrow = qzeros_ptr + group[:, None] * zero_words
    zlow = tl.load(zrow + zword[None, :], mask=mask, other=0).to(tl.int64) & 0xFFFFFFFF
    if BITS == 3:
        znext = mask & ((zword + 1) < zero_words)[None, :]
        zhigh = tl.load(zrow + (zword + 1)[None, :], mask=znext, other=0)
        zlow = zlow | ((zhigh.to(tl.int64) & 0xFFFFFFFF) << 32)
    zero = (zlow >> zshift[None, :]) & maxq
    scale = tl.load(scales_ptr + group[:, None] * n_out + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    return (code - zero).to(tl.float32) * scale


@triton.jit
def quik_gemm(  # noqa: PLR0913  -- a @triton.jit kernel takes each pointer and size as a scalar argument
        x_ptr, out_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, perm_ptr, salient_idx_ptr,
        salient_w_ptr, bias_ptr, n_rows, n_in, n_out, n_stored, n_salient, zero_words,
        BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < n_rows
    mask_n = offs_n < n_out
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_stored, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < n_stored
        cols = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
        x = tl.load(x_ptr + offs_m[:, None] * n_in + cols[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        w = _dequant_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, n_stored, n_out,
                          zero_words, BITS)
        acc += tl.dot(x, w.to(x.dtype))
    for s0 in range(0, n_salient, BLOCK_K):
        offs_s = s0 + tl.arange(0, BLOCK_K)
        mask_s = offs_s < n_salient
        cols = tl.load(salient_idx_ptr + offs_s, mask=mask_s, other=0)
        x = tl.load(x_ptr + offs_m[:, None] * n_in + cols[None, :], mask=mask_m[:, None] & mask_s[None, :],
                    other=0.0)
        w = tl.load(salient_w_ptr + offs_n[None, :] * n_salient + offs_s[:, None],
                    mask=mask_s[:, None] & mask_n[None, :], other=0.0)
        acc += tl.dot(x, w.to(x.dtype))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
    tl.store(out_ptr + offs_m[:, None] * n_out + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def quik_gemv(  # noqa: PLR0913  -- a @triton.jit kernel takes each pointer and size as a scalar argument
        x_ptr, out_ptr, qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, perm_ptr, salient_idx_ptr,
        salient_w_ptr, bias_ptr, n_in, n_out, n_stored, n_salient, zero_words,
        BITS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_out
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, n_stored, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < n_stored
        cols = tl.load(perm_ptr + offs_k, mask=mask_k, other=0)
        x = tl.load(x_ptr + row * n_in + cols, mask=mask_k, other=0.0)
        w = _dequant_tile(qweight_ptr, qzeros_ptr, scales_ptr, g_idx_ptr, offs_k, offs_n, n_stored, n_out,
                          zero_words, BITS)
        # Rounded to the activation dtype like the GEMM's tl.dot operands, summed in fp32.
        acc += tl.sum(x.to(tl.float32)[:, None] * w.to(x.dtype).to(tl.float32), axis=0)
    for s0 in range(0, n_salient, BLOCK_K):
        offs_s = s0 + tl.arange(0, BLOCK_K)
        mask_s = offs_s < n_salient
        cols = tl.load(salient_idx_ptr + offs_s, mask=mask_s, other=0)
        x = tl.load(x_ptr + row * n_in + cols, mask=mask_s, other=0.0)
        w = tl.load(salient_w_ptr + offs_n[None, :] * n_salient + offs_s[:, None],
                    mask=mask_s[:, None] & mask_n[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32)[:, None] * w.to(x.dtype).to(tl.float32), axis=0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
    tl.store(out_ptr + row * n_out + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


def quik_linear(x: Tensor, layer: QuikLinear) -> Tensor:
    """``y = x @ Wᵀ + b`` from ``layer``'s stored tensors (its codes rebuilt if a CPU kernel released
    them); ``x`` (..., in) fp16/bf16/fp32."""
    qzeros, scales, perm, salient_idx, bias = layer.qzeros, layer.scales, layer.perm, layer.salient_idx, layer.bias
    n_in = x.shape[-1]
    flat = x.reshape(-1, n_in).contiguous()
    rows, n_out = flat.shape[0], scales.shape[1]
    out = torch.empty(rows, n_out, dtype=x.dtype, device=x.device)
    n_stored, n_salient = perm.numel(), salient_idx.numel()
    bias_arg = bias if bias is not None else scales  # any tensor: never read without HAS_BIAS
    common = (layer.packed_codes(), qzeros, scales, layer.g_idx, perm, salient_idx, layer.salient_weight, bias_arg)
    if rows <= GEMV_MAX_ROWS:
        block_n = 64
        grid = (rows, triton.cdiv(n_out, block_n))
        quik_gemv[grid](flat, out, *common, n_in, n_out, n_stored, n_salient, qzeros.shape[1], BITS=layer.bits,
                        HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=64)
    else:
        block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
        block_n = 64
        grid = (triton.cdiv(rows, block_m), triton.cdiv(n_out, block_n))
        quik_gemm[grid](flat, out, *common, rows, n_in, n_out, n_stored, n_salient, qzeros.shape[1],
                        BITS=layer.bits, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=32)
    return out.view(*x.shape[:-1], n_out)
