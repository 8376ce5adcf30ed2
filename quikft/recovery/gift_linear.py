"""``GiftLinear``: the GIFT-SW training layer (the README's "Recover (GIFT-SW)").

A linear layer split into a trainable salient slice ``W_S`` (an fp32 ``nn.Parameter``,
out x k) and a frozen rest ``W_N`` (zeros at the salient columns). In training mode the
forward injects Gaussian noise scaled by each row's quantization step into the frozen part:

    y = x · (W_N + ½·diag(Δ)·Ω ⊙ M_N)ᵀ + x[:, S] · W_Sᵀ + b,     Ω ~ N(0, 1) every forward

The frozen rest comes from one of two sources, without a second full copy of W:

- **Pre-GIFT-SW** (:meth:`GiftLinear.from_linear`): the full-precision weight itself, whose
  salient columns are zeroed in place (they live in ``W_S`` now).
- **Post-GIFT-SW / Salient-FT** (:meth:`GiftLinear.from_quik`): a :class:`QuikLinear`'s
  packed codes and scales, dequantized on the fly (or cached). The codes are the source of
  truth and are never touched, so exporting gives back bit-identical codes.

The forward is one GEMM with the step's weight ``W_N + noise`` whose salient columns are
overwritten by ``W_S`` (:class:`SalientLinear`); its backward forms the input gradient from that
same weight and the weight gradient for the k salient columns only, ``dyᵀ · x[:, S]`` (out x k):
no full-size weight gradient is ever built. Compared with a frozen GEMM plus a separate salient
GEMM this saves, per layer and step, the skinny GEMM in each direction, the sum of the two
outputs and the scatter of the salient input gradient back into x's gradient.

The noise comes from torch's global generator on the weight's device, so
``torch.utils.checkpoint`` (which saves and restores that generator's state) recomputes
the same noise in the backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quikft import arch
from quikft.nn.quik_linear import QuikLinear, nonsalient_columns
from quikft.quant.grid import paper_step


class GiftLinear(nn.Module):
    """Salient columns trainable, the rest frozen (FP or quantized) with optional step-scaled noise."""

    def __init__(self, frozen: Tensor | QuikLinear, salient_idx: Tensor, bias: Tensor | None = None,
                 noise_bits: int | None = None, cache_base: bool = False) -> None:
        """``frozen`` is the source of ``W_N``: a full-precision weight, whose salient columns move into
        ``salient_weight`` and are zeroed in place, or a packed layer, whose stored salient columns are
        the starting values (its ``salient_idx`` and ``bias`` are then the ones to pass)."""
        super().__init__()
        self.quik = frozen if isinstance(frozen, QuikLinear) else None  # a submodule: its buffers follow .to()
        if self.quik is not None:
            base_weight, salient_weight = None, self.quik.salient_weight.float()
            self.out_features, self.in_features = self.quik.out_features, self.quik.in_features
        else:
            base_weight, salient_idx = frozen, salient_idx.to(frozen.device, torch.int64)
            salient_weight = frozen.index_select(1, salient_idx).float()
            frozen.index_fill_(1, salient_idx, 0.0)  # W_N: the salient columns live in W_S now
            self.out_features, self.in_features = frozen.shape
        self.k = int(salient_idx.numel())
        self.register_buffer("base_weight", base_weight)
        self.register_buffer("salient_idx", salient_idx.to(torch.int64).clone())
        self.register_buffer("nonsalient_idx", nonsalient_columns(self.in_features, self.salient_idx))
        # fp32 even when the model runs in bf16: bf16 resolves about 0.4% of a weight, so most
        # lr-1e-4 updates would round away.
        self.salient_weight = nn.Parameter(salient_weight.detach().to(torch.float32).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.cache_base = cache_base
        self._base_cache: Tensor | None = None
        self.noise_bits = noise_bits
        self.noise = noise_bits is not None
        self.register_buffer("noise_std", self._noise_std(noise_bits))

    # ---------------------------------------------------------------- construction / export

    @classmethod
    def from_linear(cls, linear: nn.Linear, salient_idx: Tensor, noise_bits: int | None = None) -> GiftLinear:
        """Pre-GIFT-SW: take over ``linear``'s weight, zeroing its salient columns in place."""
        return cls(linear.weight.data, salient_idx, linear.bias, noise_bits)

    @classmethod
    def from_quik(cls, quik: QuikLinear, noise_bits: int | None = None, cache_base: bool = False) -> GiftLinear:
        """Post-GIFT-SW / Salient-FT: the frozen rest is the packed layer's quantized part."""
        return cls(quik, quik.salient_idx, quik.bias, noise_bits, cache_base)

    def to_linear(self) -> nn.Linear:
        """Pre mode: an ``nn.Linear`` with the trained salient columns written back (in place)."""
        if self.base_weight is None:
            raise TypeError("to_linear() is for layers built from an nn.Linear; use to_quik()")
        weight = self.base_weight
        with torch.no_grad():
            weight.index_copy_(1, self.salient_idx, self.salient_weight.detach().to(weight.dtype))
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device="meta", dtype=weight.dtype)
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias, requires_grad=False)
        return linear

    def to_quik(self) -> QuikLinear:
        """Post mode: the packed layer with the trained salient columns (rounded to fp16, its storage)."""
        if self.quik is None:
            raise TypeError("to_quik() is for layers built from a QuikLinear; use to_linear()")
        # Dropping the prepared kernels first puts back any stored tensor a kernel held in its own form
        # (so the copy below lands in the layer's buffer) and no kernel keeps the old salient columns.
        self.quik.clear_cache()
        with torch.no_grad():
            self.quik.salient_weight.copy_(self.salient_weight.detach())
        return self.quik

    # ---------------------------------------------------------------- forward

    def frozen_weight(self, dtype: torch.dtype) -> Tensor:
        """``W_N``: (out, in), exact zeros at the salient columns, no gradient."""
        if self.base_weight is not None:
            return self.base_weight.to(dtype)
        if self._base_cache is not None and self._base_cache.dtype == dtype:
            return self._base_cache
        with torch.no_grad():
            weight = self.quik.dequantize_weight(dtype)
        self._base_cache = weight if self.cache_base else None
        return weight

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        frozen = self.frozen_weight(dtype)
        # SalientLinear writes W_S into the weight it gets: give it a fresh one (the noisy copy, or a clone).
        weight = self.add_noise(frozen) if self.training and self.noise else frozen.clone()
        return SalientLinear.apply(x, self.salient_weight, weight, self)

    def add_noise(self, weight: Tensor) -> Tensor:
        """A new ``weight + ½·Δ_i·N(0, 1)``, no gradient. Noise drawn at the salient columns is
        harmless: :class:`SalientLinear` overwrites those columns with ``W_S``."""
        with torch.no_grad():
            omega = torch.randn(weight.shape, device=weight.device, dtype=torch.float32)
            return omega.mul_(self.noise_std[:, None]).to(weight.dtype).add_(weight)

    # ---------------------------------------------------------------- helpers

    def _noise_std(self, noise_bits: int | None) -> Tensor:
        """½·Δ per row, Δ from the α search over the frozen non-salient weights at ``noise_bits``."""
        if noise_bits is None:
            return torch.zeros(self.out_features)
        with torch.no_grad():
            frozen = self.frozen_weight(torch.float32).index_select(1, self.nonsalient_idx)
            self._base_cache = None
            return 0.5 * paper_step(frozen, noise_bits).squeeze(1)

    def _apply(self, fn, recurse: bool = True):
        self._base_cache = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        source = "quantized" if self.quik is not None else "fp"
        return (f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}, "
                f"frozen={source}, noise_bits={self.noise_bits if self.noise else None}")


