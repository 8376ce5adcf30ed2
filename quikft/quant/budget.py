"""``--target-bpw``: measure each linear layer at candidate settings, then choose one per layer.

The measurement pass walks the blocks once before quantization, on full-precision weights: one
forward per block gathers each layer's Hessian and column statistics (and the block's outputs,
the next block's inputs), then every candidate setting (bits, k) of every layer is quantized as
the final pass would quantize it (same metric, grid, GPTQ and clipping search) and its error and exact
storage recorded. :func:`quikft.quant.allocate.allocate` then picks the
setting per layer; the usual block loop quantizes with it (later blocks see the quantized
earlier ones, as always).

What keeps the pass cheap (the issue's bound: quantizing with a budget at most 3x a fixed-setting
run). GPTQ quantizes each row on its own given the Hessian, so (1) a layer's candidates are run on
at most :data:`MEASURED_ROWS` of its rows (:func:`sample_rows`: the rows of the channels the loss is
most sensitive to, plus an even spread of the rest, each weighed by how many it stands for), an
estimate of the whole layer's loss a few percent off on the default model's 576- and 1536-row layers,
far less than the factor of about 4 between neighbouring widths; (2) the widths of one k share one
salient set (the metric's choice at the widest, :func:`salient_for_measuring`) and run as one GPTQ pass
over the rows stacked once per width (:func:`quikft.quant.gptq.gptq_row_losses`): three passes per
layer; (3) that pass searches every fourth clipping factor
(:data:`~quikft.quant.grid.COARSE_SHRINK_FACTORS`).

Candidates. Bits 2, 3 and 4 with k in {0, 16, 32}, and 8 bits with k = 0 (the top of the range).
Why these k: a salient column costs ``out x 16`` bits of fp16 values plus its index, so on the
default model's 576-wide layers k = 128 alone adds 3.6 bits per weight (more than going from 2 to 4
bits), and k = 16 already 0.45. Measured with the ``fisher`` error on the default model, plans at 3.0
to 5.0 bits per weight gave k = 16 or 32 to 10-30% of the layers (mostly at 4 bits) and k = 64 to one
layer of 210 at every budget, so k = 64 is not measured. 8 bits with salient columns is never better
than 8 bits alone.

Errors (``bpw_error``). ``fisher`` (the default): the layer's mean squared output error on the
calibration tokens (GPTQ's own objective, :func:`quikft.quant.gptq.hessian_objective`) times the
layer's loss sensitivity (:mod:`quikft.quant.sensitivity`: the mean squared gradient of the calibration
loss at the layer's output), a second-order estimate of how much the candidate raises the loss;
``relative``: the output error divided by the layer's output energy; ``output``: the output error alone.
On the default model (32 calibration windows, 19 WikiText-2 windows, planned from one measurement)
ppl at 4.0 bits per weight was 26.37 (fisher), 30.72 (relative), 34.62 (output), and at 3.5 bits
31.14 (fisher) vs 37.67 (relative): the two per-layer errors cannot see that an early value
projection's error costs the loss a thousand times what a late MLP's does.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from quikft import arch
from quikft.bits import layer_bits
from quikft.config import BpwError, QuantConfig, QuantMethod, resolve_salient
from quikft.quant.allocate import BudgetError, Candidate, allocate, reachable
from quikft.quant.blocks import Block, BlockInputs
from quikft.quant.gptq import gptq_row_losses, hessian_objective, row_objective
from quikft.quant.layer import choose_salient, quantize_linear
from quikft.quant.loop import BlockStep, Walk, run_blocks
from quikft.quant.saliency import ColumnStats
from quikft.quant.scheme import QuantScheme
from quikft.quant.statistics import BlockStatistics, Gather, LayerStats

CANDIDATE_BITS = (2, 3, 4)
CANDIDATE_SALIENT = (0, 16, 32)
TOP_SETTINGS = ((8, 0),)
MEASURED_ROWS = 256
SENSITIVE_ROWS = 64


@dataclasses.dataclass(frozen=True)
class ErrorMeasure:
    """One ``--bpw-error``: a candidate's error from its measured record (``loss``: mean squared output
    error, ``energy``: the layer's output energy, ``fisher``: see :func:`measure_layer`); ``needs_sensitivity``:
    the measurement needs :func:`quikft.quant.sensitivity.layer_sensitivity` first."""

    of: Callable[[Mapping[str, Any]], float]
    needs_sensitivity: bool = False


def _relative_error(measured: Mapping[str, Any]) -> float:
    return measured["loss"] / measured["energy"] if measured["energy"] > 0 else measured["loss"]


ERRORS: dict[BpwError, ErrorMeasure] = {BpwError.FISHER: ErrorMeasure(lambda m: m["fisher"], needs_sensitivity=True),
                                        BpwError.RELATIVE: ErrorMeasure(_relative_error),
                                        BpwError.OUTPUT: ErrorMeasure(lambda m: m["loss"])}

__all__ = ["BudgetError", "CandidateMeasurement", "ERRORS", "ErrorMeasure", "candidate_settings", "check_budget",
           "measure_candidates", "needs_sensitivity", "plan_budget"]


def candidate_settings(in_features: int) -> list[tuple[int, int]]:
    """The (bits, k) settings measured for a layer with ``in_features`` inputs (k capped as quantize caps it)."""
    settings = [(bits, resolve_salient(k, in_features)) for bits in CANDIDATE_BITS for k in CANDIDATE_SALIENT]
    return sorted(set(settings) | set(TOP_SETTINGS))


def _storage(in_features: int, out_features: int, setting: tuple[int, int], group_size: int) -> int:
    bits, k = setting
    return layer_bits(in_features, out_features, bits, k, group_size)


def check_budget(shapes: Mapping[str, tuple[int, int]], config: QuantConfig) -> None:
    """Refuse a budget no choice of candidates can meet, before any work (``shapes``: name -> (in, out))."""
    layers = {name: [Candidate(b, k, _storage(i, o, (b, k), config.group_size), 0.0)
                     for b, k in candidate_settings(i)] for name, (i, o) in shapes.items()}
    low, high = reachable(layers, sum(i * o for i, o in shapes.values()))
    if not low <= config.target_bpw <= high:
        raise BudgetError(f"--target-bpw {config.target_bpw:g} is outside what this model's layers can store: "
                          f"{low:.2f} to {high:.2f} bits per weight (2 to 8 bits, 0 to "
                          f"{max(CANDIDATE_SALIENT)} salient columns)")


def layer_shapes(layout: arch.ModelLayout) -> dict[str, tuple[int, int]]:
    """(in, out) of every layer the quantize job will quantize, by full name."""
    return {f"{layout.block_name(i)}.{name}": arch.dims_of(module)
            for i in range(len(layout)) for name, module in layout.layers(i).items()}


def measure_layer(module: nn.Module, name: str, stats: LayerStats, config: QuantConfig,
                  channel_weight: torch.Tensor | None = None) -> list[dict[str, Any]]:
    """Every candidate of one layer quantized as the final pass would (grid, GPTQ; see the module
    docstring for the salient columns, the clipping search and the row sample): setting, storage, loss,
    output energy and, given the layer's per-channel loss sensitivity, the ``fisher`` error (each row's
    loss weighed by its channel's sensitivity) and the mean sensitivity."""
    hessian = stats.hessian.hessian() if stats.hessian is not None and stats.tokens else None
    weight = arch.weight_of(module).float()
    energy = hessian_objective(weight, hessian) if hessian is not None else float(weight.square().sum())
    in_features, out_features = arch.dims_of(module)
    sample = sample_rows(out_features, channel_weight) if config.method != QuantMethod.RTN and hessian is not None \
        else RowSample(torch.arange(out_features), torch.ones(out_features, dtype=torch.float64))
    row_losses = _candidate_row_losses(module, (name, stats, hessian), config, sample.rows)
    measured = []
    for (bits, k), losses in row_losses.items():
        weighed = losses * sample.scale
        entry = {"bits": bits, "salient": k, "loss": float(weighed.sum()), "energy": energy,
                 "storage": _storage(in_features, out_features, (bits, k), config.group_size),
                 "weights": in_features * out_features}
        if channel_weight is not None:
            entry["fisher"] = float((weighed * channel_weight[sample.rows].double()).sum())
            entry["sensitivity"] = float(channel_weight.mean())
        measured.append(entry)
    return measured


