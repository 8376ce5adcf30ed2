"""The block loop: every walk over a model's decoder blocks, whatever it does to them.

In the manner of llm-compressor's sequential pipeline, the loop knows no algorithm. For each block in
order it makes the block's weights present, puts it on the compute device, runs one statistics pass
over the activations entering it if a step asks for one, hands the statistics to the steps, and
passes the block's outputs on as the next block's inputs, so later blocks see what earlier steps did
to earlier ones (as GPTQ needs). What happens to a block is the steps' business (:class:`BlockStep`):
salient selection and quantization (:mod:`quikft.quant.steps`), --target-bpw's measurement
(:mod:`quikft.quant.budget`), the sensitivity pass's forward walk (:mod:`quikft.quant.sensitivity`),
and the quantize job's reading of weights, evaluation streams, output and resumable state
(:mod:`quikft.jobs.quantize`). Only the current block needs to be on the compute device, so peak
memory is about one block plus the activations.

Outputs: when no step changes a block's weights, the statistics pass's own outputs are passed on (one
forward per block); when one does (quantization), the block runs again after the steps, with its new
weights, and the statistics pass keeps no outputs (a kept copy would cost one more set of activations
while the block is quantized).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from quikft import arch
from quikft.quant.blocks import Block, BlockInputs, on_device, run_block
from quikft.quant.statistics import BlockStatistics, Gather, collect_statistics


class BlockStep:
    """Something done to every block of a walk; each method is called at one point of the loop (in
    the order the steps are given) and does nothing here. This base class is also the source of an
    in-memory model, whose blocks' weights are always present."""

    changes_weights = False  # True: the block runs again after process(), with its new weights

    def load(self, block: Block) -> None:
        """Make the block's weights present (before its experts are unfused and its layers listed)."""

    def gather(self, block: Block) -> Gather | None:
        """The statistics this step needs of the block (None: none, for this block)."""
        return None

    def before(self, block: Block) -> None:
        """On the compute device, before the statistics pass (the block's weights as they were)."""

    def process(self, block: Block, found: BlockStatistics | None) -> None:
        """After the statistics pass (``found``: None when no step asked for statistics)."""

    def after(self, block: Block) -> None:
        """Once the block's outputs are computed (they are already the next block's inputs)."""

    def release(self, block: Block) -> None:
        """The block is done and back where it lives."""

    def postfix(self, block: Block) -> dict[str, str]:
        """What the progress bar shows after this block."""
        return {}


@dataclass(frozen=True)
class Walk:
    """How a walk goes: where each block computes, the step that makes each block's weights present
    (first to load and to release; the base :class:`BlockStep` for a model in memory), the progress
    bar (shown or not, its label) and the first block (a resumed job's)."""

    device: str
    source: BlockStep = field(default_factory=BlockStep)
    progress: bool = True
    label: str = "blocks"
    first: int = 0


def enter_block(layout: arch.ModelLayout, index: int, inputs: BlockInputs, steps: Sequence[BlockStep]) -> Block:
    """Block ``index`` with its weights present (each step's :meth:`~BlockStep.load`), its experts
    unfused into per-expert projections and its layers listed."""
    block = Block(index, layout.blocks[index], layout.block_name(index), inputs)
    for step in steps:
        step.load(block)
    block.unfused = [block.full_name(name) if name else block.prefix for name in arch.unfuse_all_experts(block.module)]
    block.layers = layout.layers(index)
    block.experts = layout.experts(index)
    return block


def _gather(block: Block, steps: Sequence[BlockStep]) -> Gather | None:
    """The one statistics pass that serves every step asking for one."""
    asked = [gather for step in steps if (gather := step.gather(block)) is not None]
    if not asked:
        return None
    return Gather(hessian=any(g.hessian for g in asked), expert_min_tokens=min(g.expert_min_tokens for g in asked))


@torch.no_grad()
def run_blocks(layout: arch.ModelLayout, inputs: BlockInputs, steps: Sequence[BlockStep], walk: Walk) -> None:
    """Walk blocks ``walk.first`` onward with ``steps`` (see the module docstring); ``inputs`` enter
    the first block and end as the outputs of the last."""
    steps = [walk.source, *steps]
    changes = any(step.changes_weights for step in steps)
    bar = tqdm(range(walk.first, len(layout)), desc=walk.label, disable=not walk.progress, unit="block",
               initial=walk.first, total=len(layout))
    for index in bar:
        block = enter_block(layout, index, inputs, steps)
        with on_device(block.module, walk.device):
            for step in steps:
                step.before(block)
            gather, found, outputs = _gather(block, steps), None, None
            if gather is not None:
                found, outputs = collect_statistics(block, gather, keep_outputs=not changes)
            for step in steps:
                step.process(block, found)
            del found  # the Hessians go before the block runs again
            inputs.advance(outputs if outputs is not None else run_block(block.module, inputs, index))
            for step in steps:
                step.after(block)
        for step in steps:
            step.release(block)
        postfix = {key: value for step in steps for key, value in step.postfix(block).items()}
        if postfix:
            bar.set_postfix(postfix)
