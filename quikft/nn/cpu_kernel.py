"""CPU kernels: PyTorch's int4pack GEMM for 2/3/4-bit layers, its int8 GEMM for 8-bit ones.

``cpu-int4``. ``torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, G, sz)`` multiplies bf16
activations by 4-bit codes ``q`` in tinygemm's form ``w = (q - 8)·s + z`` with one (s, z) per
group of ``G`` consecutive input columns (G in 32/64/128/256). Any code of b <= 4 bits with an
integer zero-point ``z_int`` maps onto it exactly: ``(q - z_int)·s = (q - 8)·s + (8 - z_int)·s``.
Format 2 stores the non-salient columns group-contiguous, so the layer is

    y = int4mm(x[..., perm]) + x[..., salient_idx] · W_Sᵀ + b

with one gather of the input. Each stored group is cut into sub-groups of the largest G that
divides every group (only the last group may be shorter; it is zero-padded). The int4pack
layout depends on the CPU (AVX-512, AVX2 and scalar builds interleave differently), so it is
built at load time from the portable codes and never saved; :func:`restore_codes` gets the
codes back bit for bit through the same operator (one-hot inputs, s = 1, z = 8), which lets a
loader drop ``qweight`` and hold only the 4-bit copy.

Precision: the quantized part takes bf16 activations and returns a bf16 product (as in any bf16
model); scales and the folded zeros are rounded to bf16 (relative error <= 2^-9 of a step). The
salient product keeps the stored fp16 weights: in a bf16 model a one-token input (decode) runs
PyTorch's fp16 GEMV on the gathered inputs scaled by 2^-4 and scales the product back by 2^4
(exact powers of two), so inputs and outputs up to 2^20 cannot overflow fp16 (which ends at
65504); longer inputs convert W_S to bf16 for one GEMM.

The bf16 island. On x86 both operators are vectorised (AVX2 and AVX-512) for bf16 activations
only; fp32 and fp16 inputs fall into a scalar loop about 14x slower. So a float32 (or float16)
model runs the quantized part in a bf16 island: the gathered quantized inputs are rounded to bf16,
the operator runs, and its product returns to the model dtype; the salient product and the bias
stay in the model dtype (fp32: W_S converted exactly from fp16 per call, so no second copy is
held). What changes against the fp32 reference is therefore only the rounding of the quantized
part's inputs and product to bf16 (relative 2^-9 each), the rounding a bf16 model has everywhere.
On aarch64 the operators have NEON kernels for fp32, fp16 and bf16, so there is no island.

``cpu-int8``. ``torch.ops.aten._weight_int8pack_mm(x, w8, s)`` takes int8 weights with one
scale per output row, so 8-bit layers with a single group (``group_size = -1``) run as
``int8mm(x[..., perm], q - 128, s) + (Σ x[..., perm]) · (128 - z)·s``; grouped 8-bit layers use
the reference kernel.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from quikft.nn.kernels import (
    SALIENT_T,
    KernelState,
    LayerLayout,
    QuikKernel,
    Refusal,
    register_kernel,
    salient_fp32,
)
from quikft.nn.quik_linear import QuikLinear
from quikft.packing import pack_codes, unpack_zeros

INT4_GROUP_SIZES = (256, 128, 64, 32)
ROW_MULTIPLE = 16  # the int4pack operator packs output rows in blocks of 16
# Inputs of at most this many rows use the fp16 GEMV for the salient part (decode).
SALIENT_GEMV_MAX_ROWS = 1
# Power-of-two scaling of the gathered salient inputs before the fp16 GEMV, undone on its output:
# inputs and products up to 65504 * 16 stay finite; only values below 2^-10 lose relative precision.
SALIENT_INPUT_SCALE = 2.0**-4
RESTORE_CHUNK = 512
INT8_COLUMN_MULTIPLE = 16  # the int8 operator crashes (torch 2.13) unless K is a multiple of 16
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# CPUs whose int4/int8 operators are vectorised for fp32 inputs too (NEON): no bf16 island there.
FP32_NATIVE_MACHINES = ("aarch64", "arm64")


def output_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the product is accumulated in for a model of ``dtype``: CPU fp16 GEMMs are slow, so fp32."""
    return torch.float32 if dtype == torch.float16 else dtype


def operator_dtype(dtype: torch.dtype) -> torch.dtype:
    """The activation dtype the operators run in for a model of ``dtype`` on this CPU (the island)."""
    if dtype == torch.float32 and platform.machine().lower() in FP32_NATIVE_MACHINES:
        return dtype
    return torch.bfloat16


@dataclass(frozen=True)
class OperatorInput:
    """How a layer's input reaches the operator: one gather (stored columns, then salient ones), the
    first ``n`` gathered columns rounded to ``operator_dtype`` and zero-padded by ``pad`` columns."""

    gather: Tensor  # the layer's input_columns() (its perm and salient_idx are views of it)
    n: int
    pad: int
    operator_dtype: torch.dtype


