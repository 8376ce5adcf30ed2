"""ONNX Runtime kernels: the quantized part through ``com.microsoft.MatMulNBits``, the salient part in torch.

``MatMulNBits`` (ONNX Runtime's contrib operator, with MLAS kernels for AVX2, AVX-512, AVX512-VNNI
and NEON) multiplies ``A (M, K)`` by a weight stored as unsigned ``b``-bit codes in blocks of
``block_size`` consecutive K columns, each block of each output row with its own scale and
integer zero-point: ``w = (q - zp) * scale``, which is exactly our grid. Format 2 stores the
non-salient columns group-contiguous, so every stored group is cut into blocks of the largest
power of two (16..256) that divides every group but the last, and the layer is

    y = MatMulNBits(x[..., perm_padded]) + x[..., salient_idx] · W_Sᵀ + b

3-bit codes go into the 4-bit container (zero-points below 8), 2- and 8-bit codes into their
own. The last group is padded to a whole block with columns whose codes equal their zero-point
(so they weigh exactly 0) and whose inputs repeat the last real column of that block (so an
int8 activation block keeps its absmax).

Two kernels, two activation precisions (``accuracy_level``):

- ``cpu-ort``: fp32 activations (level 0): the same fp32 product as the reference up to
  summation order. On AVX2 it is about as fast as dense fp32 at 4 bits and ~30x slower at 2
  and 8 bits, so measurement (:mod:`quikft.nn.autotune`) rarely picks it.
- ``cpu-ort-int8``: activations quantized by ORT to int8 per block (level 4), integer dot
  products: 4-8x faster than dense fp32 on AVX2 at 4096x4096; the output moves by about 6e-3
  relative. It is a lower-precision policy, allowed by default only because it passed the
  perplexity gate (see ``DEFAULT_ACTIVATIONS`` in :mod:`quikft.nn.kernels`).

Memory. ONNX Runtime prepacks the weight into its own layout when the session is created and
keeps its copy of the initializers besides (2.4-2.7 bytes of process memory per byte of 4-bit
codes, measured with RSS); those bytes are not torch buffers, so ``KernelState.hidden_bytes``
records them (twice the arrays handed over) and the benchmark counts them. The layer keeps
``qweight`` (the portable codes) because the prepacked layout cannot be read back; the salient
weights are held as an exact fp32 copy (the layer's fp16 buffer is dropped, see
:func:`~quikft.nn.kernels.salient_fp32`). ONNX Runtime's intra-op pool runs on the calling thread
for layers below :data:`PARALLEL_MIN_WEIGHTS` and on torch's thread count above, with spinning
off, so two thread pools never spin against each other. The bound input/output buffers of a
one-row call stay between calls, which makes one layer's forward unsafe to run from two threads
at once.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
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
from quikft.packing import unpack_zeros

BLOCK_SIZES = (256, 128, 64, 32, 16)
CONTAINER_BITS = {2: 2, 3: 4, 4: 4, 8: 8}
EXACT_LEVEL, INT8_LEVEL = 0, 4
PARALLEL_MIN_WEIGHTS = 2**23  # layers with fewer weights run ORT on the calling thread alone
KEPT_BUFFER_ROWS = 1  # input sizes whose bound buffers stay between calls (decode)
INSTALL_HINT = "pip install 'quikft[cpu]'"


@functools.cache
def ort_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def block_size(layout: LayerLayout) -> int | None:
    """The largest MatMulNBits block that divides every stored group but the last (which is padded)."""
    if not layout.contiguous_groups:
        return None
    sizes = [size for size in layout.group_sizes if size]
    for size in BLOCK_SIZES:
        if all(g % size == 0 for g in sizes[:-1]):
            return size
    return None


@dataclass
class BoundBuffers:
    """The one-row input and output buffers kept bound between calls (decode), once the first is made."""

    quantized: Tensor | None = None
    product: Tensor | None = None


@dataclass(frozen=True)
class OrtMeta:
    """A layer's ONNX Runtime session, its I/O binding and the padded width of its quantized input."""

    session: Any  # onnxruntime.InferenceSession (onnxruntime is imported only when a session is built)
    binding: Any  # the session's IOBinding
    k_padded: int
    # Mutable on purpose: the buffers are rebound only when a call's row count changes.
    kept: BoundBuffers = field(default_factory=BoundBuffers)


