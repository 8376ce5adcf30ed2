"""``QuikLinear``: a linear layer stored as packed b-bit codes plus FP16 salient columns.

Buffers (all persistent except ``nonsalient_idx``, so ``state_dict`` is the checkpoint
format); ``n = in - k`` is the number of quantized (non-salient) input columns:

==================  ==========================================  =======
name                shape                                       dtype
==================  ==========================================  =======
``qweight``         (ceil(n*bits/32), out)                      int32
``qzeros``          (n_groups, ceil(out*bits/32))               int32
``scales``          (n_groups, out)  -- GPTQ orientation        float16
``g_idx``           (n,)   group of every non-salient column    int32
``salient_idx``     (k,)   sorted unique input columns          int32
``salient_weight``  (out, k)                                    float16
``bias``            (out,)  only when the layer has a bias      float32
``nonsalient_idx``  (n,)   derived, not saved (see below)       int64
==================  ==========================================  =======

Only the non-salient columns have codes: ``qweight`` packs them in ascending original
column order, i.e. ``N = sorted(set(range(in)) - set(salient_idx))``, and ``g_idx[j]``
is the group of column ``N[j]``.  ``N`` is derived from ``salient_idx`` on first use and
kept as the non-persistent buffer ``nonsalient_idx`` (so it follows device moves but
never reaches the checkpoint).  ``qweight``/``qzeros`` follow :mod:`quikft.packing`
(true zero-points, not GPTQ v1's ``zero - 1``).  The effective weight is

    W[:, N[j]] = (code[:, j] - zero[:, g_idx[j]]) * scale[:, g_idx[j]]
    W[:, salient_idx[s]] = salient_weight[:, s]

The bias is kept in float32 because it is tiny and holds fp16, bf16 and fp32 biases
exactly.

Every floating buffer keeps its dtype under ``module.to(dtype)`` / ``.half()``:
converting fp16 scales to bf16 would silently break bit-exact dequantization.
Device moves work as usual.

The forward dispatches through a small kernel registry, so a fused GPU kernel
(e.g. Triton) can be registered later without touching callers.  The built-in
``"torch"`` kernel is the portable fallback.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quikft.packing import pack_codes, pack_zeros, packed_words, unpack_dim0, unpack_zeros

KernelFn = Callable[["QuikLinear", Tensor], Tensor]
KernelPredicate = Callable[["QuikLinear", Tensor], bool]


@dataclass(frozen=True)
class QuikKernel:
    """A forward implementation and the condition under which it may run."""

    name: str
    fn: KernelFn
    predicate: KernelPredicate
    priority: int


_KERNELS: dict[str, QuikKernel] = {}


def _always(layer: QuikLinear, x: Tensor) -> bool:
    return True


def register_kernel(
    name: str,
    fn: KernelFn,
    predicate: KernelPredicate = _always,
    priority: int = 0,
    *,
    replace: bool = False,
) -> None:
    """Register ``fn(layer, x) -> y`` for layers/inputs where ``predicate(layer, x)``.

    Among accepting kernels the highest ``priority`` wins (ties: first
    registered).  The built-in ``"torch"`` kernel has priority 0 and accepts
    everything, so it is the fallback; a GPU kernel should use a higher
    priority and check ``x.is_cuda`` and its own availability in the predicate.
    """
    if name in _KERNELS and not replace:
        raise ValueError(f"kernel {name!r} is already registered")
    _KERNELS[name] = QuikKernel(name, fn, predicate, priority)


def unregister_kernel(name: str) -> None:
    """Remove a registered kernel (the built-in ``"torch"`` kernel included)."""
    del _KERNELS[name]


def available_kernels() -> list[str]:
    """Names of registered kernels, in selection order."""
    return [k.name for k in sorted(_KERNELS.values(), key=lambda k: -k.priority)]


def select_kernel(layer: QuikLinear, x: Tensor) -> QuikKernel:
    """The kernel that will run ``layer(x)``: forced by ``layer.kernel`` or chosen by priority."""
    if layer.kernel is not None:
        kernel = _KERNELS.get(layer.kernel)
        if kernel is None:
            raise KeyError(f"kernel {layer.kernel!r} is not registered")
        if not kernel.predicate(layer, x):
            raise RuntimeError(f"kernel {layer.kernel!r} cannot run this layer on this input")
        return kernel
    for name in available_kernels():
        if _KERNELS[name].predicate(layer, x):
            return _KERNELS[name]
    raise RuntimeError("no registered QuikLinear kernel accepts this input")


class QuikLinear(nn.Module):
    """Linear layer with packed b-bit weights and k FP16 salient input columns.

    The constructor allocates zero buffers of the right shapes, with the first
    k columns as salient ones (what a checkpoint loader needs before
    ``load_state_dict``; such a layer computes zeros); :meth:`from_quantized`
    builds a filled layer from the quantizer's output.  ``group_size`` is
    informational only: ``g_idx`` is the source of truth for grouping.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        k: int,
        n_groups: int,
        bias: bool = False,
        *,
        device: torch.device | str | None = None,
        cache_dequantized: bool = False,
        kernel: str | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= k <= in_features:
            raise ValueError(f"k must lie in [0, in_features={in_features}], got {k}")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.k = k
        self.n_groups = n_groups
        # When True, the dequantized weight is kept after the first forward:
        # a full (in, out) copy in the compute dtype in exchange for skipping
        # unpacking on every call.
        self.cache_dequantized = cache_dequantized
        # Name of a registered kernel to force; None selects by priority.
        self.kernel = kernel
        self._cache: tuple[tuple[torch.dtype, torch.device], Tensor] | None = None

        def zeros(*shape: int, dtype: torch.dtype) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        i32, f16 = torch.int32, torch.float16
        n_quantized = in_features - k
        self.register_buffer("qweight", zeros(packed_words(n_quantized, bits), out_features, dtype=i32))
        self.register_buffer("qzeros", zeros(n_groups, packed_words(out_features, bits), dtype=i32))
        self.register_buffer("scales", zeros(n_groups, out_features, dtype=f16))
        self.register_buffer("g_idx", zeros(n_quantized, dtype=i32))
        # The first k columns, not k zeros: an empty layer stays a valid (all-zero) layer.
        self.register_buffer("salient_idx", torch.arange(k, dtype=i32, device=device))
        self.register_buffer("salient_weight", zeros(out_features, k, dtype=f16))
        self.register_buffer("bias", zeros(out_features, dtype=torch.float32) if bias else None)
        # Derived from salient_idx by nonsalient_index() on first use: it cannot be computed
        # here, before a checkpoint's salient_idx is loaded, and it is not stored on disk.
        # None until then, which also keeps it out of meta-device checks of empty layers.
        self.register_buffer("nonsalient_idx", None, persistent=False)

    @classmethod
    def from_quantized(
        cls,
        codes: Tensor,
        scales: Tensor,
        zeros: Tensor,
        g_idx: Tensor,
        salient: Tensor,
        salient_weight: Tensor,
        bias: Tensor | None,
        bits: int,
        group_size: int,
        **kwargs: object,
    ) -> QuikLinear:
        """Pack the quantizer's output (see the module docstring for the contract).

        ``codes`` (out, in) uint8, ``scales``/``zeros`` (out, n_groups),
        ``g_idx`` (in,), ``salient`` (k,) sorted unique columns,
        ``salient_weight`` (out, k).  Scales and salient weights must be
        exactly representable in fp16, otherwise storing them would change
        the weights; round them with ``.half().float()`` before quantizing.
        Codes at salient columns must equal their group's zero-point (they
        decode to 0, as :class:`~quikft.quant.gptq.QuantResult` guarantees):
        only the non-salient columns' codes and groups are kept.
        """
        out_features, in_features = codes.shape
        n_groups = scales.shape[1]
        _check_quantized(codes, scales, zeros, g_idx, salient, salient_weight, bias)
        layer = cls(
            in_features,
            out_features,
            bits,
            group_size,
            salient.numel(),
            n_groups,
            bias is not None,
            device=codes.device,
            **kwargs,
        )
        keep = nonsalient_columns(in_features, salient.to(codes.device))
        with torch.no_grad():
            layer.qweight.copy_(pack_codes(codes[:, keep], bits))
            layer.qzeros.copy_(pack_zeros(zeros, bits))
            layer.scales.copy_(scales.t())
            layer.g_idx.copy_(g_idx.to(keep.device)[keep])
            layer.nonsalient_idx = keep  # already known: spare the first forward deriving it
            layer.salient_idx.copy_(salient)
            layer.salient_weight.copy_(salient_weight)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The quantized (base) part of the weight, (out, in), exactly 0 at salient columns.

        Computed in fp32, where it equals the quantizer's
        ``(codes - zeros[:, g_idx]) * scales[:, g_idx]`` bit for bit (one
        rounding of an exact integer times an fp16-exact scale), then cast.
        """
        return self._full_weight_t(salient=False).t().to(dtype).contiguous()

    def effective_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The full fake-quantized weight (out, in): base plus the salient columns."""
        return self._full_weight_t(salient=True).t().to(dtype).contiguous()

    def nonsalient_index(self) -> Tensor:
        """The non-salient input columns (int64, ascending): the columns ``qweight`` packs.

        Computed once from ``salient_idx`` and cached in the ``nonsalient_idx`` buffer;
        :meth:`clear_cache` (also run by ``load_state_dict``) drops it.
        """
        if self.nonsalient_idx is None:
            # Built outside inference mode so later autograd-enabled forwards may use it.
            with torch.inference_mode(False), torch.no_grad():
                index = nonsalient_columns(self.in_features, self.salient_idx)
            if index.numel() != self.in_features - self.k:
                raise ValueError(f"salient_idx must hold {self.k} unique columns of {self.in_features}")
            self.nonsalient_idx = index
        return self.nonsalient_idx

    def forward(self, x: Tensor) -> Tensor:
        return select_kernel(self, x).fn(self, x)

    def cached_weight_t(self, dtype: torch.dtype) -> Tensor:
        """Effective weight transposed, (in, out), in ``dtype``; cached if enabled.

        The cache holds one entry keyed by (dtype, device); it is dropped by
        ``.to()``/``.cuda()``/``load_state_dict`` and by :meth:`clear_cache`
        (call it after editing buffers in place).
        """
        if not self.cache_dequantized:
            self._cache = None  # release memory if caching was switched off
            return self._full_weight_t(salient=True).to(dtype)
        key = (dtype, self.qweight.device)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        # A weight built inside inference_mode would be an inference tensor,
        # unusable by later forwards that need autograd; build it as a normal
        # (grad-free) tensor.
        with torch.inference_mode(False), torch.no_grad():
            weight = self._full_weight_t(salient=True).to(dtype)
        self._cache = (key, weight)
        return weight

    def clear_cache(self) -> None:
        """Drop the cached dequantized weight and the derived non-salient index."""
        self.clear_weight_cache()
        self.nonsalient_idx = None

    def clear_weight_cache(self) -> None:
        """Drop the cached dequantized weight only (the index stays valid while the buffers do)."""
        self._cache = None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, k={self.k}, "
            f"bias={self.bias is not None}"
        )

    def _quantized_rows_t(self) -> Tensor:
        """Dequantized non-salient columns as (in - k, out) fp32 rows, in ``qweight`` order."""
        # Unpacking along dim 0 yields (n, out) directly, with no transpose copy.
        codes_t = unpack_dim0(self.qweight, self.bits, self.in_features - self.k)
        zeros_t = unpack_zeros(self.qzeros, self.bits, self.out_features).t()
        group = self.g_idx.long()
        # In-place ops: same fp32 arithmetic, fewer (n, out) temporaries.
        rows = codes_t.float().sub_(zeros_t[group])
        return rows.mul_(self.scales.float()[group])

    def _full_weight_t(self, salient: bool) -> Tensor:
        """The (in, out) fp32 weight: dequantized rows at the non-salient columns and, at the
        salient ones, the fp16 salient weights (``salient=True``) or exact zeros (the base)."""
        rows_t = self._quantized_rows_t()
        if self.k == 0:
            return rows_t  # every column is quantized, already in column order
        fill = self.salient_weight.t().float() if salient else rows_t.new_zeros(self.k, self.out_features)
        weight_t = rows_t.new_empty(self.in_features, self.out_features)
        weight_t.index_copy_(0, self.nonsalient_index(), rows_t)
        return weight_t.index_copy_(0, self.salient_idx.long(), fill)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> QuikLinear:
        # Honour device moves but refuse dtype changes of the stored tensors:
        # fp16 scales/salient weights cast to bf16 would lose exactness.
        def keep_dtype(t: Tensor) -> Tensor:
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(moved.device)

        # The dequantized weight is keyed by device and dtype, so drop it; the derived
        # index is a buffer and moves with the others.
        self.clear_weight_cache()
        return super()._apply(keep_dtype, recurse)

    def _load_from_state_dict(self, *args: object, **kwargs: object) -> None:
        self.clear_cache()
        super()._load_from_state_dict(*args, **kwargs)


