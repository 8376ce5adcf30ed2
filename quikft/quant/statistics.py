"""Streamed statistics of every projection's inputs: the Hessian for GPTQ and the per-column norms
for the saliency metric, gathered by hooks while a block runs on the calibration activations.

Which projections read the same input (and so share one accumulator) is found at run time, by
tensor identity on a probe batch (:func:`find_input_groups`). Experts of an MoE layer get
statistics from the tokens their router sends them. An expert that receives fewer than
``expert_min_tokens`` calibration tokens takes its statistics from *every* token entering its MoE
layer instead (a second pass in which that expert also runs on all tokens, its output discarded).
A projection outside routed experts that no token reaches at all has no statistics; it is then
quantized by RTN with salient columns from the weight term alone (:mod:`quikft.quant.layer`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from quikft import arch
from quikft.arch import RoutedExperts
from quikft.quant.blocks import (
    Block,
    BlockInputs,
    StopForward,
    like_output,
    onloaded,
    patched_forwards,
    run_block,
)
from quikft.quant.gptq import HessianAccumulator
from quikft.quant.saliency import ColumnStats

# How a layer's statistics were gathered (LayerReport.statistics).
ROUTED = "routed"  # the tokens that reached it (for an expert: the tokens its router sent)
ALL_TOKENS = "all-tokens"  # a starved expert: every token entering its MoE layer
NO_TOKENS = "none"  # nothing reached it: RTN, salient columns by the weight term


@dataclass
class LayerStats:
    """Streamed statistics of one projection's inputs (shared by projections reading one tensor)."""

    hessian: HessianAccumulator | None
    columns: ColumnStats

    @property
    def tokens(self) -> int:
        return self.columns.n_tokens

    def hessian_matrix(self) -> torch.Tensor | None:
        """``2/n X^T X``, or None when there is none (not gathered, or no token reached the layer)."""
        return self.hessian.hessian() if self.hessian is not None and self.tokens else None


@dataclass(frozen=True)
class Gather:
    """What one block's statistics pass gathers: X^T X too (GPTQ, the measurement) or only the column
    norms (salient selection), and the tokens below which an expert takes all of its layer's tokens."""

    hessian: bool = True
    expert_min_tokens: int = 128


@dataclass
class BlockStatistics:
    """One block's statistics: per layer, how they were gathered and the tokens routed to it."""

    stats: dict[str, LayerStats]
    how: dict[str, str]
    tokens: dict[str, int]
    groups: list[tuple[str, ...]]


def _first_input(args: tuple) -> torch.Tensor:
    return args[0]


