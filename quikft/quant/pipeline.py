"""Block-sequential quantization of a decoder (SPEC §1, §10.8).

For each decoder block in order: run the calibration activations through the full-precision
block while hooks stream every projection's input statistics (the Hessian for GPTQ and the
per-column norms for the saliency metric); pick each layer's salient columns; quantize each
layer; then recompute the block's outputs *with the quantized weights*, which become the inputs
of the next block (as GPTQ does). Only the current block needs to be on the compute device, so
peak memory is about one block plus the calibration activations.

Nothing here knows a model family: the blocks, their projections, the experts of MoE layers and
the head come from :mod:`quikft.arch`. Which projections read the same input (and so share one
statistics accumulator) is found at run time, by tensor identity on a probe batch
(:func:`find_input_groups`). What each block is called with (masks, rotary embeddings, positions)
is captured from the model's own forward for every block, since families pass different
arguments to different layers (sliding-window and global attention alternate in Gemma).

Experts of an MoE layer are quantized one by one, each with statistics from the tokens its
router sends it. An expert that receives fewer than ``expert_min_tokens`` calibration tokens
takes its statistics from *every* token entering its MoE layer instead (a second pass in which
that expert also runs on all tokens, its output discarded); the report lists it. A projection
outside routed experts that no token reaches at all is quantized by RTN with salient columns from
the weight term alone, and is listed too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from quikft import arch
from quikft.arch import RoutedExperts, UnsupportedArchitectureError
from quikft.config import QuantConfig, QuantMethod, resolve_salient, salient_request, salient_text
from quikft.hardware import resolve_device
from quikft.quant.activations import ActivationStore
from quikft.quant.gptq import HessianAccumulator, QuantResult, gptq_quantize, rtn_quantize
from quikft.quant.saliency import ColumnStats, column_scores, resolve_metric, select_salient
from quikft.quant.scheme import QuantScheme

__all__ = ["UnsupportedArchitectureError", "QuantizedLayers", "select_salient_model"]

# How a layer's statistics were gathered (LayerReport.statistics).
ROUTED = "routed"  # the tokens that reached it (for an expert: the tokens its router sent)
ALL_TOKENS = "all-tokens"  # a starved expert: every token entering its MoE layer
NO_TOKENS = "none"  # nothing reached it: RTN, salient columns by the weight term


@dataclass
class LayerReport:
    name: str
    in_features: int
    out_features: int
    salient: int
    salient_fraction: float
    loss: float
    seconds: float
    tokens: int = 0  # calibration tokens that reached the layer
    statistics: str = ROUTED
    bits: int | None = None  # the layer's bit-width (they differ per layer under --target-bpw)


@dataclass
class QuantizedLayers:
    """What quantization produced: per-layer results (codes, scales, salient columns) and a report."""

    results: dict[str, QuantResult] = field(default_factory=dict)
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    # Block name -> groups of (relative) projection names found to read one input tensor.
    input_groups: dict[str, list[list[str]]] = field(default_factory=dict)
    experts: list[str] = field(default_factory=list)  # full names of the unfused experts modules
    head: str | None = None  # the quantized output layer, if any
    untied_head: bool = False  # the head was tied to the embedding and now has its own weights
    plan: dict[str, Any] | None = None  # --target-bpw: the per-layer choice and its budget (quant/budget.py)

    def salient_indices(self) -> dict[str, torch.Tensor]:
        return {name: r.salient.to(torch.int32) for name, r in self.results.items()}

    def starved(self) -> list[dict]:
        """Layers whose statistics did not come from their own routed tokens (see the module docstring)."""
        return [{"name": layer.name, "tokens": layer.tokens, "statistics": layer.statistics}
                for layer in self.layers if layer.statistics != ROUTED]


# ------------------------------------------------------------------------------------ block inputs

class _StopForward(Exception):
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


def _block_output(out) -> torch.Tensor:
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
            raise _StopForward
        return forward

    batches, first_calls, first_ids = [], {}, {}
    with onloaded(model, layout, device), patched_forwards(blocks[:1], catch_first):
        for start in range(0, calib.shape[0], batch_size):
            ids = calib[start:start + batch_size].to(device)
            with contextlib.suppress(_StopForward):
                model(input_ids=ids, use_cache=False)
            batches.append(caught["hidden"].detach())
            first_calls.setdefault(ids.shape[0], caught["call"])
            first_ids.setdefault(ids.shape[0], (ids, len(batches) - 1))
    inputs = BlockInputs(batches, [{} for _ in blocks])
    for size, (ids, batch) in first_ids.items():
        inputs.calls[0][size] = first_calls[size]
        with _on_device(blocks[0], device):
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
                raise _StopForward
            return inputs.template
        return forward

    with onloaded(model, layout, device), patched_forwards(blocks, stub), contextlib.suppress(_StopForward):
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
        output = _block_output(block(hidden, *call.args, **call.kwargs))
        if outputs is not None:
            outputs.append(output)
    return outputs


@contextlib.contextmanager
def _on_device(module: nn.Module, device: str) -> Iterator[nn.Module]:
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


# ------------------------------------------------------------------------------------ statistics

@dataclass
class LayerStats:
    """Streamed statistics of one projection's inputs (shared by projections reading one tensor)."""

    hessian: HessianAccumulator | None
    columns: ColumnStats

    @property
    def tokens(self) -> int:
        return self.columns.n_tokens


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