class SalientLinear(torch.autograd.Function):
    """``y = x · Wᵀ + b`` where ``W`` is ``weight`` (frozen, the caller's fresh copy) with the salient
    columns of ``layer`` set to ``salient_weight`` and ``b`` is ``layer``'s bias; gradients for ``x``
    and ``salient_weight`` only.

    Runs in ``weight``'s dtype; the salient weight's gradient comes back in its own dtype (fp32).
    """

    @staticmethod
    def forward(ctx, x: Tensor, salient_weight: Tensor, weight: Tensor, layer: GiftLinear) -> Tensor:
        dtype = weight.dtype
        salient_idx = layer.salient_idx
        bias = None if layer.bias is None else layer.bias.to(dtype)
        weight.index_copy_(1, salient_idx, salient_weight.detach().to(dtype))
        x_in = x.to(dtype)
        ctx.save_for_backward(weight, x_in.index_select(-1, salient_idx) if salient_weight.requires_grad else None)
        ctx.x_dtype, ctx.salient_dtype = x.dtype, salient_weight.dtype
        return F.linear(x_in, weight, bias)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        weight, x_salient = ctx.saved_tensors
        grad_y = grad_y.to(weight.dtype)
        grad_x = (grad_y @ weight).to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        grad_salient = None
        if ctx.needs_input_grad[1]:
            # flatten, not reshape(-1, k): a layer with no salient columns (k = 0) has an empty x_salient
            grad_salient = grad_y.flatten(0, -2).t() @ x_salient.flatten(0, -2)
            grad_salient = grad_salient.to(ctx.salient_dtype)
        return grad_x, grad_salient, None, None


def gift_layers(model: nn.Module) -> dict[str, GiftLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, GiftLinear)}


def wrap_for_training(model: nn.Module, noise_bits: int | None, salient: dict[str, Tensor] | None = None,
                      cache_base: bool = False) -> dict[str, GiftLinear]:
    """Freeze ``model`` and replace its linears by :class:`GiftLinear`.

    Every :class:`QuikLinear` is wrapped (Post mode); with ``salient`` (Pre mode) the named
    projections are (``nn.Linear`` or ``Conv1D``, see :mod:`quikft.arch`), with those column sets.
    Returns the wrapped layers by name.
    """
    model.requires_grad_(False)
    targets: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuikLinear) or (salient and name in salient):
            targets[name] = module
    if not targets:
        raise ValueError("no layer to train: the model has no quantized layers and no salient sets were given")
    for name, module in targets.items():
        if isinstance(module, QuikLinear):
            layer = GiftLinear.from_quik(module, noise_bits, cache_base)
        elif arch.is_projection(module):
            layer = GiftLinear.from_linear(arch.as_linear(module), salient[name], noise_bits)
        else:
            raise TypeError(f"{name} is a {type(module).__name__}, not a linear layer")
        model.set_submodule(name, layer)
    return gift_layers(model)


def unwrap_after_training(model: nn.Module) -> None:
    """Put the trained layers back as ``QuikLinear`` (Post) or ``nn.Linear`` (Pre), in place."""
    for name, layer in gift_layers(model).items():
        model.set_submodule(name, layer.to_quik() if layer.quik is not None else layer.to_linear())
