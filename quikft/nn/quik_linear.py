"""``QuikLinear``: a linear layer stored as packed b-bit codes plus FP16 salient columns.

Buffers (all persistent, so ``state_dict`` is the checkpoint format, format version 2);
``n = in - k`` is the number of quantized (non-salient) input columns:

==================  ==========================================  =======
name                shape                                       dtype
==================  ==========================================  =======
``qweight``         (ceil(n*bits/32), out)                      int32
``qzeros``          (n_groups, ceil(out*bits/32))               int32
``scales``          (n_groups, out)  -- GPTQ orientation        float16
``g_idx``           (n,)   group of every stored column         int32
``perm``            (n,)   input column of every stored column  int32
``salient_idx``     (k,)   sorted unique input columns          int32
``salient_weight``  (out, k)                                    float16
``bias``            (out,)  only when the layer has a bias      float32
==================  ==========================================  =======

Only the non-salient columns have codes, stored **group-contiguous**: column ``j`` of the
packed code matrix is input column ``perm[j]`` and belongs to group ``g_idx[j]``, and
``g_idx`` is non-decreasing, so every group is one run of consecutive stored columns (within a
group, input columns ascend). ``perm`` and ``salient_idx`` together partition
``range(in)``. A kernel therefore computes

    y = Kq(x[..., perm]) + x[..., salient_idx] · salient_weightᵀ + bias

with one gather of the input and a plain grouped low-bit GEMM ``Kq``. ``qweight``/``qzeros``
follow :mod:`quikft.packing` (true zero-points, not GPTQ v1's ``zero - 1``). The effective
weight is

    W[:, perm[j]] = (code[:, j] - zero[:, g_idx[j]]) * scale[:, g_idx[j]]
    W[:, salient_idx[s]] = salient_weight[:, s]

The bias is kept in float32 because it is tiny and holds fp16, bf16 and fp32 biases exactly.
Every floating buffer keeps its dtype under ``module.to(dtype)`` / ``.half()``: converting fp16
scales to bf16 would silently break bit-exact dequantization. Device moves work as usual.

The forward runs through the kernel registry (:mod:`quikft.nn.kernels`): the first call on a
(device, dtype) picks and prepares the fastest kernel that accepts the layer. A kernel whose
prepared tensors reproduce the codes exactly (the CPU int4 path) lets
:func:`prepare_for_inference` drop ``qweight`` to save memory; ``state_dict`` and every method
that needs the codes then rebuild them bit for bit, so the checkpoint format never changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from quikft.nn import autotune
from quikft.nn.autotune import DECODE_MAX_ROWS
from quikft.nn.kernels import KernelState, LayerLayout, QuikKernel, get_kernel, note_fallback, select_kernel
from quikft.packing import pack_codes, pack_zeros, packed_words, unpack_codes, unpack_dim0, unpack_zeros

if TYPE_CHECKING:  # a type only: the format sits above this layer
    from quikft.format.protocol import QuantizedLayer

KERNEL_BUFFER_PREFIX = "kernel_"
PREFILL_BUFFER_PREFIX = "kernel_prefill_"
SALIENT = "salient_weight"


@dataclass(frozen=True)
class PackedShape:
    """What fixes a packed layer's buffer shapes (the module docstring's table): read from a
    checkpoint's headers before any value is, or from the quantizer's output."""

    in_features: int
    out_features: int
    bits: int
    group_size: int  # informational only: g_idx is the source of truth for grouping
    k: int  # salient input columns
    n_groups: int
    bias: bool = False


class QuikLinear(nn.Module):
    """Linear layer with packed b-bit weights and k FP16 salient input columns.

    The constructor allocates zero buffers of ``shape``, with the first k columns as salient ones
    (what a checkpoint loader needs before ``load_state_dict``; such a layer computes zeros);
    :meth:`from_quantized` builds a filled layer from the quantizer's output.
    """

    def __init__(self, shape: PackedShape, *, device: torch.device | str | None = None,
                 cache_dequantized: bool = False, kernel: str | None = None) -> None:
        super().__init__()
        in_features, out_features, bits, k, n_groups = (shape.in_features, shape.out_features, shape.bits, shape.k,
                                                        shape.n_groups)
        if not 0 <= k <= in_features:
            raise ValueError(f"k must lie in [0, in_features={in_features}], got {k}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = shape.group_size
        self.k = k
        self.n_groups = n_groups
        self.kernel_state: KernelState | None = None
        # A second kernel for inputs of more than autotune.DECODE_MAX_ROWS rows, when the measured
        # choice differs between decode and prefill (None: kernel_state runs every input).
        self.prefill_state: KernelState | None = None
        self._cache: tuple[tuple[torch.dtype, torch.device], Tensor] | None = None
        self._cache_dequantized = cache_dequantized
        self._kernel = kernel

        def zeros(*shape: int, dtype: torch.dtype) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        i32, f16 = torch.int32, torch.float16
        n_quantized = in_features - k
        self.register_buffer("qweight", zeros(packed_words(n_quantized, bits), out_features, dtype=i32))
        self.register_buffer("qzeros", zeros(n_groups, packed_words(out_features, bits), dtype=i32))
        self.register_buffer("scales", zeros(n_groups, out_features, dtype=f16))
        self.register_buffer("g_idx", zeros(n_quantized, dtype=i32))
        # The first k columns salient, the rest stored in order: an empty layer is a valid (zero) layer.
        self.register_buffer("perm", torch.arange(k, in_features, dtype=i32, device=device))
        self.register_buffer("salient_idx", torch.arange(k, dtype=i32, device=device))
        self.register_buffer("salient_weight", zeros(out_features, k, dtype=f16))
        self.register_buffer("bias", zeros(out_features, dtype=torch.float32) if shape.bias else None)

    @classmethod
    def from_quantized(cls, result: QuantizedLayer, bias: Tensor | None = None, **kwargs: object) -> QuikLinear:
        """Pack the quantizer's output (see the module docstring for the layout) with ``bias``;
        ``kwargs`` go to the constructor.

        ``result.codes`` (out, in) uint8, ``.scales``/``.zeros`` (out, n_groups), ``.g_idx`` (in,)
        the group of every input column, ``.salient`` (k,) sorted unique columns,
        ``.salient_weight`` (out, k). Scales and salient weights must be exactly representable in
        fp16 (round them with ``.half().float()`` before quantizing). Codes at salient columns must
        equal their group's zero-point (they decode to 0, as :class:`~quikft.quant.gptq.QuantResult`
        guarantees): only the non-salient columns' codes and groups are kept, sorted by group.
        """
        _check_quantized(result, bias)
        codes, scales, g_idx, salient = result.codes, result.scales, result.g_idx, result.salient
        out_features, in_features = codes.shape
        shape = PackedShape(in_features, out_features, result.bits, result.group_size, salient.numel(),
                            scales.shape[1], bias is not None)
        layer = cls(shape, device=codes.device, **kwargs)
        keep = nonsalient_columns(in_features, salient.to(codes.device))
        groups = g_idx.to(keep.device).long()[keep]
        order = torch.argsort(groups, stable=True)  # group-contiguous, ascending columns within a group
        perm = keep[order]
        with torch.no_grad():
            layer.qweight.copy_(pack_codes(codes[:, perm], result.bits))
            layer.qzeros.copy_(pack_zeros(result.zeros, result.bits))
            layer.scales.copy_(scales.t())
            layer.g_idx.copy_(groups[order])
            layer.perm.copy_(perm)
            layer.salient_idx.copy_(salient)
            layer.salient_weight.copy_(result.salient_weight)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @property
    def cache_dequantized(self) -> bool:
        """When True, the reference kernel keeps the dequantized weight after the first forward: a
        full (in, out) copy in the compute dtype in exchange for skipping unpacking on every call."""
        return self._cache_dequantized

    @cache_dequantized.setter
    def cache_dequantized(self, enabled: bool) -> None:
        self._cache_dequantized = enabled
        self.reset_kernel()

    @property
    def kernel(self) -> str | None:
        """Name of a registered kernel to force; None selects the fastest that accepts the layer."""
        return self._kernel

    @kernel.setter
    def kernel(self, name: str | None) -> None:
        self._kernel = name
        self.reset_kernel()

    # ------------------------------------------------------------------ the stored format

    def layout(self) -> LayerLayout:
        """Shapes and group structure, what kernels decide on."""
        return LayerLayout(self.in_features, self.out_features, self.bits, self.k,
                           group_sizes(self.g_idx, self.n_groups), groups_are_contiguous(self.g_idx))

    def packed_codes(self) -> Tensor:
        """``qweight``, rebuilt bit for bit from the kernel's tensors if a loader dropped it."""
        if self.qweight is not None:
            return self.qweight
        state = next((s for s in (self.kernel_state, self.prefill_state)
                      if s is not None and s.kernel.restore_codes is not None), None)
        if state is None:
            raise RuntimeError("QuikLinear lost its codes: qweight was dropped without a kernel that can restore it")
        with torch.inference_mode(False), torch.no_grad():
            return state.kernel.restore_codes(self, state)

    def codes(self) -> Tensor:
        """The (out, in - k) uint8 codes of the stored columns, in storage order."""
        return unpack_codes(self.packed_codes(), self.bits, self.in_features - self.k)

    def input_columns(self) -> Tensor:
        """``cat(perm, salient_idx)`` (int32): the input gather of a two-path kernel.

        Afterwards ``perm`` and ``salient_idx`` are views of it, so a prepared layer holds the
        indices once (they stay ordinary buffers: ``state_dict`` and ``load_state_dict`` work).
        """
        n = self.in_features - self.k
        if self.perm.untyped_storage().data_ptr() == self.salient_idx.untyped_storage().data_ptr() \
                and self.perm.storage_offset() + n == self.salient_idx.storage_offset():
            return self.perm.as_strided((self.in_features,), (1,))  # already fused
        columns = torch.cat([self.perm, self.salient_idx]).to(torch.int32)
        self.perm, self.salient_idx = columns[:n], columns[n:]
        return columns

    def restore_codes(self) -> None:
        """Put ``qweight`` and ``salient_weight`` back if a loader dropped them (e.g. before a device move)."""
        if self.qweight is None:
            self.qweight = self.packed_codes()
        if SALIENT not in self._buffers:
            self._buffers[SALIENT] = self._restored_salient()

    def _restored_salient(self) -> Tensor:
        """``salient_weight`` rebuilt bit for bit by the kernel that holds it in another dtype."""
        copy = next((s.salient_copy() for s in (self.kernel_state, self.prefill_state)
                     if s is not None and s.salient_copy() is not None), None)
        if copy is None:
            raise RuntimeError("QuikLinear lost its salient weights without a kernel that can restore them")
        with torch.inference_mode(False), torch.no_grad():
            return copy.t().half().contiguous()

    def __getattr__(self, name: str):
        # A loader may hand the fp16 salient weights to a kernel that keeps them in fp32 (exactly);
        # every other reader still finds them here, rebuilt on access.
        if (name == SALIENT and self.__dict__.get("kernel_state") is not None
                and SALIENT not in self.__dict__["_buffers"]):
            return self._restored_salient()
        return super().__getattr__(name)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The quantized (base) part of the weight, (out, in), exactly 0 at salient columns.

        Computed in fp32, where it equals the quantizer's ``(codes - zeros[:, g_idx]) *
        scales[:, g_idx]`` bit for bit (one rounding of an exact integer times an fp16-exact
        scale), then cast.
        """
        return self._full_weight_t(salient=False).t().to(dtype).contiguous()

    def effective_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The full fake-quantized weight (out, in): base plus the salient columns."""
        return self._full_weight_t(salient=True).t().to(dtype).contiguous()

    def nonsalient_index(self) -> Tensor:
        """The stored (non-salient) input columns in storage order, int64."""
        return self.perm.long()

    def quantized_rows_t(self) -> Tensor:
        """Dequantized stored columns as (in - k, out) fp32 rows, in storage order."""
        # Unpacking along dim 0 yields (n, out) directly, with no transpose copy.
        codes_t = unpack_dim0(self.packed_codes(), self.bits, self.in_features - self.k)
        zeros_t = unpack_zeros(self.qzeros, self.bits, self.out_features).t()
        group = self.g_idx.long()
        # In-place ops: same fp32 arithmetic, fewer (n, out) temporaries.
        rows = codes_t.float().sub_(zeros_t[group])
        return rows.mul_(self.scales.float()[group])

    def _full_weight_t(self, salient: bool) -> Tensor:
        """The (in, out) fp32 weight: dequantized rows at the stored columns and, at the salient
        ones, the fp16 salient weights (``salient=True``) or exact zeros (the base)."""
        rows_t = self.quantized_rows_t()
        weight_t = rows_t.new_empty(self.in_features, self.out_features)
        weight_t.index_copy_(0, self.perm.long(), rows_t)
        if self.k:
            fill = self.salient_weight.t().float() if salient else rows_t.new_zeros(self.k, self.out_features)
            weight_t.index_copy_(0, self.salient_idx.long(), fill)
        return weight_t

    # ------------------------------------------------------------------ forward and kernels

    def forward(self, x: Tensor) -> Tensor:
        state = self.kernel_state
        needs_grad = x.requires_grad and torch.is_grad_enabled()
        if (state is None or state.device != x.device or state.dtype != x.dtype
                or (needs_grad and not state.kernel.differentiable)):
            state = self.prepare_kernel(x.device, x.dtype, needs_grad)
        if self.prefill_state is not None and x.numel() > self.in_features * DECODE_MAX_ROWS:
            state = self.prefill_state
        return state.kernel.forward(self, state, x)

    def prepare_kernel(self, device: torch.device | str, dtype: torch.dtype, needs_grad: bool = False,
                       release_codes: bool = False) -> KernelState:
        """Pick and prepare the kernel for inputs of ``dtype`` on ``device`` (once per change).

        ``release_codes`` drops ``qweight`` when the chosen kernel can rebuild it exactly,
        which is what loaders do for inference; :meth:`packed_codes` rebuilds it on demand.
        """
        device = torch.device(device)
        self.restore_codes()  # a new kernel may need the codes the previous one held
        self.reset_kernel()
        decode, prefill = self._choose_kernels(device, dtype, needs_grad)
        state = self._prepare_state(decode, device, dtype, KERNEL_BUFFER_PREFIX)
        self.kernel_state = state
        states = [state]
        if prefill is not decode:
            self.prefill_state = self._prepare_state(prefill, device, dtype, PREFILL_BUFFER_PREFIX)
            states.append(self.prefill_state)
        if release_codes:
            self._release_stored(states)
        return state

    def _release_stored(self, states: list[KernelState]) -> None:
        """Drop the stored tensors the prepared kernels hold in their own form and can rebuild exactly."""
        if (any(s.kernel.restore_codes is not None for s in states)
                and not any(s.kernel.reads_codes for s in states)):
            self.qweight = None
        if self.k and all(s.salient_copy() is not None for s in states):
            del self._buffers[SALIENT]

    def _choose_kernels(self, device: torch.device, dtype: torch.dtype, needs_grad: bool
                        ) -> tuple[QuikKernel, QuikKernel]:
        """(decode kernel, prefill kernel): forced, measured (CPU inference), or by priority."""
        layout = self.layout()
        # The dequantized-weight cache belongs to the reference kernel.
        forced = self.kernel or ("torch" if self.cache_dequantized else None)
        if forced is None and not needs_grad and device.type == "cpu":
            plan = autotune.choose(self, device, dtype)
            return get_kernel(plan[autotune.DECODE]), get_kernel(plan[autotune.PREFILL])
        kernel = select_kernel(layout, device, dtype, needs_grad, forced)
        if forced is None:
            note_fallback(layout, device, dtype, kernel)
        return kernel, kernel

    def _prepare_state(self, kernel: QuikKernel, device: torch.device, dtype: torch.dtype,
                       prefix: str) -> KernelState:
        # Built outside inference mode so later autograd-enabled forwards may use the tensors.
        with torch.inference_mode(False), torch.no_grad():
            state = kernel.prepare(self, device, dtype)
        for name, tensor in state.tensors.items():
            self.register_buffer(prefix + name, tensor, persistent=False)
        return state

    def reset_kernel(self) -> None:
        """Forget the prepared kernel and its tensors (the codes are restored first)."""
        if self.kernel_state is not None:
            self.restore_codes()
            for prefix, state in ((KERNEL_BUFFER_PREFIX, self.kernel_state),
                                  (PREFILL_BUFFER_PREFIX, self.prefill_state)):
                for name in state.tensors if state is not None else ():
                    self._buffers.pop(prefix + name, None)
            self.kernel_state = self.prefill_state = None
        self._cache = None

    @property
    def kernel_name(self) -> str | None:
        """The kernel prepared for decode-sized inputs (and every input when there is one), if any."""
        return None if self.kernel_state is None else self.kernel_state.kernel.name

    @property
    def prefill_kernel_name(self) -> str | None:
        """The kernel that runs inputs of more than one row, if any."""
        state = self.prefill_state or self.kernel_state
        return None if state is None else state.kernel.name

    def hidden_bytes(self) -> int:
        """Memory the prepared kernels hold outside torch tensors (e.g. ONNX Runtime's weights)."""
        return sum(s.hidden_bytes for s in (self.kernel_state, self.prefill_state) if s is not None)

    def cached_weight_t(self, dtype: torch.dtype) -> Tensor:
        """Effective weight transposed, (in, out), in ``dtype``; cached if enabled.

        The cache holds one entry keyed by (dtype, device); it is dropped by
        ``.to()``/``.cuda()``/``load_state_dict`` and by :meth:`clear_cache`.
        """
        if not self.cache_dequantized:
            self._cache = None  # release memory if caching was switched off
            return self._full_weight_t(salient=True).to(dtype)
        key = (dtype, self.perm.device)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        # A weight built inside inference_mode would be an inference tensor, unusable by later
        # forwards that need autograd; build it as a normal (grad-free) tensor.
        with torch.inference_mode(False), torch.no_grad():
            weight = self._full_weight_t(salient=True).to(dtype)
        self._cache = (key, weight)
        return weight

    def clear_cache(self) -> None:
        """Drop everything derived from the buffers: the prepared kernel and the cached weight.
        Call it after editing buffers in place."""
        self.reset_kernel()

    def clear_weight_cache(self) -> None:
        """Drop the cached dequantized weight (kept for callers of the first format)."""
        self.clear_cache()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, k={self.k}, bias={self.bias is not None}")

    # ------------------------------------------------------------------ nn.Module plumbing

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> QuikLinear:
        # Honour device moves but refuse dtype changes of the stored tensors: fp16
        # scales/salient weights cast to bf16 would lose exactness. Prepared kernel tensors are
        # specific to a device and dtype, so they are rebuilt at the next forward.
        def keep_dtype(t: Tensor) -> Tensor:
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(moved.device)

        self.reset_kernel()
        return super()._apply(keep_dtype, recurse)

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.qweight is None:  # dropped by a loader: the format still has it
            destination[prefix + "qweight"] = self.packed_codes()
        if SALIENT not in self._buffers:
            destination[prefix + SALIENT] = self._restored_salient()

    def _load_from_state_dict(  # noqa: PLR0913  -- nn.Module's signature
            self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
        self.reset_kernel()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def upgrade_from_v1(self) -> None:
        """Reorder a layer loaded from a format-1 checkpoint into the group-contiguous layout.

        Format 1 stored the non-salient columns in ascending column order with arbitrary
        (act-order) groups; the codes are permuted, not changed, so the weight is identical.
        """
        keep = nonsalient_columns(self.in_features, self.salient_idx)
        order = torch.argsort(self.g_idx.long(), stable=True)
        codes = unpack_codes(self.packed_codes(), self.bits, keep.numel())
        with torch.no_grad():
            self.qweight = pack_codes(codes[:, order], self.bits)
            self.g_idx = self.g_idx[order].contiguous()
            self.perm = keep[order].to(torch.int32)
        self.reset_kernel()


def group_sizes(g_idx: Tensor, n_groups: int) -> tuple[int, ...]:
    """How many stored columns each group holds."""
    if g_idx.numel() == 0:
        return (0,) * n_groups
    return tuple(int(c) for c in torch.bincount(g_idx.long().cpu(), minlength=n_groups))


def groups_are_contiguous(g_idx: Tensor) -> bool:
    """Whether ``g_idx`` is non-decreasing (each group one run of stored columns)."""
    return g_idx.numel() < 2 or bool((g_idx[1:] >= g_idx[:-1]).all())


def _check_quantized(result: QuantizedLayer, bias: Tensor | None) -> None:
    """Reject quantizer output that packing would not reproduce exactly."""
    codes, scales, zeros, g_idx = result.codes, result.scales, result.zeros, result.g_idx
    salient, salient_weight = result.salient, result.salient_weight
    out_features, in_features = codes.shape
    n_groups = scales.shape[1]
    if zeros.shape != scales.shape or scales.shape[0] != out_features:
        raise ValueError("scales and zeros must both be (out_features, n_groups)")
    if g_idx.shape != (in_features,) or (g_idx.numel() and (g_idx.min() < 0 or g_idx.max() >= n_groups)):
        raise ValueError("g_idx must be (in_features,) with values in [0, n_groups)")
    k = salient.numel()
    if salient_weight.shape != (out_features, k):
        raise ValueError("salient_weight must be (out_features, k)")
    if k and (salient.min() < 0 or salient.max() >= in_features or not bool((salient.diff() > 0).all())):
        raise ValueError("salient indices must be sorted, unique and in [0, in_features)")
    # Salient columns' codes are dropped when packing, so they must decode to exactly 0.
    salient_long = salient.long()
    if k and not torch.equal(codes[:, salient_long].float(), zeros[:, g_idx[salient_long].long()].float()):
        raise ValueError("codes at salient columns must equal their group's zero-point (they are not stored)")
    for name, t in (("scales", scales), ("salient_weight", salient_weight)):
        if not torch.equal(t.half().to(t.dtype), t):
            raise ValueError(f"{name} must be exactly representable in float16")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError("bias must be (out_features,)")


def quik_layers(model: nn.Module) -> dict[str, QuikLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuikLinear)}