def check_ort(layout: LayerLayout, device: torch.device, dtype: torch.dtype) -> Refusal | None:
    if device.type != "cpu":
        return Refusal.scope("runs on CPU only")
    if not dtype.is_floating_point:
        return Refusal.scope("runs on floating-point activations only")
    if layout.bits not in CONTAINER_BITS:
        return Refusal.scope("handles 2/3/4/8-bit codes only")
    if not ort_available():
        return Refusal.scope(f"runs on machines with onnxruntime and onnx installed ({INSTALL_HINT})")
    if not layout.contiguous_groups:
        return Refusal.layout("groups are not contiguous (a format-1 layout; run quikft convert)")
    if layout.n_quantized == 0:
        return Refusal.layout("no quantized columns")
    if block_size(layout) is None:
        return Refusal.layout(f"group sizes {sorted(set(layout.group_sizes))} are not multiples of 16")
    return None


def _pack_blocks(codes: np.ndarray, bits: int) -> np.ndarray:
    """(N, K) codes -> (N, K * bits / 8) uint8, consecutive codes in one byte from the low bits up."""
    per_byte = 8 // bits
    grouped = codes.astype(np.uint8).reshape(codes.shape[0], -1, per_byte)
    packed = np.zeros(grouped.shape[:2], dtype=np.uint8)
    for slot in range(per_byte):
        packed |= grouped[:, :, slot] << np.uint8(slot * bits)
    return packed


def _unpack_blocks(packed: np.ndarray, bits: int, width: int) -> np.ndarray:
    per_byte, mask = 8 // bits, (1 << bits) - 1
    slots = [(packed >> np.uint8(slot * bits)) & np.uint8(mask) for slot in range(per_byte)]
    return np.stack(slots, axis=-1).reshape(packed.shape[0], -1)[:, :width]


