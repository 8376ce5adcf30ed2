"""What enters each decoder block, how a block runs, and the block as the block loop hands it to its steps.

The hidden states entering block 0 are caught from the model's own forward. What each block is called
with besides them (masks, rotary embeddings, positions) is captured from the model's own forward for
every block too, since families pass different arguments to different layers (sliding-window and
global attention alternate in Gemma). Nothing here knows a model family: the blocks and their
projections come from :mod:`quikft.arch`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quikft import arch
from quikft.arch import RoutedExperts
from quikft.quant.activations import ActivationStore
from quikft.quant.gptq import QuantResult


class StopForward(Exception):
    """Raised by a patched module once what was needed is recorded."""


@dataclass
class BlockCall:
    """The arguments a block receives besides its hidden states (positional and keyword)."""

    args: tuple
    kwargs: dict


@dataclass
class BlockInputs:
    """Hidden states entering the current block, in batches, plus every block's call arguments
    (captured once per batch size from the model's own forward) and one real block output, whose
    structure stubs imitate."""

    batches: list[torch.Tensor] | ActivationStore
    calls: list[dict[int, BlockCall]]
    template: Any = None

    def call(self, index: int, hidden: torch.Tensor) -> BlockCall:
        return self.calls[index][hidden.shape[0]]

    def advance(self, outputs: list[torch.Tensor] | ActivationStore) -> None:
        """The block's outputs become the next block's inputs (a disk store's old files are removed)."""
        if isinstance(self.batches, ActivationStore):
            self.batches.close()
        self.batches = outputs


@dataclass
class Block:
    """One decoder block as :func:`quikft.quant.loop.run_blocks` hands it to its steps: the module, its
    quantizable projections and routed experts (by name relative to the block, known once its weights
    are present and its experts unfused), the inputs entering it, and what steps leave for later steps."""

    index: int
    module: nn.Module
    prefix: str  # the block's full module name
    inputs: BlockInputs
    layers: dict[str, nn.Module] = field(default_factory=dict)
    experts: dict[str, RoutedExperts] = field(default_factory=dict)
    unfused: list[str] = field(default_factory=list)  # full names of its experts modules, unfused
    results: dict[str, QuantResult] = field(default_factory=dict)  # full layer name -> its quantization

    def full_name(self, name: str) -> str:
        return f"{self.prefix}.{name}"


@contextlib.contextmanager
def patched_forwards(modules: list[nn.Module], make: Callable[[int], Callable]) -> Iterator[None]:
    """Replace each module's forward by ``make(i)`` (an instance attribute) for the duration."""
    for i, module in enumerate(modules):
        module.forward = make(i)
    try:
        yield
    finally:
        for module in modules:
            del module.forward


def _split_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, BlockCall]:
    kwargs = dict(kwargs)
    hidden = args[0] if args else kwargs.pop("hidden_states")
    for key in ("past_key_values", "past_key_value"):
        kwargs.pop(key, None)
    return hidden, BlockCall(tuple(args[1:]), kwargs)


def block_output(out) -> torch.Tensor:
    """The hidden states of a block's output (a tensor, or a tuple led by it)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def like_output(template, hidden: torch.Tensor):
    """``hidden`` in the structure of a real block output (a tensor, or a tuple led by it)."""
    return (hidden, *template[1:]) if isinstance(template, tuple) else hidden


@torch.no_grad()
def capture_block_inputs(model, layout: arch.ModelLayout, calib: torch.Tensor, batch_size: int,
                         device: str) -> BlockInputs:
    """Run the model's embedding stage on ``calib`` and catch what enters every block.

    Block 0's hidden states are caught for every batch. Every block's other arguments come from
    one forward per distinct batch size in which each block is a stub that records its call and
    returns a real block-0 output (so code between blocks sees the right structure).
    """
    blocks = list(layout.blocks)
    caught: dict = {}

    def catch_first(index):
        def forward(*args, **kwargs):
            caught["hidden"], caught["call"] = _split_call(args, kwargs)
            raise StopForward
        return forward

    batches, first_calls, first_ids = [], {}, {}
    with onloaded(model, layout, device), patched_forwards(blocks[:1], catch_first):
        for start in range(0, calib.shape[0], batch_size):
            ids = calib[start:start + batch_size].to(device)
            with contextlib.suppress(StopForward):
                model(input_ids=ids, use_cache=False)
            batches.append(caught["hidden"].detach())
            first_calls.setdefault(ids.shape[0], caught["call"])
            first_ids.setdefault(ids.shape[0], (ids, len(batches) - 1))
    inputs = BlockInputs(batches, [{} for _ in blocks])
    for size, (ids, batch) in first_ids.items():
        inputs.calls[0][size] = first_calls[size]
        with on_device(blocks[0], device):
            inputs.template = blocks[0](batches[batch], *first_calls[size].args, **first_calls[size].kwargs)
        _record_calls(model, layout, ids, inputs, device)
    return inputs


def _record_calls(model, layout: arch.ModelLayout, ids: torch.Tensor, inputs: BlockInputs, device: str) -> None:
    blocks = list(layout.blocks)

    def stub(index):
        def forward(*args, **kwargs):
            hidden, call = _split_call(args, kwargs)
            inputs.calls[index][ids.shape[0]] = call
            if index == len(blocks) - 1:
                raise StopForward
            return inputs.template
        return forward

    with onloaded(model, layout, device), patched_forwards(blocks, stub), contextlib.suppress(StopForward):
        model(input_ids=ids, use_cache=False)


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs, index: int, keep: bool = True
              ) -> list[torch.Tensor] | ActivationStore | None:
    """Block ``index`` on every batch; the outputs are kept like the inputs (a list or a store), or
    dropped batch by batch with ``keep=False`` (a pass run only for its hooks)."""
    outputs = None
    if keep:
        outputs = inputs.batches.like() if isinstance(inputs.batches, ActivationStore) else []
    for hidden in inputs.batches:
        call = inputs.call(index, hidden)
        output = block_output(block(hidden, *call.args, **call.kwargs))
        if outputs is not None:
            outputs.append(output)
    return outputs


@contextlib.contextmanager
def on_device(module: nn.Module, device: str) -> Iterator[nn.Module]:
    """``module`` on ``device`` for the duration, back where it was afterwards."""
    home = next(module.parameters()).device
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


@contextlib.contextmanager
def onloaded(model, layout: arch.ModelLayout, device: str) -> Iterator[None]:
    """Everything outside the decoder blocks (embeddings, rotary tables, final norm, head) on ``device``."""
    inside = {id(m) for block in layout.blocks for m in block.modules()} | {id(layout.blocks)}
    outside = [m for m in model.modules() if id(m) not in inside]
    # Tensors still on the meta device (a head not read yet) stay there.
    homes = [{name: t.device for name, t in [*m._parameters.items(), *m._buffers.items()]
              if t is not None and not t.is_meta} for m in outside]
    target = torch.device(device)
    if all(d == target for home in homes for d in home.values()):
        yield
        return
    for module in outside:
        module._apply(lambda t: t if t.is_meta else t.to(target), recurse=False)
    try:
        yield
    finally:
        for module, home in zip(outside, homes, strict=True):
            first = next(iter(home.values()), None)
            if first is not None:
                module._apply(lambda t, d=first: t if t.is_meta else t.to(d), recurse=False)