@dataclass(frozen=True)
class Int4Meta(OperatorInput):
    """The int4pack layout: sub-groups of ``group`` columns, output rows padded to ``rows``."""

    group: int
    rows: int


def _cpu_operator(device: torch.device, dtype: torch.dtype) -> Refusal | None:
    if device.type != "cpu":
        return Refusal.scope("runs on CPU only")
    if dtype not in FLOAT_DTYPES:
        return Refusal.scope(f"runs on float32/float16/bfloat16 activations only (got {str(dtype).removeprefix('torch.')})")
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return Refusal.scope("runs on torch builds with the int4pack CPU operator only")
    return None


def int4_group_size(layout: LayerLayout) -> int | None:
    """The operator's group size for this layer: the largest that divides every group, so nothing is
    padded (smaller sub-groups cost 4 bytes of scale and zero per row and sub-group, padding 16 bytes
    per row and 32 columns); else the largest that divides every group but the last, which is padded."""
    if not layout.contiguous_groups:
        return None
    sizes = [size for size in layout.group_sizes if size]
    for candidates in (sizes, sizes[:-1]):
        for size in INT4_GROUP_SIZES:
            if all(g % size == 0 for g in candidates):
                return size
    return None


def check_int4(layout: LayerLayout, device: torch.device, dtype: torch.dtype) -> Refusal | None:
    reason = _cpu_operator(device, dtype)
    if reason is not None:
        return reason
    if layout.bits > 4:
        return Refusal.scope("handles 2/3/4-bit codes only")
    if not layout.contiguous_groups:
        return Refusal.layout("groups are not contiguous (a format-1 layout; run quikft convert)")
    if layout.n_quantized == 0:
        return Refusal.layout("no quantized columns")
    if int4_group_size(layout) is None:
        return Refusal.layout(f"group sizes {sorted(set(layout.group_sizes))} are not multiples of 32")
    return None