@dataclass
class BlockStatistics:
    """One block's statistics: per layer, how they were gathered and the tokens routed to it."""

    stats: dict[str, LayerStats]
    how: dict[str, str]
    tokens: dict[str, int]
    groups: list[tuple[str, ...]]


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
def collect_statistics(block: nn.Module, layers: dict[str, nn.Module], experts: dict[str, RoutedExperts],
                       inputs: BlockInputs, index: int, config: QuantConfig, hessian: bool = True,
                       keep_outputs: bool = False) -> tuple[BlockStatistics, list[torch.Tensor] | None]:
    """Statistics of every layer of one block, and with ``keep_outputs`` the block's outputs of that
    pass (its outputs with the current weights; otherwise None: a kept copy would cost one more set
    of activations while the block is quantized)."""
    groups = find_input_groups(block, layers, inputs, index)
    with streaming_statistics(block, layers, groups, hessian) as stats:
        outputs = run_block(block, inputs, index, keep=keep_outputs)
    found = BlockStatistics(stats, {name: ROUTED if stats[name].tokens else NO_TOKENS for name in layers},
                            {name: stats[name].tokens for name in layers}, groups)
    starved = _starved_experts(experts, layers, stats, config.expert_min_tokens)
    if starved:
        _all_token_statistics(block, layers, experts, starved, inputs, index, hessian, found)
    return found, outputs


def _all_token_statistics(block: nn.Module, layers: dict[str, nn.Module], experts: dict[str, RoutedExperts],
                          starved: dict[str, set[int]], inputs: BlockInputs, index: int, hessian: bool,
                          found: BlockStatistics) -> None:
    """The documented rule for starved experts: statistics from every token of their MoE layer."""
    names = [f"{m}.{proj}.{e}" for m, chosen in starved.items() for e in sorted(chosen)
             for proj in experts[m].projections]
    names = [name for name in names if name in layers]
    with contextlib.ExitStack() as stack:
        for module_name, chosen in starved.items():
            stack.enter_context(arch.route_all_tokens(experts[module_name], chosen))
        extra = stack.enter_context(streaming_statistics(block, {n: layers[n] for n in names},
                                                         [(n,) for n in names], hessian))
        run_block(block, inputs, index, keep=False)
    for name in names:
        found.stats[name] = extra[name]
        found.how[name] = ALL_TOKENS


def _uniform_stats(in_features: int) -> ColumnStats:
    """Column statistics that weigh every column alike (the metric then uses the weight term alone)."""
    stats = ColumnStats(in_features)
    stats.update(torch.ones(1, in_features))
    return stats


# ------------------------------------------------------------------------------------ quantization

def effective_salient(salient: int | float, in_features: int, name: str) -> int:
    """The layer's k (:func:`~quikft.config.resolve_salient`), warning once per layer width when capped."""
    k = resolve_salient(salient, in_features)
    if k >= salient_request(salient, in_features):
        return k
    # No layer name in the message: the warnings registry then shows it once per width.
    warnings.warn(f"--salient {salient_text(salient)} asks {salient_request(salient, in_features)} >= in_features "
                  f"{in_features} columns; capped at {k} for such layers (first: {'.'.join(name.rsplit('.', 2)[-2:])})",
                  stacklevel=3)
    return k


