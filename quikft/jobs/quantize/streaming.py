"""The quantize job's steps of the block loop (:mod:`quikft.quant.loop`), for models larger than memory.

- **Weights**: the model is a meta-device skeleton; each decoder block is read from the
  checkpoint's safetensors shards when its turn comes, in the stored dtype, and released when
  done (:class:`BlockWeights`, :mod:`quikft.jobs.quantize.weights`). Modules outside the blocks are read
  once; an untied head only when the head is quantized, evaluated or written.
- **Output**: a finished block's packed layers (with its other tensors) are written at once as
  one file of the job's state directory, and nothing of them stays in memory; at the end the
  format shards them by size into the output directory (one shard in memory at a time), which
  appears complete by one rename.
- **Activations**: calibration and quick-eval activations are kept as ``--offload-activations``
  says (:mod:`quikft.quant.activations`).
- **Resume**: after every block the state is committed (:mod:`quikft.jobs.quantize.state`); ``--resume``
  continues from the first unfinished block and writes bit-identical output.
- :class:`StreamingStep` does the per-block part of all of this beside the quantization step
  (:class:`quikft.quant.steps.QuantizeLayers`).
- **Quick evaluation**: the evaluation windows travel through the blocks like the calibration
  activations: a full-precision stream before a block is quantized (only when the reference
  ppl is not cached), the quantized stream after, and the "as saved" stream after the block's
  unquantized tensors are rounded to ``dtype_rest``. At the end the model's own final stage
  (norm, head, logit transform; the blocks replaced by stubs) turns each stream into NLL, in the
  same operations as :func:`quikft.eval.ppl.window_nll`, so the numbers equal an in-memory
  evaluation bit for bit.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from quikft import arch
from quikft.atomic import is_regular_file
from quikft.eval.ppl import HEAD_CHUNK
from quikft.format.layout import tied_weight_keys
from quikft.format.shards import save_weights, write_shards
from quikft.format.writer import pack_state
from quikft.jobs.quantize.state import QuantizeState, QuantizeStateError
from quikft.jobs.quantize.weights import CheckpointWeights, release
from quikft.quant.activations import ActivationStore, Offload
from quikft.quant.blocks import (
    Block,
    BlockInputs,
    capture_block_inputs,
    like_output,
    onloaded,
    patched_forwards,
    run_block,
)
from quikft.quant.gptq import QuantResult
from quikft.quant.loop import BlockStep
from quikft.quant.steps import LayerReport, QuantizedLayers
from quikft.runinfo import return_freed_memory

CALIBRATION = "calibration"
FP, QUANTIZED, SAVED = "fp", "quantized", "saved"


class DiskFullError(ValueError):
    """Writing the output or the state failed for lack of space; the state stays resumable."""


@contextlib.contextmanager
def _writing(path: Path):
    """Turn a failed write into a one-line error that says the state is intact."""
    try:
        yield
    except OSError as err:
        reason = err.strerror or str(err)
        raise DiskFullError(f"cannot write {path}: {reason}; the resumable state of the finished blocks is intact: "
                            f"free space and rerun the same command with --resume") from None


def _save_atomic(tensors: dict[str, torch.Tensor], path: Path) -> int:
    """A weights file (with checksums) under a temporary name, renamed when complete; returns its size."""
    tmp = path.with_name(f".{path.name}.tmp")
    with _writing(path):
        save_weights(tensors, tmp)
        os.replace(tmp, path)
    return path.stat().st_size


# ------------------------------------------------------------------------------------ output shards

class BlockShards:
    """The output written block by block into the state's ``blocks/`` directory."""

    def __init__(self, directory: Path, settings: dict[str, Any], packed: bool, rest_dtype: torch.dtype):
        self.directory = directory
        self.settings = settings
        self.packed = packed
        self.rest_dtype = rest_dtype

    def block_file(self, index: int) -> Path:
        return self.directory / f"block-{index:05d}.safetensors"

    def salient_file(self, index: int) -> Path:
        return self.directory / f"salient-{index:05d}.safetensors"

    def state_of(self, module: nn.Module, prefix: str, results: dict[str, QuantResult]) -> dict[str, torch.Tensor]:
        """``module``'s tensors under full names: packed layers and ``dtype_rest`` for a packed output,
        the fake-quantized weights in the family's own layout otherwise."""
        if not self.packed:
            arch.fuse_all_experts(module)
        state = {f"{prefix}.{key}" if prefix else key: value for key, value in module.state_dict().items()}
        return pack_state(state, results, self.rest_dtype, self.settings) if self.packed else state

    def write_block(self, index: int, prefix: str, block: nn.Module, results: dict[str, QuantResult]
                    ) -> list[Path]:
        """Write block ``index``'s shard and salient indices; returns the files written."""
        _save_atomic(self.state_of(block, prefix, results), self.block_file(index))
        _save_atomic({name: r.salient.to(torch.int32) for name, r in results.items()}, self.salient_file(index))
        return [self.block_file(index), self.salient_file(index)]

    def assemble(self, staging: Path, blocks: int, rest: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Write the output's weights into ``staging``, the rest (embeddings, final norm, head) and the
        block files, sharded by size as the format does; returns the salient indices. The block files
        are only read: if the output fails now, the state still holds every finished block."""
        files = [self.block_file(index) for index in range(blocks)]
        for source in files:
            if not is_regular_file(source):  # checked on resume too: never read through a planted link
                raise QuantizeStateError(f"{source} is not a regular file; delete {self.directory.parent} to start "
                                         f"over")
        with _writing(staging):
            write_shards(rest, staging, files=files)
        return {name: t for index in range(blocks) for name, t in load_file(self.salient_file(index)).items()}


# ------------------------------------------------------------------------------------ evaluation streams

@dataclass
class EvalStreams:
    """Quick-evaluation windows carried through the blocks (see the module docstring)."""

    windows: list[torch.Tensor]  # (1, seqlen) token ids per window
    inputs: dict[str, BlockInputs] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def advance(self, name: str, block: nn.Module, index: int) -> None:
        if name not in self.inputs:
            return
        began = time.perf_counter()
        stream = self.inputs[name]
        stream.advance(run_block(block, stream, index))
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - began

    def stores(self) -> dict[str, ActivationStore]:
        return {f"eval-{name}": stream.batches for name, stream in self.inputs.items()}

    @torch.no_grad()
    def nll(self, name: str, model: nn.Module, layout: arch.ModelLayout, device: str) -> tuple[float, int]:
        """Summed next-token NLL of one stream over all windows, and the number of predictions.

        The model's own forward computes the logits: the blocks are stubs and the last one returns
        the stream's hidden states, one head-sized chunk of positions at a time, as
        :func:`quikft.eval.ppl.window_nll` chunks them.
        """
        began = time.perf_counter()
        stream = self.inputs[name]
        blocks = list(layout.blocks)
        current: dict = {}

        def stub(index):
            def forward(*args, **kwargs):
                return like_output(stream.template, current["hidden"]) if index == len(blocks) - 1 \
                    else stream.template
            return forward

        total, tokens = 0.0, 0
        with onloaded(model, layout, device), patched_forwards(blocks, stub):
            for ids, hidden in zip(self.windows, stream.batches, strict=True):
                ids = ids.to(device)
                targets = ids[:, 1:]
                positions = ids.shape[1] - 1
                for start in range(0, positions, HEAD_CHUNK):
                    end = min(start + HEAD_CHUNK, positions)
                    current["hidden"] = hidden[:, start:end]
                    logits = model(input_ids=ids[:, start:end], use_cache=False).logits.float()
                    total += F.cross_entropy(logits.flatten(0, 1), targets[:, start:end].flatten(),
                                             reduction="sum").item()
                tokens += positions
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - began
        return total, tokens


def capture_streams(layout: arch.ModelLayout, windows: list[torch.Tensor], names: list[str], offload: Offload,
                    rounded: dict[str, torch.Tensor] | None = None) -> EvalStreams:
    """Block-0 inputs of the evaluation windows for each stream (batch 1, as ppl evaluates them), kept
    as ``offload`` says.

    The ``saved`` stream starts from the embedding stage with the unquantized tensors rounded to
    ``dtype_rest``: ``rounded`` holds those rounded values, swapped in for its capture only.
    """
    model, device = layout.model, offload.device
    streams = EvalStreams(windows)
    if not names or not windows:
        return streams
    captured = capture_block_inputs(model, layout, torch.cat(windows), 1, device)
    for name in names:
        batches = captured.batches
        if name == SAVED and rounded:
            with _swapped(model, rounded):
                batches = capture_block_inputs(model, layout, torch.cat(windows), 1, device).batches
        stream = BlockInputs(offload.store(batches), captured.calls, captured.template)
        streams.inputs[name] = stream
    return streams


@contextlib.contextmanager
def _swapped(model: nn.Module, values: dict[str, torch.Tensor]):
    """The model's tensors named in ``values`` hold those values for the duration (copied in place)."""
    state = model.state_dict()
    backup = {name: state[name].clone() for name in values}
    with torch.no_grad():
        for name, value in values.items():
            state[name].copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in backup.items():
                state[name].copy_(value)


def round_floating(module: nn.Module, dtype: torch.dtype, skip: set[str] = frozenset(), prefix: str = "") -> None:
    """Round ``module``'s floating tensors (but the ``skip`` names) to ``dtype`` in place, keeping their dtype."""
    seen = set()
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            full = f"{prefix}.{name}" if prefix else name
            if tensor.is_floating_point() and not tensor.is_meta and full not in skip and tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                tensor.copy_(tensor.to(dtype))


# ------------------------------------------------------------------------------------ the steps

class BlockWeights(BlockStep):
    """The source step of a streamed model's walks: read each block's weights from the checkpoint when
    its turn comes, drop them after (in memory, with no checkpoint, nothing to do)."""

    def __init__(self, model: nn.Module, weights: CheckpointWeights | None):
        self.model, self.weights = model, weights

    def load(self, block: Block) -> None:
        if self.weights is not None:
            self.weights.load(self.model, block.prefix)

    def release(self, block: Block) -> None:
        if self.weights is not None:
            release(block.module)
            # Experts back in the stored layout (on the meta device: nothing is copied), so that a later
            # walk (the measurement after the sensitivity pass, the quantization after both) reads them again.
            arch.fuse_all_experts(block.module)
            return_freed_memory()


@dataclass
class BlockOutput:
    """Where a quantized block goes: the evaluation streams it advances, its shard, the state that
    commits it after every block, and the model's block count (what the state records)."""

    evals: EvalStreams
    shards: BlockShards
    state: QuantizeState
    blocks: int


class StreamingStep(BlockWeights):
    """The quantize job's source step: per block, read it, run the evaluation streams, write its shard
    from what :class:`~quikft.quant.steps.QuantizeLayers` left in ``block.results``, commit the state
    (with the calibration activations entering the next block), release it. ``out`` is the run's
    report so far (the state keeps it)."""

    def __init__(self, model: nn.Module, weights: CheckpointWeights | None, output: BlockOutput,
                 out: QuantizedLayers):
        super().__init__(model, weights)
        self.output, self.out = output, out
        self.block_state_bytes: list[int] = []

    def load(self, block: Block) -> None:
        self._began = time.perf_counter()
        self._eval_before = sum(self.output.evals.seconds.values())
        super().load(block)

    def before(self, block: Block) -> None:
        self.output.evals.advance(FP, block.module, block.index)

    def after(self, block: Block) -> None:
        evals, state, results = self.output.evals, self.output.state, block.results
        evals.advance(QUANTIZED, block.module, block.index)
        before = state.peak_bytes
        written = self.output.shards.write_block(block.index, block.prefix, block.module, results)
        if SAVED in evals.inputs:
            # As saved: packed layers keep their fake-quantized weights and fp32 biases; the rest is rounded.
            round_floating(block.module, self.output.shards.rest_dtype, prefix=block.prefix,
                           skip={f"{name}.{part}" for name in results for part in ("weight", "bias")})
            evals.advance(SAVED, block.module, block.index)
        # The loop's own time (resumed runs add theirs): the evaluation streams are reported apart.
        self.out.seconds += time.perf_counter() - self._began - (sum(evals.seconds.values()) - self._eval_before)
        stores = {CALIBRATION: block.inputs.batches, **evals.stores()}
        state.commit(block.index + 1, stores, record_of(self.out, self.output.blocks, evals), written)
        self.block_state_bytes.append(max(0, state.peak_bytes - before))

    def release(self, block: Block) -> None:
        release(block.module)
        return_freed_memory()


def record_of(out: QuantizedLayers, blocks: int, evals: EvalStreams) -> dict[str, Any]:
    """What the state keeps of the results so far (everything the report and config need)."""
    return {"blocks": blocks, "layers": [asdict(layer) for layer in out.layers], "input_groups": out.input_groups,
            "experts": out.experts, "eval_streams": list(evals.inputs), "eval_seconds": evals.seconds,
            "quantize_seconds": out.seconds, "plan": out.plan}


def restore_record(record: dict[str, Any], out: QuantizedLayers, evals: EvalStreams) -> None:
    out.layers = [LayerReport(**layer) for layer in record["layers"]]
    out.input_groups = record["input_groups"]
    out.experts = record["experts"]
    out.seconds = record.get("quantize_seconds", 0.0)
    out.plan = record.get("plan")
    evals.seconds = dict(record.get("eval_seconds", {}))


def rest_of(model: nn.Module, layout: arch.ModelLayout) -> dict[str, torch.Tensor]:
    """The model's stored tensors outside the decoder blocks (tied copies left out)."""
    inside = f"{layout.prefix}."
    tied = tied_weight_keys(model)
    return {name: t for name, t in model.state_dict().items() if not name.startswith(inside) and name not in tied}