@torch.no_grad()
def find_input_groups(block: nn.Module, layers: dict[str, nn.Module], inputs: BlockInputs,
                      index: int) -> list[tuple[str, ...]]:
    """Projections that read the very same input tensor, found on the first calibration batch.

    A hook keeps every input each projection receives; projections with the same sequence of
    tensor objects share one accumulator (the input is identical, and X^T X is the dominant cost
    of the statistics pass). Projections the probe never reaches stay on their own.
    """
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = [module.register_forward_hook(lambda m, args, out, n=name: seen[n].append(_first_input(args)))
               for name, module in layers.items()]
    try:
        hidden = inputs.batches[0]
        call = inputs.call(index, hidden)
        block(hidden, *call.args, **call.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    groups: dict[tuple, list[str]] = {}
    for name, tensors in seen.items():
        key = tuple(id(t) for t in tensors) if tensors else (name,)
        groups.setdefault(key, []).append(name)
    return [tuple(group) for group in groups.values()]


class _SharedInputHook:
    """Feeds one group's accumulator: within a block forward, the first member to see a tensor adds
    it and the others skip that same object; every member's tensors are kept until the block's
    forward ends, when :meth:`end_round` checks that all members saw the same ones."""

    def __init__(self, stats: LayerStats, members: tuple[str, ...]):
        self.stats = stats
        self.seen: dict[str, list[torch.Tensor]] = {name: [] for name in members}

    def hook(self, name: str) -> Callable:
        def record(_module, args, _out):
            x = _first_input(args)  # the object itself: identity is what groups members
            if not any(x is t for tensors in self.seen.values() for t in tensors):
                if self.stats.hessian is not None:
                    self.stats.hessian.add_batch(x)
                self.stats.columns.update(x)
            self.seen[name].append(x)
        return record

    def end_round(self) -> None:
        if len({tuple(id(t) for t in tensors) for tensors in self.seen.values()}) > 1:
            raise RuntimeError(f"projections {', '.join(self.seen)} read one input tensor in the probe batch but "
                               f"different ones later; their statistics cannot be shared")
        for tensors in self.seen.values():
            tensors.clear()


@contextlib.contextmanager
def streaming_statistics(block: nn.Module, layers: dict[str, nn.Module], groups: list[tuple[str, ...]],
                         hessian: bool = True) -> Iterator[dict[str, LayerStats]]:
    """Hooks that stream each projection's inputs into a Hessian and column statistics, one shared
    accumulator per group of :func:`find_input_groups`. Without ``hessian`` (salient selection
    only) X^T X is skipped."""
    stats: dict[str, LayerStats] = {}
    feeders = []
    handles = []
    for group in groups:
        in_features = arch.dims_of(layers[group[0]])[0]
        shared = LayerStats(HessianAccumulator(in_features) if hessian else None, ColumnStats(in_features))
        stats.update(dict.fromkeys(group, shared))
        feeder = _SharedInputHook(shared, group)
        feeders.append(feeder)
        handles += [layers[name].register_forward_hook(feeder.hook(name)) for name in group]

    def end_of_block_forward(_module, _args, _out):
        for feeder in feeders:
            feeder.end_round()

    handles.append(block.register_forward_hook(end_of_block_forward))
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def _starved_experts(experts: dict[str, RoutedExperts], layers: dict[str, nn.Module],
                     stats: dict[str, LayerStats], min_tokens: int) -> dict[str, set[int]]:
    """Experts (by module name) whose input projection received fewer than ``min_tokens`` tokens."""
    starved: dict[str, set[int]] = {}
    for module_name, module in experts.items():
        for e in range(module.n_experts):
            first = f"{module_name}.{module.projections[0]}.{e}"
            if first in layers and stats[first].tokens < min_tokens:
                starved.setdefault(module_name, set()).add(e)
    return starved


@torch.no_grad()
def collect_statistics(block: Block, gather: Gather, keep_outputs: bool = False
                       ) -> tuple[BlockStatistics, list[torch.Tensor] | None]:
    """Statistics of every layer of one block, and with ``keep_outputs`` the block's outputs of that
    pass (its outputs with the current weights; otherwise None: a kept copy would cost one more set
    of activations while the block is quantized)."""
    module, layers = block.module, block.layers
    groups = find_input_groups(module, layers, block.inputs, block.index)
    with streaming_statistics(module, layers, groups, gather.hessian) as stats:
        outputs = run_block(module, block.inputs, block.index, keep=keep_outputs)
    found = BlockStatistics(stats, {name: ROUTED if stats[name].tokens else NO_TOKENS for name in layers},
                            {name: stats[name].tokens for name in layers}, groups)
    starved = _starved_experts(block.experts, layers, stats, gather.expert_min_tokens)
    if starved:
        _all_token_statistics(block, starved, gather.hessian, found)
    return found, outputs


def _all_token_statistics(block: Block, starved: dict[str, set[int]], hessian: bool, found: BlockStatistics) -> None:
    """The documented rule for starved experts: statistics from every token of their MoE layer."""
    names = [f"{m}.{proj}.{e}" for m, chosen in starved.items() for e in sorted(chosen)
             for proj in block.experts[m].projections]
    names = [name for name in names if name in block.layers]
    with contextlib.ExitStack() as stack:
        for module_name, chosen in starved.items():
            stack.enter_context(arch.route_all_tokens(block.experts[module_name], chosen))
        extra = stack.enter_context(streaming_statistics(block.module, {n: block.layers[n] for n in names},
                                                         [(n,) for n in names], hessian))
        run_block(block.module, block.inputs, block.index, keep=False)
    for name in names:
        found.stats[name] = extra[name]
        found.how[name] = ALL_TOKENS


def uniform_stats(in_features: int) -> ColumnStats:
    """Column statistics that weigh every column alike (the metric then uses the weight term alone)."""
    stats = ColumnStats(in_features)
    stats.update(torch.ones(1, in_features))
    return stats


@torch.no_grad()
def head_statistics(model, layout: arch.ModelLayout, inputs: BlockInputs, device: str,
                    hessian: bool = True) -> LayerStats:
    """Statistics of the output layer's inputs: the final norm (and whatever else the model applies
    after its blocks) of the calibration activations leaving the last block.

    The model's own forward computes them: every block is a stub and the last one returns the
    stored activations, so no family's final stage has to be known here.
    """
    head = model.get_submodule(arch.head_name(model))
    in_features = arch.dims_of(head)[0]
    stats = LayerStats(HessianAccumulator(in_features) if hessian else None, ColumnStats(in_features))
    blocks = list(layout.blocks)
    current: dict = {}

    def stub(index):
        def forward(*args, **kwargs):
            if index < len(blocks) - 1:
                return inputs.template
            return like_output(inputs.template, current["hidden"])
        return forward

    def catch(module, args):
        x = _first_input(args)
        if stats.hessian is not None:
            stats.hessian.add_batch(x)
        stats.columns.update(x)
        raise StopForward

    ids = torch.zeros(1, inputs.batches[0].shape[1], dtype=torch.long, device=device)
    handle = head.register_forward_pre_hook(catch)
    try:
        with onloaded(model, layout, device), patched_forwards(blocks, stub):
            for hidden in inputs.batches:
                current["hidden"] = hidden
                with contextlib.suppress(StopForward):
                    model(input_ids=ids.expand(hidden.shape[0], -1), use_cache=False)
    finally:
        handle.remove()
    return stats