def choose_salient(weight: torch.Tensor, stats: ColumnStats, config: QuantConfig, name: str) -> torch.Tensor:
    """The layer's k salient input columns by the configured metric (sorted, int64)."""
    k = effective_salient(config.salient, weight.shape[1], name)
    metric = resolve_metric(config.metric, config.tau, config.rho, config.gamma)
    if stats.n_tokens == 0:
        stats = _uniform_stats(weight.shape[1])
    return select_salient(column_scores(weight, stats, metric, config.bits), k)


def quantize_linear(linear: nn.Module, hessian: torch.Tensor | None, stats: ColumnStats, config: QuantConfig,
                    name: str, salient: torch.Tensor | None = None) -> QuantResult:
    """Select salient columns (unless given) and quantize one projection's weight.

    Without a Hessian (no calibration token reached the layer) the method is RTN.
    """
    weight = arch.weight_of(linear).float()
    if salient is None:
        salient = choose_salient(weight, stats, config, name)
    scheme = QuantScheme.of(config)
    if config.method == QuantMethod.RTN or hessian is None:
        return rtn_quantize(weight, salient, scheme, hessian=hessian)
    return gptq_quantize(weight, hessian, salient, scheme)


def layer_scheme(config: QuantConfig, plan: Mapping[str, Any] | None, name: str) -> QuantConfig:
    """The scheme one layer is quantized with: ``config``, or its bits and salient count from a
    per-layer ``plan`` (``--target-bpw``: name -> {"bits", "salient"})."""
    if not plan or name not in plan:
        return config
    return dataclasses.replace(config, bits=plan[name]["bits"], salient=plan[name]["salient"])


def _quantize_layer(module: nn.Module, full_name: str, stats: LayerStats, how: str, tokens: int,
                    config: QuantConfig, out: QuantizedLayers, results: dict[str, QuantResult],
                    fixed: torch.Tensor | None) -> float:
    """Quantize one layer in place (fake-quantized weight), put its result in ``results`` and its
    report in ``out``; returns its loss."""
    t0 = time.perf_counter()
    config = layer_scheme(config, (out.plan or {}).get("layers"), full_name)
    hessian = stats.hessian.hessian() if stats.hessian is not None and stats.tokens else None
    result = quantize_linear(module, hessian, stats.columns, config, full_name, fixed)
    weight = arch.weight_of(module)
    weight.copy_(result.weight.to(weight.dtype))
    results[full_name] = _to_cpu(result)
    k = int(result.salient.numel())
    in_features, out_features = arch.dims_of(module)
    out.layers.append(LayerReport(full_name, in_features, out_features, k, k / in_features, result.loss,
                                  time.perf_counter() - t0, tokens, how, bits=result.bits))
    return result.loss


class BlockHooks:
    """What happens around each block of :func:`quantize_blocks`.

    This default is the in-memory model: every block's weights are already present and every
    layer's result is kept in ``QuantizedLayers.results``. The quantize job's streaming hooks
    (:mod:`quikft.jobs.quantize.streaming`) instead read each block from the checkpoint, write its packed
    layers at once and drop them, and save a resumable state.
    """

    def load(self, index: int, block: nn.Module) -> None:
        """Make block ``index``'s weights present (on the CPU or where they live)."""

    def before_quantize(self, index: int, block: nn.Module) -> None:
        """Called on the compute device before the block's statistics pass (full-precision weights)."""

    def finished(self, index: int, block: nn.Module, results: dict[str, QuantResult], out: QuantizedLayers) -> None:
        """Called once the block is quantized and its outputs computed."""
        out.results.update(results)

    def release(self, index: int, block: nn.Module) -> None:
        """The block is done and back where it lives."""