def set_dequantized_cache(model: nn.Module, enabled: bool = True) -> int:
    """Switch the dequantized-weight cache of every QuikLinear in ``model``; returns how many.

    With the cache on, the reference kernel runs every layer from one full weight in the
    compute dtype, built once: exact (the fake-quantized weight) and fast, for one full weight
    copy in memory. The fast kernels need no cache.
    """
    layers = quik_layers(model).values()
    for layer in layers:
        layer.cache_dequantized = enabled
    return len(layers)


def set_kernel(model: nn.Module, name: str | None) -> int:
    """Force kernel ``name`` (None: automatic choice) on every QuikLinear; returns how many."""
    if name is not None:
        get_kernel(name)  # unknown names fail here, not at the first forward
    layers = quik_layers(model).values()
    for layer in layers:
        layer.kernel = name
    return len(layers)


def prepare_for_inference(model: nn.Module, device: torch.device | str | None = None,
                          dtype: torch.dtype | None = None, release_codes: bool = True,
                          kernel: str | None = None) -> dict[str, int]:
    """Prepare every QuikLinear's kernel for inputs of ``dtype`` on ``device`` now, not at the
    first forward; with ``release_codes`` a kernel that can rebuild the codes exactly holds them
    alone (the CPU int4 path: 4-bit codes instead of both those and ``qweight``).

    ``device``/``dtype`` default to where and in what dtype the model's other weights are, which
    is what its activations will be. ``kernel`` (or ``$QUIKFT_KERNEL``) forces one kernel on every
    layer; otherwise each layer takes the measured fastest (CPU) or the highest-priority kernel.
    Returns how many layers each kernel took (a layer with a second kernel for prefill counts under
    ``"<decode kernel>+<prefill kernel>"``).
    """
    kernel = kernel or autotune.forced_kernel()
    if kernel is not None:
        set_kernel(model, kernel)
    reference = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = torch.device(device if device is not None else reference.device if reference is not None else "cpu")
    dtype = dtype or (reference.dtype if reference is not None else torch.float32)
    for layer in quik_layers(model).values():
        layer.prepare_kernel(device, dtype, release_codes=release_codes)
    return kernel_counts(model)


def kernel_counts(model: nn.Module) -> dict[str, int]:
    """How many QuikLinears run each prepared kernel (``"<decode>+<prefill>"`` where the two differ,
    ``"unprepared"`` before a first forward): what reports record beside their timings."""
    counts: dict[str, int] = {}
    for layer in quik_layers(model).values():
        name = layer.kernel_name or "unprepared"
        if layer.prefill_state is not None:
            name = f"{name}+{layer.prefill_kernel_name}"
        counts[name] = counts.get(name, 0) + 1
    return counts


def nonsalient_columns(in_features: int, salient: Tensor) -> Tensor:
    """The complement of ``salient`` in ``range(in_features)``, ascending, int64."""
    keep = torch.ones(in_features, dtype=torch.bool, device=salient.device)
    keep[salient.long()] = False
    return keep.nonzero().squeeze(1)