@dataclasses.dataclass(frozen=True)
class RowSample:
    """The rows a layer's candidates are measured on, and each one's weight in the estimate of the layer's
    summed loss (1 for a row that stands for itself)."""

    rows: torch.Tensor
    scale: torch.Tensor  # float64, one per row of ``rows``


def sample_rows(out_features: int, channel_weight: torch.Tensor | None = None) -> RowSample:
    """All rows up to :data:`MEASURED_ROWS`; else a stratified sample of that many: the
    :data:`SENSITIVE_ROWS` rows whose channels the loss is most sensitive to, each standing for itself
    (a few channels of the residual stream can carry most of a layer's weighed error: an even sample
    would miss them), and evenly spaced rows of the rest, each standing for its share of the rest.
    GPTQ quantizes each row on its own given the Hessian, so the weighed sum estimates the layer's."""
    if out_features <= MEASURED_ROWS:
        return RowSample(torch.arange(out_features), torch.ones(out_features, dtype=torch.float64))
    top = torch.empty(0, dtype=torch.long)
    if channel_weight is not None:
        top = torch.topk(channel_weight.float(), SENSITIVE_ROWS).indices.sort().values
    rest = torch.ones(out_features, dtype=torch.bool)
    rest[top] = False
    rest = torch.nonzero(rest).flatten()
    count = MEASURED_ROWS - top.numel()
    spread = rest[torch.arange(count) * rest.numel() // count]
    scale = torch.cat([torch.ones(top.numel(), dtype=torch.float64),
                       torch.full((count,), rest.numel() / count, dtype=torch.float64)])
    return RowSample(torch.cat([top, spread]), scale)


def _candidate_row_losses(module: nn.Module, layer: tuple[str, LayerStats, torch.Tensor | None],
                          config: QuantConfig, rows: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    """Each setting's losses on ``rows``: one stacked GPTQ pass per k (:func:`salient_for_measuring`); RTN
    (or a layer no calibration token reached) quantizes each setting whole."""
    name, stats, hessian = layer
    weight = arch.weight_of(module).float()
    settings = candidate_settings(weight.shape[1])
    if config.method == QuantMethod.RTN or hessian is None:
        schemes = {setting: dataclasses.replace(config, bits=setting[0], salient=setting[1], target_bpw=None)
                   for setting in settings}
        return {setting: row_objective(quantize_linear(module, stats, scheme, name=name).weight
                                       - weight, hessian)[rows] for setting, scheme in schemes.items()}
    by_k: dict[int, list[tuple[int, int]]] = {}
    for setting in settings:
        by_k.setdefault(setting[1], []).append(setting)
    losses = {}
    for group in by_k.values():
        salient = salient_for_measuring(weight, stats.columns, (config, group), name)
        losses.update(zip(group, gptq_row_losses(weight[rows], hessian, salient, [b for b, _ in group],
                                                 QuantScheme.of(config)),
                          strict=True))
    return {setting: losses[setting] for setting in settings}


def salient_for_measuring(weight: torch.Tensor, columns: ColumnStats,
                          how: tuple[QuantConfig, list[tuple[int, int]]], name: str) -> torch.Tensor:
    """The salient columns every width of one k is measured with: the metric's choice at the widest of
    them (k = 0: none). The final pass picks the columns at the layer's own width, which the metric
    ranks alike (its quantization error term scales with the step at every width), so a narrower
    candidate's measured loss is at most slightly pessimistic; one set per k lets all its widths run as
    one stacked GPTQ pass."""
    config, group = how
    bits, k = max(group)
    if not k:
        return torch.arange(0)
    return choose_salient(weight, columns, dataclasses.replace(config, bits=bits, salient=k, target_bpw=None), name)


class CandidateMeasurement(BlockStep):
    """The measurement pass (see the module docstring) as a step of the block loop, on full-precision
    blocks: every layer of a block measured from one statistics pass, into ``measured``. Blocks whose
    layers are all in ``done`` (an interrupted pass's record) only pass their inputs on; ``on_block(blocks,
    measured)`` is called after each block (the job commits it there). With ``sensitivity``
    (:func:`quikft.quant.sensitivity.layer_sensitivity`) every candidate also gets its ``fisher`` error (a
    layer missing from it, which no token reached, weighs nothing)."""

    def __init__(self, config: QuantConfig, sensitivity: Mapping[str, torch.Tensor] | None = None,
                 done: Mapping[str, list[dict[str, Any]]] | None = None,
                 on_block: Callable[[int, dict[str, list[dict[str, Any]]]], None] | None = None):
        self.config, self.sensitivity, self.on_block = config, sensitivity, on_block
        self.measured: dict[str, list[dict[str, Any]]] = dict(done or {})

    def gather(self, block: Block) -> Gather | None:
        if all(block.full_name(name) in self.measured for name in block.layers):
            return None
        return Gather(hessian=True, expert_min_tokens=self.config.expert_min_tokens)

    def process(self, block: Block, found: BlockStatistics | None) -> None:
        """Measure every layer of the block into ``measured``."""
        if found is None:
            return
        config, sensitivity = self.config, self.sensitivity
        for name, module in block.layers.items():
            full = block.full_name(name)
            weight = None
            if sensitivity is not None:
                weight = sensitivity.get(full, torch.zeros(arch.dims_of(module)[1]))
            self.measured[full] = measure_layer(module, full, found.stats[name], config, weight)

    def release(self, block: Block) -> None:
        if self.on_block is not None:
            self.on_block(block.index + 1, self.measured)


def measure_candidates(layout: arch.ModelLayout, inputs: BlockInputs, measurement: CandidateMeasurement,
                       walk: Walk) -> dict[str, list[dict[str, Any]]]:
    """Run the measurement pass over every block; ``inputs`` are advanced through the full-precision
    blocks, so the caller captures fresh block-0 inputs for the final pass."""
    run_blocks(layout, inputs, [measurement], dataclasses.replace(walk, label="measure candidates"))
    return measurement.measured


def needs_sensitivity(config: QuantConfig) -> bool:
    """Whether ``config``'s budget error weighs layers by :func:`quikft.quant.sensitivity.layer_sensitivity`."""
    return config.target_bpw is not None and ERRORS[config.bpw_error].needs_sensitivity


def plan_budget(measured: Mapping[str, list[dict[str, Any]]], config: QuantConfig, seconds: float = 0.0
                ) -> dict[str, Any]:
    """The per-layer choice for ``config.target_bpw`` from measured candidates: the plan the block loop
    quantizes with (``layers``: name -> bits, salient), with what the report shows."""
    error = ERRORS[config.bpw_error]
    if error.needs_sensitivity and any("fisher" not in m for rows in measured.values() for m in rows):
        raise ValueError(f"--bpw-error {config.bpw_error}: the candidates were measured without the layers' "
                         "sensitivity (quikft.quant.sensitivity)")
    candidates = {name: [Candidate(m["bits"], m["salient"], m["storage"], error.of(m)) for m in rows]
                  for name, rows in measured.items()}
    weights = sum(rows[0]["weights"] for rows in measured.values())
    began = time.perf_counter()
    choice = allocate(candidates, weights, config.target_bpw)
    chosen = {name: next(m for m in measured[name] if (m["bits"], m["salient"]) == (c.bits, c.k))
              for name, c in choice.items()}
    return {"target_bpw": config.target_bpw, "error": config.bpw_error,
            "bits_per_weight": sum(c.storage for c in choice.values()) / weights,
            "predicted_error": sum(c.error for c in choice.values()),
            "measure_seconds": seconds, "allocate_seconds": time.perf_counter() - began,
            "layers": {name: {"bits": m["bits"], "salient": m["salient"], "loss": m["loss"],
                              "relative": _relative_error(m),
                              **{key: m[key] for key in ("fisher", "sensitivity") if key in m},
                              "storage": m["storage"]}
                       for name, m in chosen.items()},
            "candidates": {name: [[m["bits"], m["salient"], m["storage"], m["loss"], m["energy"], m.get("fisher")]
                                  for m in rows] for name, rows in measured.items()}}