@torch.no_grad()
def quantize_blocks(model, layout: arch.ModelLayout, inputs: BlockInputs, config: QuantConfig,
                    out: QuantizedLayers, hooks: BlockHooks, device: str, first: int = 0, progress: bool = True,
                    salient: dict[str, torch.Tensor] | None = None) -> None:
    """Blocks ``first`` onward on ``device``: statistics, salient columns, quantization, recomputed outputs."""
    scheme = f"{config.target_bpw:g} bpw" if out.plan else f"w{config.bits} k{salient_text(config.salient)}"
    bar = tqdm(range(first, len(layout)), desc=f"quantize {scheme}",
               disable=not progress, unit="block", initial=first, total=len(layout))
    for index in bar:
        block, prefix = layout.blocks[index], layout.block_name(index)
        hooks.load(index, block)
        out.experts += [f"{prefix}.{name}" if name else prefix for name in arch.unfuse_all_experts(block)]
        layers = layout.layers(index)
        with _on_device(block, device):
            hooks.before_quantize(index, block)
            found, _ = collect_statistics(block, layers, layout.experts(index), inputs, index, config)
            out.input_groups[prefix] = [list(group) for group in found.groups if len(group) > 1]
            results: dict[str, QuantResult] = {}
            losses = [_quantize_layer(module, f"{prefix}.{name}", found.stats[name], found.how[name],
                                      found.tokens[name], config, out, results,
                                      salient.get(f"{prefix}.{name}") if salient else None)
                      for name, module in layers.items()]
            del found
            inputs.advance(run_block(block, inputs, index))
            hooks.finished(index, block, results, out)
            del results
        hooks.release(index, block)
        if losses:
            bar.set_postfix(loss=f"{sum(losses) / len(losses):.3g}")


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
        raise _StopForward

    ids = torch.zeros(1, inputs.batches[0].shape[1], dtype=torch.long, device=device)
    handle = head.register_forward_pre_hook(catch)
    try:
        with onloaded(model, layout, device), patched_forwards(blocks, stub):
            for hidden in inputs.batches:
                current["hidden"] = hidden
                with contextlib.suppress(_StopForward):
                    model(input_ids=ids.expand(hidden.shape[0], -1), use_cache=False)
    finally:
        handle.remove()
    return stats


def quantize_head(model, layout: arch.ModelLayout, inputs: BlockInputs, config: QuantConfig,
                  out: QuantizedLayers, device: str, salient: dict[str, torch.Tensor] | None = None
                  ) -> dict[str, QuantResult]:
    """Quantize the output layer (untied from the embedding first if needed); returns its result."""
    name = arch.head_name(model)
    if name is None:
        raise UnsupportedArchitectureError(f"--quantize-lm-head: {type(model).__name__} has no output layer")
    out.untied_head = arch.head_is_tied(model)
    arch.untie_head(model)
    stats = head_statistics(model, layout, inputs, device)
    head = model.get_submodule(name)
    results: dict[str, QuantResult] = {}
    with _on_device(head, device):
        _quantize_layer(head, name, stats, ROUTED, stats.tokens, config, out, results,
                        salient.get(name) if salient else None)
    out.head = name
    return results


@torch.no_grad()
def select_salient_model(model, calib: torch.Tensor, config: QuantConfig, progress: bool = True,
                         device: str = "cpu", batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Salient columns of every decoder projection of the full-precision model (Pre-GIFT-SW).

    The same statistics and metric as :func:`quantize_model`, block by block on the
    calibration windows, without quantizing anything (so each block's outputs are simply
    its full-precision outputs).
    """
    layout = arch.prepare(model, config.targets, config.ignore, config.quantize_lm_head)
    device = resolve_device(device)
    was_training = model.training
    model.eval()
    inputs = capture_block_inputs(model, layout, calib, batch_size, device)
    salient: dict[str, torch.Tensor] = {}
    desc = f"select k{salient_text(config.salient)}"
    for index in tqdm(range(len(layout)), desc=desc, disable=not progress, unit="block"):
        block, prefix = layout.blocks[index], layout.block_name(index)
        arch.unfuse_all_experts(block)
        layers = layout.layers(index)
        with _on_device(block, device):
            found, outputs = collect_statistics(block, layers, layout.experts(index), inputs, index,
                                                config, hessian=False, keep_outputs=True)
            inputs.advance(outputs)
            for name, module in layers.items():
                weight = arch.weight_of(module).float()
                salient[f"{prefix}.{name}"] = choose_salient(weight, found.stats[name].columns, config, name).cpu()
    if config.quantize_lm_head:
        arch.untie_head(model)  # the head trains and quantizes on its own weights; the embedding stays FP
        name = arch.head_name(model)
        stats = head_statistics(model, layout, inputs, device, hessian=False)
        weight = arch.weight_of(model.get_submodule(name)).float()
        salient[name] = choose_salient(weight, stats.columns, config, name).cpu()
    model.train(was_training)
    return salient


def _to_cpu(result: QuantResult) -> QuantResult:
    for key, value in vars(result).items():
        if isinstance(value, torch.Tensor):
            setattr(result, key, value.cpu())
    return result