def _subgroups(layout: LayerLayout, size: int) -> tuple[Tensor, int]:
    """Stored group of every operator sub-group, and how many zero columns pad the last group."""
    counts = [-(-g // size) for g in layout.group_sizes]
    owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return owner, sum(counts) * size - layout.n_quantized


def prepare_int4(layer: QuikLinear, device: torch.device, dtype: torch.dtype) -> KernelState:
    layout = layer.layout()
    size = int4_group_size(layout)
    owner, pad = _subgroups(layout, size)
    rows = -(-layer.out_features // ROW_MULTIPLE) * ROW_MULTIPLE
    codes = layer.codes()  # (out, n) storage order
    padded = torch.zeros(rows, layout.n_quantized + pad, dtype=torch.int32)
    padded[: layer.out_features, : layout.n_quantized] = codes
    scales = layer.scales.float().t()[:, owner]  # (out, sub-groups)
    zeros = unpack_zeros(layer.qzeros, layer.bits, layer.out_features)[:, owner]
    scale_zero = torch.zeros(owner.numel(), rows, 2)
    scale_zero[:, : layer.out_features, 0] = scales.t()
    scale_zero[:, : layer.out_features, 1] = ((8 - zeros) * scales).t()
    op_dtype = operator_dtype(dtype)
    tensors = {
        "int4": torch.ops.aten._convert_weight_to_int4pack_for_cpu(padded, 1),
        "scale_zero": scale_zero.to(op_dtype).contiguous(),
    }
    tensors.update(_salient_tensors(layer, dtype))
    meta = Int4Meta(layer.input_columns(), layout.n_quantized, pad, op_dtype, group=size, rows=rows)
    return KernelState(INT4_KERNEL, device, dtype, tensors, meta)


def _salient_tensors(layer: QuikLinear, dtype: torch.dtype) -> dict[str, Tensor]:
    """The bias in the output dtype and, for fp32 (and fp16) models, W_Sᵀ in fp32, which then replaces
    the stored fp16 copy (bf16 models use the stored fp16 weights as they are)."""
    tensors = salient_fp32(layer, dtype)
    if layer.bias is not None:
        tensors["bias"] = layer.bias.to(output_dtype(dtype))
    return tensors


def forward_int4(layer: QuikLinear, state: KernelState, x: Tensor) -> Tensor:
    tensors, meta = state.tensors, state.meta
    flat = x.reshape(-1, layer.in_features)
    gathered = flat.index_select(1, meta.gather)
    quantized = gathered[:, : meta.n].to(meta.operator_dtype)
    if meta.pad:
        quantized = F.pad(quantized, (0, meta.pad))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(quantized.contiguous(), tensors["int4"], meta.group,
                                                   tensors["scale_zero"])
    if meta.rows != layer.out_features:
        y = y[:, : layer.out_features]
    y = y.to(output_dtype(x.dtype)).contiguous()
    y = _add_salient_and_bias(layer, tensors, y, gathered[:, meta.n:])
    return y.to(x.dtype).view(*x.shape[:-1], layer.out_features)


def _add_salient_and_bias(layer: QuikLinear, tensors: dict[str, Tensor], y: Tensor, salient_x: Tensor) -> Tensor:
    if layer.k:
        if SALIENT_T in tensors:  # fp32 (and fp16) models: the exact fp32 copy, one fp32 GEMM
            y.addmm_(salient_x.to(y.dtype), tensors[SALIENT_T])
        elif salient_x.shape[0] <= SALIENT_GEMV_MAX_ROWS:
            scaled = F.linear(salient_x.mul(SALIENT_INPUT_SCALE).half(), layer.salient_weight)
            y.add_(scaled, alpha=1 / SALIENT_INPUT_SCALE)
        else:
            y.addmm_(salient_x, layer.salient_weight.t().to(y.dtype))
    if "bias" in tensors:
        y.add_(tensors["bias"])
    return y


def restore_int4_codes(layer: QuikLinear, state: KernelState) -> Tensor:
    """``qweight`` from the int4pack tensor: one-hot inputs with s = 1, z = 8 read every code back."""
    meta, packed = state.meta, state.tensors["int4"]
    width = meta.n + meta.pad
    unit = torch.zeros(width // meta.group, meta.rows, 2, dtype=torch.bfloat16)
    unit[..., 0], unit[..., 1] = 1.0, 8.0
    chunks = []
    for start in range(0, meta.n, RESTORE_CHUNK):
        stop = min(start + RESTORE_CHUNK, meta.n)
        onehot = torch.zeros(stop - start, width, dtype=torch.bfloat16)
        onehot[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        chunks.append(torch.ops.aten._weight_int4pack_mm_for_cpu(onehot, packed, meta.group, unit))
    codes_t = torch.cat(chunks)[:, : layer.out_features]  # (n, out), integers 0..15 exactly
    return pack_codes(codes_t.t().to(torch.uint8), layer.bits)


INT4_KERNEL = QuikKernel("cpu-int4", check_int4, prepare_int4, forward_int4, priority=10,
                         restore_codes=restore_int4_codes, activations="bf16")


# ---------------------------------------------------------------------------------------- 8-bit


def check_int8(layout: LayerLayout, device: torch.device, dtype: torch.dtype) -> Refusal | None:
    reason = _cpu_operator(device, dtype)
    if reason is not None:
        return reason
    if layout.bits != 8:
        return Refusal.scope("handles 8-bit codes only")
    if len(layout.group_sizes) != 1:
        return Refusal.layout("8-bit layers with groups (the int8 operator takes one scale per row)")
    return None


def prepare_int8(layer: QuikLinear, device: torch.device, dtype: torch.dtype) -> KernelState:
    n = layer.in_features - layer.k
    pad = -n % INT8_COLUMN_MULTIPLE
    codes = F.pad(layer.codes().to(torch.int16) - 128, (0, pad))  # padded columns meet zero inputs
    scales = layer.scales.float()[0]
    zeros = unpack_zeros(layer.qzeros, layer.bits, layer.out_features)[:, 0]
    op_dtype = operator_dtype(dtype)
    tensors = {
        "int8": codes.to(torch.int8).contiguous(),
        "scale": scales.to(op_dtype),
        "zero_term": ((128 - zeros) * scales).to(output_dtype(dtype)),
    }
    tensors.update(_salient_tensors(layer, dtype))
    return KernelState(INT8_KERNEL, device, dtype, tensors, OperatorInput(layer.input_columns(), n, pad, op_dtype))


def forward_int8(layer: QuikLinear, state: KernelState, x: Tensor) -> Tensor:
    tensors, meta = state.tensors, state.meta
    n = meta.n
    gathered = x.reshape(-1, layer.in_features).index_select(1, meta.gather)
    quantized = gathered[:, :n].to(meta.operator_dtype)
    padded = F.pad(quantized, (0, meta.pad)) if meta.pad else quantized.contiguous()
    y = torch.ops.aten._weight_int8pack_mm(padded, tensors["int8"], tensors["scale"]).to(output_dtype(x.dtype))
    y.addmm_(quantized.sum(1, keepdim=True).to(y.dtype), tensors["zero_term"][None, :])
    y = _add_salient_and_bias(layer, tensors, y, gathered[:, n:])
    return y.to(x.dtype).view(*x.shape[:-1], layer.out_features)


def restore_int8_codes(layer: QuikLinear, state: KernelState) -> Tensor:
    codes = state.tensors["int8"][:, : state.meta.n].to(torch.int16) + 128
    return pack_codes(codes.to(torch.uint8), layer.bits)


INT8_KERNEL = QuikKernel("cpu-int8", check_int8, prepare_int8, forward_int8, priority=10,
                         restore_codes=restore_int8_codes, activations="bf16")

register_kernel(INT4_KERNEL)
register_kernel(INT8_KERNEL)