def _compute_dtype(x: Tensor) -> torch.dtype:
    # CPU half-precision GEMM is slow (and missing on some builds), so fp16
    # inputs are computed in fp32 on CPU; everything else runs in x's dtype.
    if x.dtype == torch.float16 and x.device.type == "cpu":
        return torch.float32
    return x.dtype


# Uncached, inputs of at least this many rows run as one GEMM on the full weight, shorter
# ones as one GEMM per part (see _torch_kernel for the measurements behind the number).
FULL_WEIGHT_MIN_TOKENS = 1024


def _torch_kernel(layer: QuikLinear, x: Tensor) -> Tensor:
    """Portable path: ``y = x[..., N] @ deq(W_q).T + x[..., S] @ W_S.T + b`` in one of two forms.

    - Full weight: scatter the dequantized non-salient columns and the salient weights
      into one (in, out) weight, then one GEMM.  Used for long inputs (prefill), and
      always with ``cache_dequantized``, where that weight is built once and reused.
    - Split: gather ``x[..., N]`` and ``x[..., S]`` and run a GEMM against each compact
      part, so no full weight is built.  Used for short uncached inputs (decode).

    Measured on CPU (one thread, 3 bits, k = 128, the default model's shapes 576x576,
    192x576, 1536x576, 576x1536), uncached: at 2048 tokens the full-weight form was as
    fast (1536x576) or 2-23% faster (the scatter is one pass over the weight, 0.1-0.4 ms,
    while the split form pays for two input gathers and a skinny second GEMM); from 1 to
    512 tokens the split form was 1-25% faster, most at 1-16 tokens, where building the
    full weight costs as much as the GEMM.  Cached, one GEMV on the full weight beat the
    split form on cached parts by 5-8 us per layer and token, hence the cache holds the
    full weight.
    The two forms agree to float rounding, not bit for bit (different summation order).
    """
    if not x.is_floating_point():
        raise TypeError(f"QuikLinear expects a floating-point input, got {x.dtype}")
    dtype = _compute_dtype(x)
    bias = None if layer.bias is None else layer.bias.to(dtype)
    tokens = x.numel() // max(layer.in_features, 1)
    if layer.cache_dequantized or layer.k == 0 or tokens >= FULL_WEIGHT_MIN_TOKENS:
        return F.linear(x.to(dtype), layer.cached_weight_t(dtype).t(), bias).to(x.dtype)
    layer.clear_weight_cache()  # caching may have been switched off: release the old weight
    y = _split_linear(layer, x.to(dtype).reshape(-1, layer.in_features), bias)
    return y.view(*x.shape[:-1], layer.out_features).to(x.dtype)


