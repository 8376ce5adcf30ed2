"""Block-sequential quantization of a decoder (SPEC §1, §10.8).

For each decoder block in order: run the calibration activations through the full-precision
block while hooks stream every linear layer's input statistics (the Hessian for GPTQ and the
per-column norms for the saliency metric); pick each layer's salient columns; quantize each
layer; then recompute the block's outputs *with the quantized weights*, which become the inputs
of the next block (as GPTQ does). Only the current block needs to be on the compute device, so
peak memory is about one block plus the calibration activations.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from quikft.config import QuantConfig
from quikft.quant.gptq import HessianAccumulator, QuantResult, gptq_quantize, rtn_quantize
from quikft.saliency import ColumnStats, column_scores, resolve_metric, select_salient

# Decoder architectures whose blocks live at ``model.model.layers`` and whose linear layers
# have these names; adding an architecture means adding its linear names here.
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, ...]] = {
    "llama": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
}
# Linears of one block that read the same input tensor, keyed to a common label.
SHARED_INPUT = {"self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in", "self_attn.v_proj": "attn_in",
                "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in"}
SUPPORTED_ARCHITECTURES["mistral"] = SUPPORTED_ARCHITECTURES["llama"]
SUPPORTED_ARCHITECTURES["qwen2"] = SUPPORTED_ARCHITECTURES["llama"]
SUPPORTED_ARCHITECTURES["qwen3"] = SUPPORTED_ARCHITECTURES["llama"]


class UnsupportedArchitectureError(ValueError):
    pass


@dataclass
class LayerReport:
    name: str
    in_features: int
    out_features: int
    salient: int
    salient_fraction: float
    loss: float
    seconds: float


@dataclass
class QuantizedLayers:
    """What quantization produced: per-linear results (codes, scales, salient columns) and a report."""

    results: dict[str, QuantResult] = field(default_factory=dict)
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0

    def salient_indices(self) -> dict[str, torch.Tensor]:
        return {name: r.salient.to(torch.int32) for name, r in self.results.items()}


def linear_names(model) -> tuple[str, ...]:
    """Names (relative to a block) of the linear layers we quantize; refuses unknown models."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return SUPPORTED_ARCHITECTURES[model_type]


def decoder_blocks(model) -> nn.ModuleList:
    return model.get_decoder().layers


class _StopForward(Exception):
    """Raised by the input catcher once block 0's inputs are recorded."""


@dataclass
class BlockInputs:
    """Hidden states entering a block, in batches, plus the keyword arguments the block needs
    (rotary embeddings, masks, positions), captured once from the model's own forward."""

    batches: list[torch.Tensor]
    kwargs: dict


def capture_block_inputs(model, calib: torch.Tensor, batch_size: int, device: str) -> BlockInputs:
    """Run the model's embedding stage on ``calib`` and catch what enters block 0."""
    block0 = decoder_blocks(model)[0]
    caught: dict = {}

    def catcher(module, args, kwargs):
        caught["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        caught["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = block0.register_forward_pre_hook(catcher, with_kwargs=True)
    batches, kwargs = [], None
    try:
        for start in range(0, calib.shape[0], batch_size):
            ids = calib[start:start + batch_size].to(device)
            with contextlib.suppress(_StopForward):
                model(input_ids=ids, use_cache=False)
            batches.append(caught["hidden"].detach())
            kwargs = kwargs or caught["kwargs"]
    finally:
        handle.remove()
    kwargs["use_cache"] = False
    kwargs.pop("past_key_values", None)
    kwargs.pop("past_key_value", None)
    return BlockInputs(batches, kwargs)


def _batch_kwargs(kwargs: dict, batch: int) -> dict:
    """Slice batch-shaped tensors (e.g. an explicit attention mask) for a shorter last batch."""
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] > batch:
            value = value[:batch]
        out[key] = value
    return out


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockInputs) -> list[torch.Tensor]:
    return [_block_output(block(h, **_batch_kwargs(inputs.kwargs, h.shape[0]))) for h in inputs.batches]


