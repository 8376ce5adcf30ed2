"""The block loop's quantization steps: salient selection (:class:`SelectSalient`) and quantization
(:class:`QuantizeLayers`), and what quantizing gives (:class:`QuantizedLayers`).

Quantizing a block changes its weights in place (fake-quantized), so the loop recomputes its outputs
with them: the next block is calibrated on what the quantized model computes, as GPTQ does.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from quikft import arch
from quikft.arch import UnsupportedArchitectureError
from quikft.config import QuantConfig, salient_text
from quikft.quant.blocks import Block, BlockInputs, on_device
from quikft.quant.gptq import QuantResult
from quikft.quant.layer import choose_salient, layer_scheme, quantize_linear
from quikft.quant.loop import BlockStep
from quikft.quant.statistics import ROUTED, BlockStatistics, Gather, LayerStats, head_statistics


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
        """Layers whose statistics did not come from their own routed tokens (:mod:`quikft.quant.statistics`)."""
        return [{"name": layer.name, "tokens": layer.tokens, "statistics": layer.statistics}
                for layer in self.layers if layer.statistics != ROUTED]


class SelectSalient(BlockStep):
    """Each layer's salient columns by the metric, on the full-precision model (Pre-GIFT-SW): the
    column statistics alone, nothing quantized."""

    def __init__(self, config: QuantConfig):
        self.config = config
        self.salient: dict[str, torch.Tensor] = {}

    def gather(self, block: Block) -> Gather:
        return Gather(hessian=False, expert_min_tokens=self.config.expert_min_tokens)

    def process(self, block: Block, found: BlockStatistics) -> None:
        for name, module in block.layers.items():
            weight = arch.weight_of(module).float()
            self.salient[block.full_name(name)] = choose_salient(weight, found.stats[name].columns, self.config,
                                                                 name).cpu()


class QuantizeLayers(BlockStep):
    """Quantize every layer of each block in place (fake-quantized weights) into ``out``: its report
    always, its result (codes, scales, salient columns) in ``out.results`` when ``keep`` (a model in
    memory; the quantize job writes each block's results and drops them). ``salient`` may fix layers'
    index sets (Pre-GIFT-SW keeps the ones it trained); ``out.plan`` (--target-bpw) sets layers' bits
    and salient counts. A block's results are left in ``block.results`` for the steps after it."""

    changes_weights = True

    def __init__(self, config: QuantConfig, out: QuantizedLayers, salient: dict[str, torch.Tensor] | None = None,
                 keep: bool = True):
        self.config, self.out, self.salient, self.keep = config, out, salient or {}, keep

    def gather(self, block: Block) -> Gather:
        return Gather(hessian=True, expert_min_tokens=self.config.expert_min_tokens)

    def process(self, block: Block, found: BlockStatistics) -> None:
        self.out.experts += block.unfused
        self.out.input_groups[block.prefix] = [list(group) for group in found.groups if len(group) > 1]
        for name, module in block.layers.items():
            full = block.full_name(name)
            block.results[full] = self.quantize(module, full, found.stats[name], (found.how[name], found.tokens[name]))

    def after(self, block: Block) -> None:
        if self.keep:
            self.out.results.update(block.results)

    def postfix(self, block: Block) -> dict[str, str]:
        losses = [result.loss for result in block.results.values()]
        return {"loss": f"{sum(losses) / len(losses):.3g}"} if losses else {}

    def quantize(self, module: nn.Module, name: str, stats: LayerStats, origin: tuple[str, int]) -> QuantResult:
        """Quantize one layer in place and report it; ``origin``: how its statistics were gathered and the
        calibration tokens that reached it. Returns its result, on the CPU."""
        t0 = time.perf_counter()
        config = layer_scheme(self.config, (self.out.plan or {}).get("layers"), name)
        result = quantize_linear(module, stats, config, self.salient.get(name), name)
        weight = arch.weight_of(module)
        weight.copy_(result.weight.to(weight.dtype))
        result = _to_cpu(result)
        k = int(result.salient.numel())
        in_features, out_features = arch.dims_of(module)
        self.out.layers.append(LayerReport(name, in_features, out_features, k, k / in_features, result.loss,
                                           time.perf_counter() - t0, origin[1], origin[0], bits=result.bits))
        return result


def quantize_label(config: QuantConfig, out: QuantizedLayers) -> str:
    """The quantization walk's progress label: the scheme, or the budget."""
    scheme = f"{config.target_bpw:g} bpw" if out.plan else f"w{config.bits} k{salient_text(config.salient)}"
    return f"quantize {scheme}"


def quantize_head(model, layout: arch.ModelLayout, inputs: BlockInputs, step: QuantizeLayers, device: str
                  ) -> dict[str, QuantResult]:
    """Quantize the output layer (untied from the embedding first if needed) with ``step``'s scheme
    and into its report, on the activations leaving the last block; returns its result."""
    name = arch.head_name(model)
    if name is None:
        raise UnsupportedArchitectureError(f"--quantize-lm-head: {type(model).__name__} has no output layer")
    step.out.untied_head = arch.head_is_tied(model)
    arch.untie_head(model)
    stats = head_statistics(model, layout, inputs, device)
    head = model.get_submodule(name)
    with on_device(head, device):
        result = step.quantize(head, name, stats, (ROUTED, stats.tokens))
    step.out.head = name
    return {name: result}


def _to_cpu(result: QuantResult) -> QuantResult:
    for key, value in vars(result).items():
        if isinstance(value, torch.Tensor):
            setattr(result, key, value.cpu())
    return result