def _split_linear(layer: QuikLinear, x: Tensor, bias: Tensor | None) -> Tensor:
    """(tokens, in) -> (tokens, out) as x[:, N] @ deq(W_q).T + x[:, S] @ W_S.T + b, in x's dtype."""
    rows_t = layer._quantized_rows_t().to(x.dtype)
    y = F.linear(x.index_select(1, layer.nonsalient_index()), rows_t.t(), bias)
    # In place: linear's backward does not need its output, so autograd allows it.
    return y.addmm_(x.index_select(1, layer.salient_idx.long()), layer.salient_weight.t().to(x.dtype))


def _check_quantized(
    codes: Tensor,
    scales: Tensor,
    zeros: Tensor,
    g_idx: Tensor,
    salient: Tensor,
    salient_weight: Tensor,
    bias: Tensor | None,
) -> None:
    """Reject quantizer output that packing would not reproduce exactly."""
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


def set_dequantized_cache(model: nn.Module, enabled: bool = True) -> int:
    """Switch the dequantized-weight cache of every QuikLinear in ``model``; returns how many.

    Worth it when a packed model runs many short forwards (zero-shot scoring, decoding): each
    layer then dequantizes once instead of every call, for one full weight copy in the compute dtype.
    """
    layers = [m for m in model.modules() if isinstance(m, QuikLinear)]
    for layer in layers:
        layer.cache_dequantized = enabled
    return len(layers)


def nonsalient_columns(in_features: int, salient: Tensor) -> Tensor:
    """The complement of ``salient`` in ``range(in_features)``, ascending, int64."""
    keep = torch.ones(in_features, dtype=torch.bool, device=salient.device)
    keep[salient.long()] = False
    return keep.nonzero().squeeze(1)


register_kernel("torch", _torch_kernel)