@contextlib.contextmanager
def streaming_statistics(block: nn.Module, names: tuple[str, ...], hessian: bool = True) -> Iterator[dict]:
    """Hooks that stream each named linear's inputs into a Hessian and column statistics.

    Linears that read the same tensor (q/k/v, gate/up) share one accumulator: the input is
    identical, and the X^T X product is the dominant cost of the statistics pass. Without
    ``hessian`` (salient selection only) the accumulator is None and X^T X is skipped.
    """
    stats: dict[str, tuple[HessianAccumulator, ColumnStats]] = {}
    handles = []
    for group in input_groups(names):
        linear = block.get_submodule(group[0])
        shared = (HessianAccumulator(linear.in_features) if hessian else None, ColumnStats(linear.in_features))
        stats.update(dict.fromkeys(group, shared))

        def hook(module, args, _out, acc=shared):
            x = args[0].detach()
            if acc[0] is not None:
                acc[0].add_batch(x)
            acc[1].update(x)

        handles.append(linear.register_forward_hook(hook))
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def input_groups(names: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Group linear names that consume the same input tensor (same parent, same input role)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(SHARED_INPUT.get(name, name), []).append(name)
    return [tuple(group) for group in groups.values()]


def effective_salient(k: int, in_features: int, name: str) -> int:
    """Cap k below in_features (at least one quantized column), warning once per layer width."""
    if k < in_features:
        return k
    capped = in_features - 1
    # No layer name in the message: the warnings registry then shows it once per width.
    warnings.warn(f"--salient {k} >= in_features {in_features}; capped at {capped} for such layers "
                  f"(first: {name.rsplit('.', 2)[-2]}.{name.rsplit('.', 1)[-1]})", stacklevel=3)
    return capped


def choose_salient(weight: torch.Tensor, stats: ColumnStats, config: QuantConfig, name: str) -> torch.Tensor:
    """The layer's k salient input columns by the configured metric (sorted, int64)."""
    k = effective_salient(config.salient, weight.shape[1], name)
    metric = resolve_metric(config.metric if config.metric != "custom" else None, config.tau, config.rho, config.gamma)
    return select_salient(column_scores(weight, stats, metric, config.bits), k)


def quantize_linear(linear: nn.Linear, hessian: torch.Tensor, stats: ColumnStats, config: QuantConfig,
                    name: str, salient: torch.Tensor | None = None) -> QuantResult:
    """Select salient columns (unless given) and quantize one linear layer's weight."""
    weight = linear.weight.data.float()
    if salient is None:
        salient = choose_salient(weight, stats, config, name)
    if config.method == "rtn":
        return rtn_quantize(weight, salient, config.bits, config.group_size, config.sym, config.clip_search,
                            hessian=hessian)
    return gptq_quantize(weight, hessian, salient, config.bits, config.group_size, config.sym,
                         config.act_order, config.block_size, config.percdamp, config.clip_search)


@torch.no_grad()
def quantize_model(model, calib: torch.Tensor, config: QuantConfig, progress: bool = True,
                   salient: dict[str, torch.Tensor] | None = None, device: str = "cpu",
                   batch_size: int = 8) -> QuantizedLayers:
    """Quantize every decoder linear of ``model`` in place (fake-quantized weights) and return
    the integer codes, scales and salient columns of each. ``salient`` may fix the index sets
    (Pre-GIFT-SW keeps the ones it trained). Each block is quantized on ``device``, its
    calibration forward runs ``batch_size`` windows at a time."""
    names = linear_names(model)
    blocks = decoder_blocks(model)
    was_training = model.training
    model.eval()
    began = time.perf_counter()
    out = QuantizedLayers()
    inputs = capture_block_inputs(model, calib, batch_size, device)
    bar = tqdm(range(len(blocks)), desc=f"quantize w{config.bits} k{config.salient}", disable=not progress,
               unit="block")
    prefix = _block_prefix(model)
    for index in bar:
        block = blocks[index]
        block_device = next(block.parameters()).device
        block.to(device)
        with streaming_statistics(block, names) as stats:
            run_block(block, inputs)
        losses = []
        for name in names:
            full_name = f"{prefix}.{index}.{name}"
            linear = block.get_submodule(name)
            t0 = time.perf_counter()
            fixed = salient.get(full_name) if salient else None
            result = quantize_linear(linear, stats[name][0].hessian(), stats[name][1], config, full_name, fixed)
            linear.weight.data.copy_(result.weight.to(linear.weight.dtype))
            out.results[full_name] = _to_cpu(result)
            k = int(result.salient.numel())
            out.layers.append(LayerReport(full_name, linear.in_features, linear.out_features, k,
                                          k / linear.in_features, result.loss, time.perf_counter() - t0))
            losses.append(result.loss)
        del stats
        inputs.batches = run_block(block, inputs)
        block.to(block_device)
        bar.set_postfix(loss=f"{sum(losses) / len(losses):.3g}")
    out.seconds = time.perf_counter() - began
    model.train(was_training)
    return out


@torch.no_grad()
def select_salient_model(model, calib: torch.Tensor, config: QuantConfig, progress: bool = True,
                         device: str = "cpu", batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Salient columns of every decoder linear of the full-precision model (Pre-GIFT-SW).

    The same statistics and metric as :func:`quantize_model`, block by block on the
    calibration windows, without quantizing anything (so each block's outputs are simply
    its full-precision outputs).
    """
    names = linear_names(model)
    blocks = decoder_blocks(model)
    was_training = model.training
    model.eval()
    inputs = capture_block_inputs(model, calib, batch_size, device)
    prefix = _block_prefix(model)
    salient: dict[str, torch.Tensor] = {}
    for index in tqdm(range(len(blocks)), desc=f"select k{config.salient}", disable=not progress, unit="block"):
        block = blocks[index]
        block_device = next(block.parameters()).device
        block.to(device)
        with streaming_statistics(block, names, hessian=False) as stats:
            inputs.batches = run_block(block, inputs)
        for name in names:
            weight = block.get_submodule(name).weight.data.float()
            salient[f"{prefix}.{index}.{name}"] = choose_salient(weight, stats[name][1], config, name).cpu()
        block.to(block_device)
    model.train(was_training)
    return salient


def _block_prefix(model) -> str:
    """Module-path prefix of the decoder blocks, e.g. ``model.layers``."""
    blocks = decoder_blocks(model)
    for name, module in model.named_modules():
        if module is blocks:
            return name
    raise UnsupportedArchitectureError("cannot locate the decoder blocks in the model")


def _to_cpu(result: QuantResult) -> QuantResult:
    for key, value in vars(result).items():
        if isinstance(value, torch.Tensor):
            setattr(result, key, value.cpu())
    return result
