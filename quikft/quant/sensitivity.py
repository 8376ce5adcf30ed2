"""Layer sensitivity: how much the model's loss grows per unit of a layer's output error.

``--target-bpw`` measures each candidate's output error on its own layer (GPTQ's objective: the
mean squared output error on the calibration tokens). A layer's error costs the model more or less
depending on what the rest of the network does with it: an early layer whose error every later block
carries, or a value projection feeding an attention sink, costs far more per unit than a late MLP whose
error the final norm shrinks. The ``fisher`` budget error therefore weighs each output channel's error by
its **sensitivity**: the mean squared gradient of the calibration loss with respect to that output (the
diagonal of the Fisher information at the layer's output, averaged over tokens). Summed over channels,
``1/2 * sum_i f_i * E_t[e_ti^2]`` is the second-order estimate of the loss increase per token, with the
error assumed independent of the gradient over tokens. Per channel, not per layer, because GPTQ's error
is not spread evenly over a layer's outputs, and the channels the loss is most sensitive to (the
residual stream's few massive ones, which ``o_proj`` and ``down_proj`` write) are where it hurts: the
measurement weighs each output row's GPTQ loss by its channel's sensitivity
(:func:`quikft.quant.budget.measure_layer`).

The pass takes :data:`SENSITIVITY_WINDOWS` calibration windows through the full-precision blocks
keeping each block's inputs, takes the loss gradient at the last hidden state through the model's own
head (every block a stub, as the streamed evaluation does), then walks the blocks backward, recomputing
each from its kept input and collecting the squared gradient at every layer's output. Block weights are
loaded and released by the same source step as every other walk (:class:`~quikft.quant.loop.Walk`), so a
streamed model needs one block in memory at a time, plus the kept inputs (windows x seqlen x hidden
values per block). The forward walk is the block loop's (:func:`~quikft.quant.loop.run_blocks`, with a step
that keeps each block's inputs); the backward walk runs the blocks in reverse, outside it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from quikft import arch
from quikft.quant.blocks import (
    Block,
    BlockInputs,
    block_output,
    capture_block_inputs,
    like_output,
    on_device,
    onloaded,
    patched_forwards,
)
from quikft.quant.loop import BlockStep, Walk, enter_block, run_blocks

# 8 windows of the default 512 tokens (4096 tokens): on the default model the whole pass took about 1.2 s
# per block against 1.9 s for the 32-window statistics forward (AVX2, 2 threads). Whether more windows
# would rank the layers differently was not measured; noise here is one suspect for the plans' under-
# predicted loss (README, accuracy per bit).
SENSITIVITY_WINDOWS = 8
HEAD_CHUNK = 256  # positions per head call: the logits of a whole batch would not fit a large vocabulary

__all__ = ["SENSITIVITY_WINDOWS", "layer_sensitivity"]


def layer_sensitivity(model: nn.Module, layout: arch.ModelLayout, calib: torch.Tensor, walk: Walk,
                      batch_size: int) -> dict[str, torch.Tensor]:
    """Mean squared loss gradient at each output channel of every layer ``layout`` quantizes (a float32
    vector on the CPU), by full name (see the module docstring); layers no token reached are left out.
    Block 0's weights must be present (its inputs are caught by running it), the model's head in memory,
    and every block loadable by ``walk.source``; calibration windows run ``batch_size`` at a time."""
    walk = dataclasses.replace(walk, label="layer sensitivity", first=0)
    windows = calib[:SENSITIVITY_WINDOWS]
    inputs = capture_block_inputs(model, layout, windows, batch_size, walk.device)
    kept = KeepInputs()
    run_blocks(layout, inputs, [kept], walk)
    grads = _head_gradients(model, layout, windows, inputs, walk.device)
    squares: dict[str, list] = {}
    for index in tqdm(reversed(range(len(layout))), total=len(layout), desc=walk.label, unit="block",
                      disable=not walk.progress):
        grads = _block_backward(layout, index, (inputs, kept.inputs[index], grads), walk, squares)
    return {name: (total / count).float().cpu() for name, (total, count) in squares.items() if count}


class KeepInputs(BlockStep):
    """Keeps what entered each block (the backward walk recomputes each block from it)."""

    def __init__(self) -> None:
        self.inputs: list[list[torch.Tensor]] = []

    def before(self, block: Block) -> None:
        self.inputs.append(list(block.inputs.batches))


def _head_gradients(model: nn.Module, layout: arch.ModelLayout, windows: torch.Tensor, inputs: BlockInputs,
                    device: str) -> list[torch.Tensor]:
    """Gradient of the summed next-token loss at the last block's output, one tensor per batch.

    The model's own forward computes the logits (final norm, head, any logit transform), its blocks
    stubbed so that the last one returns the hidden states given, one chunk of positions at a time."""
    blocks, current = list(layout.blocks), {}

    def stub(index: int) -> Callable:
        def forward(*args, **kwargs):
            return like_output(inputs.template, current["hidden"]) if index == len(blocks) - 1 else inputs.template
        return forward

    grads, start = [], 0
    with onloaded(model, layout, device), patched_forwards(blocks, stub), torch.enable_grad():
        for hidden in inputs.batches:
            ids = windows[start:start + hidden.shape[0]].to(device)
            start += hidden.shape[0]
            grads.append(torch.cat([_chunk_gradient(model, ids, hidden, (begin, current))
                                    for begin in range(0, ids.shape[1], HEAD_CHUNK)], dim=1))
    return grads


def _chunk_gradient(model: nn.Module, ids: torch.Tensor, hidden: torch.Tensor, where: tuple[int, dict]
                    ) -> torch.Tensor:
    """The loss gradient at ``hidden[:, begin:begin + HEAD_CHUNK]`` (positions without a next token: zero)."""
    begin, current = where
    end = min(begin + HEAD_CHUNK, ids.shape[1])
    chunk = hidden[:, begin:end].detach().requires_grad_(True)
    current["hidden"] = chunk
    predicted = min(end, ids.shape[1] - 1) - begin  # the last position has no next token
    if predicted <= 0:
        return torch.zeros_like(chunk)
    logits = model(input_ids=ids[:, begin:end], use_cache=False).logits[:, :predicted].float()
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, begin + 1:begin + 1 + predicted].flatten(), reduction="sum")
    return torch.autograd.grad(loss, chunk)[0].detach()


def _block_backward(layout: arch.ModelLayout, index: int, flow: tuple[BlockInputs, list, list], walk: Walk,
                    squares: dict[str, list]) -> list[torch.Tensor]:
    """Recompute block ``index`` from its kept inputs, pull ``grads`` (at its output) back to its input,
    adding each layer's squared output gradient and element count to ``squares``; returns the input gradients."""
    inputs, kept, grads = flow
    block = enter_block(layout, index, inputs, [walk.source])
    handles = [module.register_forward_hook(_collector(squares.setdefault(block.full_name(name), [0.0, 0])))
               for name, module in block.layers.items()]
    upstream = []
    try:
        with on_device(block.module, walk.device), torch.enable_grad():
            for hidden, grad in zip(kept, grads, strict=True):
                x = hidden.detach().requires_grad_(True)
                call = inputs.call(index, x)
                y = block_output(block.module(x, *call.args, **call.kwargs))
                upstream.append(torch.autograd.grad(y, x, grad_outputs=grad.to(y.dtype))[0].detach())
    finally:
        for handle in handles:
            handle.remove()
    walk.source.release(block)
    return upstream


def _collector(total: list) -> Callable:
    """A forward hook adding the squared gradient that reaches the module's output to ``total``: [per-channel
    sums (float64), tokens]."""
    def on_output(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        def on_gradient(grad: torch.Tensor) -> None:
            total[0] = total[0] + grad.float().square().flatten(0, -2).sum(dim=0, dtype=torch.float64)
            total[1] += grad.flatten(0, -2).shape[0]
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(on_gradient)
    return on_output
