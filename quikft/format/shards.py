"""A checkpoint's weights files: split by size as ``save_pretrained`` splits them, each written with
its checksums, and the index that maps every tensor to its shard.

Weights up to :data:`MAX_SHARD_SIZE` are one ``model.safetensors`` without an index; larger ones are
``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``. The same rule
serves a model held in memory and a job that wrote its blocks to files one at a time: those
files are read one shard's worth at a time, so assembling the output never holds more tensors
than the largest shard. Readers (:mod:`quikft.format.header`) take either layout, and also the
one-shard-per-block layout that streamed jobs wrote before the split by size.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from quikft.format.header import read_headers
from quikft.format.layout import INDEX_NAME, SHARD_PATTERN, TensorInfo
from quikft.validation import checksum_metadata

# huggingface_hub's default and transformers 4's. A job that streams its blocks holds one shard in
# memory while it assembles the output, so this is also that step's memory bound (transformers 5
# saves up to 50GB per file).
MAX_SHARD_SIZE = "5GB"


def write_shards(state: Mapping[str, Tensor], directory: Path, max_shard_size: int | str | None = None,
                 files: Sequence[Path] = ()) -> None:
    """Save ``state`` and every tensor of the safetensors ``files`` (in that order) with
    ``save_pretrained``'s file names: one file, or shards of at most ``max_shard_size`` (default
    :data:`MAX_SHARD_SIZE`) plus an index. A tensor of a file is read only when its shard is written."""
    from huggingface_hub import split_torch_state_dict_into_shards

    stored = read_headers(files)
    twice = sorted(stored.keys() & state.keys())
    if twice:
        raise ValueError(f"tensor {twice[0]} is both in memory and in {stored[twice[0]].file}")
    # Meta stand-ins tell the splitter the stored tensors' sizes without reading them.
    sizes = {**state, **{name: torch.empty(info.shape, dtype=info.dtype, device="meta")
                         for name, info in stored.items()}}
    split = split_torch_state_dict_into_shards(sizes, filename_pattern=SHARD_PATTERN,
                                               max_shard_size=max_shard_size or MAX_SHARD_SIZE)
    for filename, names in split.filename_to_tensors.items():
        save_weights(_gathered(names, state, stored), directory / filename)
    if split.is_sharded:
        write_index(directory, split.tensor_to_filename, split.metadata)


def _gathered(names: Sequence[str], state: Mapping[str, Tensor], stored: Mapping[str, TensorInfo]
              ) -> dict[str, Tensor]:
    """One shard's tensors: from memory, or read from the file that holds them (bit for bit)."""
    from safetensors import safe_open

    tensors = {name: state[name] for name in names if name in state}
    by_file: dict[Path, list[str]] = {}
    for name in names:
        if name not in state:
            by_file.setdefault(stored[name].file, []).append(name)
    for file, wanted in by_file.items():
        with safe_open(file, framework="pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in wanted})
    return tensors


def write_index(directory: Path, weight_map: Mapping[str, str], metadata: Mapping[str, Any]) -> None:
    """``model.safetensors.index.json``: the shard of every tensor, by name, and ``metadata`` (its
    ``total_size``). Sorted keys, so the same shards always give the same bytes."""
    index = {"metadata": dict(metadata), "weight_map": dict(weight_map)}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_weights(tensors: Mapping[str, Tensor], path: Path) -> None:
    """One safetensors weights file: CPU tensors with storages of their own, and their checksums."""
    from safetensors.torch import save_file

    shard = {name: _own_storage(t.detach().to("cpu").contiguous()) for name, t in tensors.items()}
    save_file(shard, path, metadata={"format": "pt", **checksum_metadata(shard)})


def _own_storage(tensor: Tensor) -> Tensor:
    """A view of a larger storage (e.g. QuikLinear's fused index buffers) as a tensor of its own:
    safetensors refuses tensors that share memory."""
    return tensor.clone() if tensor.untyped_storage().nbytes() != tensor.nbytes else tensor
