"""The kernel registry of :class:`~quikft.nn.QuikLinear`: which implementation runs a layer.

A kernel is registered once with the conditions under which it can run (device, activation
dtype, bit-width, group layout) and a priority; a layer picks the highest-priority kernel that
accepts it the first time it sees a (device, dtype) and keeps that choice until its buffers,
device or input dtype change, so the per-call cost of dispatch is two attribute compares.

Built-in kernels (registered by :mod:`quikft.nn`):

================  =====  ===========================================================
name              prio.  runs
================  =====  ===========================================================
``torch``         0      everywhere; the reference every other kernel is tested against
``cpu-ort``       5      CPU, ONNX Runtime MatMulNBits with fp32 activations, 2/3/4/8-bit codes
``cpu-int4``      10     CPU, 2/3/4-bit codes (PyTorch's int4pack GEMM; bf16 island on x86)
``cpu-int8``      10     CPU, 8-bit codes with one group per row (bf16 island on x86)
``cpu-ort-int8``  15     CPU, ONNX Runtime MatMulNBits with int8 activations, 2/3/4/8-bit codes
``triton``        20     CUDA, fp16/bf16/fp32 activations, every bit-width (Triton)
================  =====  ===========================================================

On a CPU the priority only breaks ties: the kernel of a layer is chosen by measurement, per row
class (decode, prefill), among the kernels the activation policy allows (:mod:`quikft.nn.autotune`).

A kernel that cannot take a layer says why with a :class:`Refusal` (:func:`why_not`): its kind
tells a layer outside the kernel's scope (another device, dtype or bit-width: nothing to note) from
one whose layout is unusual (what ``quikft info`` lists and what the one-time note of a fallback
says), its text is the one line printed.

Adding a kernel takes one module, ``quikft/nn/<name>_kernel.py`` (check returning a
:class:`Refusal`, prepare building a :class:`KernelState` whose ``meta`` is the module's own frozen
dataclass, forward, and ``register_kernel``), one import line in :mod:`quikft.nn` that registers it,
and a row in the table above. tests/test_kernel_conformance.py then holds it to the contract
(precision, restored codes, gradients if it claims them) with no new test; its own test file is for
what is particular to it.
"""

from __future__ import annotations

import dataclasses
import enum
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from quikft.nn.quik_linear import QuikLinear


@dataclass(frozen=True)
class LayerLayout:
    """What a kernel needs to know about a layer to decide whether it can run it."""

    in_features: int
    out_features: int
    bits: int
    k: int
    group_sizes: tuple[int, ...]  # number of stored (non-salient) columns of each group, in storage order
    contiguous_groups: bool  # every group is one run of consecutive stored columns (format 2)

    @property
    def n_quantized(self) -> int:
        return self.in_features - self.k


class RefusalKind(str, enum.Enum):
    """Why a kernel refuses a layer; the values are what ``quikft info --json`` records."""

    # The layer or device is outside what the kernel is for (another device, activation dtype,
    # bit-width, or a missing package): expected, so no note is needed.
    SCOPE = "scope"
    # The kernel is for such layers but this one's layout is unusual (group sizes, format 1):
    # a fallback is noted, and ``quikft info`` lists it as what a re-quantization could gain.
    LAYOUT = "layout"


@dataclass(frozen=True)
class Refusal:
    """Why a kernel cannot run a layer: its kind and one line of text."""

    kind: RefusalKind
    text: str

    def __str__(self) -> str:
        return self.text

    @classmethod
    def scope(cls, text: str) -> Refusal:
        return cls(RefusalKind.SCOPE, text)

    @classmethod
    def layout(cls, text: str) -> Refusal:
        return cls(RefusalKind.LAYOUT, text)


@dataclass
class KernelState:
    """What a kernel prepared for one layer on one (device, dtype): tensors and small metadata.

    ``tensors`` are also registered on the layer as non-persistent buffers ``kernel_<name>``,
    so they count in the model's memory and never reach a checkpoint. ``meta`` is the kernel's
    own frozen dataclass (None when it needs none): what its forward reads besides tensors.
    """

    kernel: QuikKernel
    device: torch.device
    dtype: torch.dtype
    tensors: dict[str, Tensor] = field(default_factory=dict)
    meta: Any = None
    # Memory the kernel holds outside torch tensors (e.g. ONNX Runtime's prepacked weights), so it
    # can be counted beside the buffers.
    hidden_bytes: int = 0

    def __post_init__(self) -> None:
        # Typed and immutable: what prepare decided is read by field name and cannot drift between calls.
        if self.meta is not None and not is_frozen_dataclass(self.meta):
            raise TypeError(f"kernel {self.kernel.name!r}: KernelState.meta must be a frozen dataclass instance, "
                            f"got {type(self.meta).__name__}")

    def salient_copy(self) -> Tensor | None:
        """W_Sᵀ in fp32 when the kernel holds one (``tensors[SALIENT_T]``): then the forward reads
        only that copy, and the layer's fp16 ``salient_weight`` can be dropped and rebuilt exactly
        from it (fp16 -> fp32 -> fp16 is the identity)."""
        return self.tensors.get(SALIENT_T)


SALIENT_T = "salient_t"


def is_frozen_dataclass(value: object) -> bool:
    return (dataclasses.is_dataclass(value) and not isinstance(value, type)
            and type(value).__dataclass_params__.frozen)


