"""Routed experts as one linear layer per expert and projection.

transformers 5 stores the experts of a mixture-of-experts layer as 3-D parameters
(``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I], or their transposes) in a module
decorated with ``use_experts_implementation``, whose flags (``has_gate``, ``has_bias``,
``is_transposed``, ``has_post_expert_norm``) describe the computation every one of its
implementations performs. Quantization, packing and recovery all work on 2-D linear layers,
so :func:`unfuse_experts` turns such a module into the same module with each 3-D parameter
replaced by an ``nn.ModuleList`` of per-expert ``nn.Linear`` layers (views of the 3-D storage,
so nothing is copied), and a forward that routes tokens exactly as the eager implementation
does. The per-expert layers can then be swapped for ``QuikLinear`` (checkpoints) or
``GiftLinear`` (recovery) like any other linear, and hooks on them see exactly the tokens the
router sends to that expert.

State-dict names follow the module tree: expert ``e`` of ``gate_up_proj`` is
``<experts>.gate_up_proj.<e>``. :func:`fuse_experts` restores the 3-D parameters (for saving a
plain transformers checkpoint) by stacking the per-expert weights, which stay correct however
the layers were moved between devices.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator

import torch
from torch import Tensor, nn

# Flags the transformers experts decorator sets on every instance; their presence is how a
# module declares the standard experts computation.
INTERFACE_FLAGS = ("has_gate", "has_bias", "is_transposed")


class UnsupportedExpertsError(ValueError):
    """Expert weights we cannot route tokens to (a 3-D layout without the experts interface)."""


def follows_experts_interface(module: nn.Module) -> bool:
    """True for a transformers experts module whose flags describe its computation."""
    return all(hasattr(module, flag) for flag in INTERFACE_FLAGS) and hasattr(module, "_apply_gate")


def has_fused_experts(module: nn.Module) -> bool:
    """True if ``module`` itself holds expert weights stacked along dim 0: a module of the experts
    interface, or one with at least two 3-D parameters of the same leading size (a convolution's
    single 3-D kernel is not an experts module)."""
    if follows_experts_interface(module):
        return True
    if isinstance(module, nn.modules.conv._ConvNd):
        return False
    leading = [p.shape[0] for p in module.parameters(recurse=False) if p.dim() == 3]
    return len(leading) >= 2 and len(set(leading)) == 1


def projection_names(module: nn.Module) -> tuple[str, str]:
    """The (input-side, output-side) projection attributes of an experts module."""
    return ("gate_up_proj" if module.has_gate else "up_proj"), "down_proj"


class RoutedExperts(nn.Module):
    """Mixin placed first in the class of an unfused experts module (see the module docstring).

    Never instantiated on its own: :func:`unfuse_experts` swaps an existing module's class for
    ``(RoutedExperts, OriginalExperts)``, so the module keeps its attributes, its activation and
    its ``_apply_gate`` (e.g. a clamped or interleaved gate), and only the weights and the
    forward change.
    """

    _quikft_original: type
    # Experts that see every token during a statistics pass (see ``route_all_tokens``).
    _quikft_route_all: frozenset[int] = frozenset()

    @property
    def projections(self) -> tuple[str, str]:
        return projection_names(self)

    @property
    def n_experts(self) -> int:
        return len(getattr(self, self.projections[0]))

    def forward(self, *args, **kwargs) -> Tensor:
        hidden, index, weights = _routing_arguments(self._quikft_original, args, kwargs)
        first, second = (getattr(self, name) for name in self.projections)
        out = torch.zeros_like(hidden)
        # (top_k, tokens): torch.where on it yields the (slot, token) order of the eager loop.
        slots = index.t()
        for e in range(len(first)):
            slot, token = torch.where(slots == e)
            forced = e in self._quikft_route_all
            if not forced and token.numel() == 0:
                continue
            h = first[e](hidden if forced else hidden[token])
            h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
            y = second[e](h)
            if getattr(self, "has_post_expert_norm", False):
                y = self.post_expert_norm(y)
            if forced:
                continue  # statistics only: this pass's output is discarded by the caller
            out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
        return out


def _routing_arguments(original: type, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor, Tensor]:
    """(hidden states, top-k expert index, top-k weights), however the caller named them."""
    if not kwargs:
        return args[0], args[1], args[2]
    bound = inspect.signature(original.forward).bind(None, *args, **kwargs)
    values = list(bound.arguments.values())[1:]
    return values[0], values[1], values[2]


_ROUTED_CLASSES: dict[type, type] = {}


def _routed_class(original: type) -> type:
    if original not in _ROUTED_CLASSES:
        _ROUTED_CLASSES[original] = type(f"Routed{original.__name__}", (RoutedExperts, original), {})
    return _ROUTED_CLASSES[original]


def unfuse_experts(module: nn.Module) -> RoutedExperts:
    """Turn an experts module with 3-D weights into per-expert linears, in place (no copy).

    Raises :class:`UnsupportedExpertsError` for 3-D weights outside the experts interface:
    without it, which tokens reach which expert is unknown.
    """
    if isinstance(module, RoutedExperts):
        return module
    if not follows_experts_interface(module):
        raise UnsupportedExpertsError(
            f"{type(module).__name__} stores expert weights as 3-D parameters without transformers' experts "
            f"interface (use_experts_implementation), so quikft cannot route calibration tokens to its experts")
    for proj in projection_names(module):
        weight = module._parameters.pop(proj)
        bias = module._parameters.pop(f"{proj}_bias", None) if module.has_bias else None
        module.register_module(proj, nn.ModuleList(
            _expert_linear(weight, bias, e, module.is_transposed) for e in range(weight.shape[0])))
    original = type(module)
    module.__class__ = _routed_class(original)
    module._quikft_original = original
    return module


def _expert_linear(weight: Tensor, bias: Tensor | None, e: int, transposed: bool) -> nn.Linear:
    """Expert ``e`` of a 3-D weight as an ``nn.Linear`` whose parameters view the 3-D storage."""
    w = weight.data[e].t() if transposed else weight.data[e]
    linear = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta", dtype=w.dtype)
    linear.weight = nn.Parameter(w, requires_grad=weight.requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias.data[e], requires_grad=bias.requires_grad)
    return linear


def fuse_experts(module: RoutedExperts) -> nn.Module:
    """Put the 3-D parameters back (stacking the per-expert weights, which must be ``nn.Linear``)."""
    for proj in module.projections:
        layers = module._modules.pop(proj)
        if not all(isinstance(layer, nn.Linear) for layer in layers):
            raise TypeError(f"cannot fuse {proj}: its experts are no longer plain linear layers")
        weights = [layer.weight.data.t() if module.is_transposed else layer.weight.data for layer in layers]
        module.register_parameter(proj, nn.Parameter(torch.stack(weights), requires_grad=False))
        if module.has_bias:
            module.register_parameter(f"{proj}_bias", nn.Parameter(
                torch.stack([layer.bias.data for layer in layers]), requires_grad=False))
    module.__class__ = module._quikft_original
    del module._quikft_original
    return module


@contextlib.contextmanager
def route_all_tokens(module: RoutedExperts, experts: set[int]) -> Iterator[None]:
    """Within the block, the given experts also run on every token entering the layer; their
    outputs are discarded, so only statistics hooks on their layers see the extra tokens."""
    module._quikft_route_all = frozenset(experts)
    try:
        yield
    finally:
        del module._quikft_route_all