def ort_weights(layer: QuikLinear, block: int) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """MatMulNBits' B, scales and zero_points for ``layer``, the padded input gather and the padding."""
    layout = layer.layout()
    bits = CONTAINER_BITS[layer.bits]
    n = layout.n_quantized
    pad = -n % block
    owner = torch.repeat_interleave(torch.arange(len(layout.group_sizes)),
                                    torch.tensor([-(-g // block) for g in layout.group_sizes]))
    blocks = owner.numel()
    zeros = unpack_zeros(layer.qzeros, layer.bits, layer.out_features)  # (out, groups)
    codes = torch.empty(layer.out_features, n + pad, dtype=torch.uint8)
    codes[:, :n] = layer.codes()
    codes[:, n:] = zeros[:, -1:].to(torch.uint8)  # padded columns decode to exactly 0
    block_zeros = zeros[:, owner].to(torch.uint8).numpy()  # (out, blocks)
    zero_slots = -(-blocks * bits // 8) * (8 // bits)
    zero_padded = np.zeros((layer.out_features, zero_slots), dtype=np.uint8)
    zero_padded[:, :blocks] = block_zeros
    arrays = {
        "B": _pack_blocks(codes.numpy(), bits).reshape(layer.out_features, blocks, block * bits // 8),
        "scales": np.ascontiguousarray(layer.scales.float().t()[:, owner].numpy()),
        "zero_points": _pack_blocks(zero_padded, bits),
    }
    perm = layer.perm.long()
    gather = torch.cat([perm, perm[-1:].expand(pad)]) if pad else perm
    return arrays, gather.contiguous(), pad


def ort_threads(layout: LayerLayout) -> int:
    """ONNX Runtime's intra-op threads for a layer: torch's count for large layers, 1 for small ones.

    Without spinning, handing a call to a second thread costs a wake-up (tens of µs), more than a
    small layer's whole product: measured at 2 threads on AVX2 (README, "CPU kernels").
    """
    weights = layout.out_features * layout.in_features
    return torch.get_num_threads() if weights >= PARALLEL_MIN_WEIGHTS else 1


@dataclass(frozen=True)
class MatMulNBits:
    """The attributes of one layer's ``com.microsoft.MatMulNBits`` node."""

    k_padded: int  # the stored columns, padded to whole blocks
    out_features: int
    bits: int  # the container's: 3-bit codes run in the 4-bit one
    block: int
    level: int  # accuracy_level: EXACT_LEVEL, or INT8_LEVEL for int8 activations


def _session(arrays: dict[str, np.ndarray], spec: MatMulNBits, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    node = helper.make_node("MatMulNBits", ["A", "B", "scales", "zero_points"], ["Y"], domain="com.microsoft",
                            K=spec.k_padded, N=spec.out_features, bits=spec.bits, block_size=spec.block,
                            accuracy_level=spec.level)
    graph = helper.make_graph(
        [node], "quik_matmul_nbits",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", spec.k_padded])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", spec.out_features])],
        initializer=[numpy_helper.from_array(array, name) for name, array in arrays.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def ort_kernel(name: str, level: int, priority: int, activations: str) -> QuikKernel:
    """A MatMulNBits kernel at one ``accuracy_level``."""

    def prepare(layer: QuikLinear, device: torch.device, dtype: torch.dtype) -> KernelState:
        block = block_size(layer.layout())
        arrays, gather, pad = ort_weights(layer, block)
        spec = MatMulNBits(layer.in_features - layer.k + pad, layer.out_features, CONTAINER_BITS[layer.bits], block,
                           level)
        session = _session(arrays, spec, ort_threads(layer.layout()))
        tensors = {"gather": gather, **salient_fp32(layer, torch.float32)}  # the product is fp32
        if layer.k:
            tensors["salient_gather"] = layer.salient_idx.long()
        if layer.bias is not None:
            tensors["bias"] = layer.bias.float()
        hidden = 2 * sum(array.nbytes for array in arrays.values())  # ORT's copy and its prepacked one
        return KernelState(kernel, device, dtype, tensors, OrtMeta(session, session.io_binding(), gather.numel()),
                           hidden_bytes=hidden)

    kernel = QuikKernel(name, check_ort, prepare, forward_ort, priority=priority, activations=activations)
    return kernel


def forward_ort(layer: QuikLinear, state: KernelState, x: Tensor) -> Tensor:
    tensors, meta = state.tensors, state.meta
    flat = x.reshape(-1, layer.in_features)
    if flat.dtype != torch.float32:
        flat = flat.float()
    quantized, product = _bound_buffers(meta, flat.shape[0], layer.out_features)
    torch.index_select(flat, 1, tensors["gather"], out=quantized)
    meta.session.run_with_iobinding(meta.binding)
    # A new tensor either way: the bound output buffer is overwritten by the next call.
    if layer.k:
        y = torch.addmm(product, flat.index_select(1, tensors["salient_gather"]), tensors[SALIENT_T])
    else:
        y = product.clone()
    if "bias" in tensors:
        y.add_(tensors["bias"])
    return y.to(x.dtype).view(*x.shape[:-1], layer.out_features)


def _bound_buffers(meta: OrtMeta, rows: int, out_features: int) -> tuple[Tensor, Tensor]:
    """The session's input and output buffers for ``rows`` rows.

    Rebinding costs more than a decode step's whole gather, so one-row buffers (every decode
    step) stay bound between calls; longer inputs get buffers of their own, released after the
    call. The kept buffers make a layer's forward unsafe to run from two threads at once.
    """
    kept = meta.kept
    if kept.quantized is not None and kept.quantized.shape[0] == rows:
        return kept.quantized, kept.product
    quantized = torch.empty(rows, meta.k_padded)
    product = torch.empty(rows, out_features)
    meta.binding.bind_input("A", "cpu", 0, np.float32, [rows, meta.k_padded], quantized.data_ptr())
    meta.binding.bind_output("Y", "cpu", 0, np.float32, [rows, out_features], product.data_ptr())
    keep = rows <= KEPT_BUFFER_ROWS
    kept.quantized, kept.product = (quantized, product) if keep else (None, None)
    return quantized, product


EXACT_KERNEL = ort_kernel("cpu-ort", EXACT_LEVEL, priority=5, activations="model")
INT8_KERNEL = ort_kernel("cpu-ort-int8", INT8_LEVEL, priority=15, activations="int8")
register_kernel(EXACT_KERNEL)
register_kernel(INT8_KERNEL)