def salient_fp32(layer: QuikLinear, dtype: torch.dtype) -> dict[str, Tensor]:
    """``{SALIENT_T: W_Sᵀ in fp32}`` for a model computing in fp32 (or fp16, computed in fp32 on CPUs),
    so a forward runs an fp32 GEMM without converting W_S on every call; empty otherwise."""
    if not layer.k or dtype not in (torch.float32, torch.float16):
        return {}
    return {SALIENT_T: layer.salient_weight.t().float().contiguous()}


# The precision of the activations a kernel feeds its quantized product: the model's own dtype,
# rounded to bf16 (the CPU operators' bf16 island), or quantized to int8 per block (ONNX Runtime).
ACTIVATIONS = ("model", "bf16", "int8")
# What the automatic (measured) choice may use. int8 activations are in because they passed the
# gate: the default model's WikiText-2 perplexity moved by <= 0.5% (README, "CPU kernels").
DEFAULT_ACTIVATIONS = frozenset(ACTIVATIONS)

Check = Callable[[LayerLayout, torch.device, torch.dtype], "Refusal | None"]
Prepare = Callable[["QuikLinear", torch.device, torch.dtype], KernelState]
Forward = Callable[["QuikLinear", KernelState, Tensor], Tensor]
RestoreCodes = Callable[["QuikLinear", KernelState], Tensor]


@dataclass(frozen=True)
class QuikKernel:
    """A forward implementation of QuikLinear and the conditions under which it may run.

    - ``check(layout, device, dtype)``: None if the kernel can run such a layer, else a :class:`Refusal`.
    - ``prepare(layer, device, dtype)``: build the kernel's tensors (repacked codes, ...) and its
      metadata (a frozen dataclass) once.
    - ``forward(layer, state, x)``: ``y = layer(x)``.
    - ``differentiable``: the forward supports autograd to ``x`` (needed when training around
      frozen layers) and to ``salient_weight`` when that requires grad.
    - ``restore_codes(layer, state)``: rebuild the layer's ``qweight`` bit for bit from the
      prepared tensors; kernels that have it let a loader drop the stored codes to save memory.
    """

    name: str
    check: Check
    prepare: Prepare
    forward: Forward
    priority: int = 0
    differentiable: bool = False
    restore_codes: RestoreCodes | None = None
    # The precision of the activations entering the quantized product (one of ACTIVATIONS): the
    # automatic choice only considers kernels whose precision the policy allows.
    activations: str = "model"
    # The forward reads the layer's packed codes (so a loader must not drop them).
    reads_codes: bool = False


_KERNELS: dict[str, QuikKernel] = {}
_NOTED: set[tuple[str, str]] = set()  # (kernel, refusal text) already noted


def register_kernel(kernel: QuikKernel, *, replace: bool = False) -> None:
    """Add ``kernel`` to the registry (``replace`` swaps an existing one of the same name)."""
    if kernel.name in _KERNELS and not replace:
        raise ValueError(f"kernel {kernel.name!r} is already registered")
    _KERNELS[kernel.name] = kernel


def unregister_kernel(name: str) -> None:
    """Remove a registered kernel (the built-in ``torch`` reference included)."""
    del _KERNELS[name]


def get_kernel(name: str) -> QuikKernel:
    try:
        return _KERNELS[name]
    except KeyError:
        raise KeyError(f"kernel {name!r} is not registered; registered: {', '.join(available_kernels())}") from None


def available_kernels() -> list[str]:
    """Names of registered kernels, in selection order (highest priority first)."""
    return [k.name for k in sorted(_KERNELS.values(), key=lambda k: -k.priority)]


NO_AUTOGRAD = Refusal.scope("no autograd support")


def why_not(kernel: QuikKernel, layout: LayerLayout, device: torch.device, dtype: torch.dtype,
            needs_grad: bool = False) -> Refusal | None:
    """Why ``kernel`` cannot run such a layer here (None: it can)."""
    if needs_grad and not kernel.differentiable:
        return NO_AUTOGRAD
    return kernel.check(layout, device, dtype)


def select_kernel(layout: LayerLayout, device: str | torch.device, dtype: torch.dtype,
                  needs_grad: bool = False, forced: str | None = None) -> QuikKernel:
    """The kernel that runs such a layer: ``forced`` if given (it must accept), else by priority."""
    device = torch.device(device)
    if forced is not None:
        kernel = get_kernel(forced)
        reason = why_not(kernel, layout, device, dtype, needs_grad)
        if reason is not None:
            raise RuntimeError(f"kernel {forced!r} cannot run this layer on {device.type} {dtype}: {reason}")
        return kernel
    for name in available_kernels():
        kernel = _KERNELS[name]
        if why_not(kernel, layout, device, dtype, needs_grad) is None:
            return kernel
    raise RuntimeError(f"no registered QuikLinear kernel runs this layer on {device.type} {dtype}")


def note_fallback(layout: LayerLayout, device: torch.device, dtype: torch.dtype, chosen: QuikKernel) -> None:
    """Warn once per (kernel, reason) when a faster kernel exists for the device but refuses a layer."""
    for name in available_kernels():
        kernel = _KERNELS[name]
        if kernel.priority <= chosen.priority:
            return
        reason = kernel.check(layout, device, dtype)
        if reason is not None and reason.kind is RefusalKind.LAYOUT:
            key = (kernel.name, reason.text)
            if key not in _NOTED:
                _NOTED.add(key)
                warnings.warn(f"quikft: kernel {kernel.name!r} cannot run a {layout.out_features}x"
                              f"{layout.in_features} {layout.bits}-bit layer ({reason}); using {chosen.name!r} "
                              f"for such layers", RuntimeWarning, stacklevel=4)

