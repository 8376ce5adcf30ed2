"""A Hugging Face checkpoint read one module at a time, for models larger than memory.

The model is built on the meta device (no memory), then the tensors of exactly the modules
needed next are read from the checkpoint's safetensors shards in their stored dtype (a bf16
model stays bf16) and released again when done. Each read opens the shard, copies the needed
tensors and closes it, so no mapping of a whole shard stays resident.

Stored names need not be the model's: transformers keeps, per family, the renamings and merges
that turn a checkpoint's layout into the model's (e.g. Mixtral's per-expert hub tensors into 3-D
expert weights), and ``save_pretrained`` writes that layout back. We use the same mapping
(``transformers.conversion_mapping``): every stored tensor is assigned to the model tensor it
becomes, and a module is loaded through transformers' own conversion from exactly the stored
tensors that feed it. A checkpoint whose tensors do not cover the model is not streamed; the
caller loads the whole model instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from quikft.format.header import read_headers, read_metadata, weight_files
from quikft.format.layout import TensorInfo, tied_weight_keys
from quikft.format.loader import materialize_non_persistent
from quikft.validation import CheckpointError

SEQUENTIAL_LOAD = "HF_DEACTIVATE_ASYNC_LOAD"  # transformers' switch for loading without a thread pool


def local_checkpoint(path: str | os.PathLike) -> Path | None:
    """The local directory of a model: a directory as given, or a hub id's downloaded snapshot
    (config, tokenizer and safetensors files only); None when neither exists."""
    if Path(path).is_dir():
        return Path(path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                                  "tokenizer*"]))
    except Exception:  # offline, unknown id, gated: the caller's whole-model load reports why
        return None


class CheckpointWeights:
    """The tensors of one checkpoint directory, read on demand into a meta-device skeleton."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.files = weight_files(self.path)
        self.tensors: dict[str, TensorInfo] = read_headers(self.files)
        self.targets: dict[str, str] = {}  # stored name -> the model tensor it becomes (see plan)
        self.mapping: list = []

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype most of the stored bytes have (the model's dtype)."""
        totals: dict[torch.dtype, int] = {}
        for info in self.tensors.values():
            if info.dtype.is_floating_point:
                totals[info.dtype] = totals.get(info.dtype, 0) + info.nbytes
        return max(totals, key=totals.get) if totals else torch.float32

    @property
    def nbytes(self) -> int:
        return sum(file.stat().st_size for file in self.files)

    def identity(self) -> str:
        """A hash of what the stored weights are: per file its name, size, modification time and header
        (names, dtypes, shapes, offsets, and the checksums quikft records), so weights re-saved in place
        with the same shapes (a fine-tune, a re-download) no longer look like the same model."""
        digest = hashlib.sha256()
        for file in self.files:
            stat = file.stat()
            digest.update(f"{file.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
            entries = {name: [str(info.dtype), list(info.shape), info.offset]
                       for name, info in read_headers([file]).items()}
            digest.update(json.dumps({"tensors": entries, "metadata": read_metadata(file)}, sort_keys=True,
                                     default=str).encode())
        return digest.hexdigest()

    def skeleton(self, trust_remote_code: bool = False) -> nn.Module:
        """The model the checkpoint's config describes, on the meta device, in the stored dtype."""
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(self.path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=self.dtype, trust_remote_code=trust_remote_code)
        if (self.path / "generation_config.json").is_file():  # what from_pretrained would read
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(self.path)
        return model.eval()

    def plan(self, model: nn.Module) -> list[str]:
        """Assign every stored tensor to the model tensor it becomes; returns the model's stored-tensor
        names no stored tensor feeds (empty when the checkpoint streams)."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.mapping = get_model_conversion_mapping(model)
        renamings = [m for m in self.mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in self.mapping if isinstance(m, WeightConverter)]
        meta_state = model.state_dict()
        self.targets = {}
        for key in self.tensors:
            target, _ = rename_source_key(key, renamings, converters, model.base_model_prefix, meta_state)
            if target not in meta_state and key in meta_state:  # as transformers: keep names it already knows
                target = key
            self.targets[key] = target
        fed = set(self.targets.values())
        return [key for key in meta_state if key not in fed and key not in tied_weight_keys(model)]

    def read(self, keys: Iterable[str], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The stored tensors of the given (stored) names, read one shard at a time in their stored dtype."""
        from safetensors import SafetensorError, safe_open

        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.tensors[key].file, []).append(key)
        out = {}
        for file, names in by_file.items():
            try:
                with _open_unmapped(safe_open, file, device) as handle:
                    for key in names:
                        out[key] = handle.get_tensor(key)
            except SafetensorError as err:
                raise CheckpointError(f"{file}: cannot read safetensors file ({str(err).splitlines()[0]})") from None
        return out

    def load(self, model: nn.Module, name: str, device: str | torch.device = "cpu", recurse: bool = True) -> int:
        """Materialize module ``name`` of the meta skeleton (its stored tensors through transformers'
        conversion, then its computed buffers); ``recurse=False`` loads only the module's own tensors.
        Returns the bytes read."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        module = model.get_submodule(name) if name else model
        prefix = f"{name}." if name else ""
        wanted = {f"{prefix}{key}" for key in (module.state_dict() if recurse else _own_state(module))}
        wanted -= tied_weight_keys(model)  # tied copies follow their source (tie_weights)
        stored = [key for key, target in self.targets.items() if target in wanted]
        if stored:
            tensors = self.read(stored, device)
            config = LoadStateDictConfig(weight_mapping=self.mapping, device_map={"": str(device)})
            with _quiet_transformers():  # its per-call "Loading weights" bar, once per block, is noise here
                info, _ = convert_and_load_state_dict_in_model(model, tensors, config)
            if info.conversion_errors:
                first = next(iter(info.conversion_errors.items()))
                raise CheckpointError(f"{self.path}: cannot convert {first[0]} ({first[1]})")
        materialize_non_persistent(model, device, root=module, recurse=recurse)
        leftover = [key for key, t in _named_tensors(module, recurse) if t.is_meta and f"{prefix}{key}" in wanted]
        if leftover:
            raise CheckpointError(f"{self.path}: no stored tensor provides {prefix}{leftover[0]}")
        return sum(self.tensors[key].nbytes for key in stored)


def _open_unmapped(safe_open, file: Path, device: str | torch.device):
    """A safetensors handle that reads with pread(2) where supported: mapped shard pages would count
    toward the process's resident memory for as long as the handle lives."""
    try:
        return safe_open(file, framework="pt", device=str(device), backend="pread")
    except TypeError:  # safetensors before 0.8 has no backend choice
        return safe_open(file, framework="pt", device=str(device))


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bar, and no loader threads: transformers materializes tensors in a new thread pool
    per call, and memory freed in those threads' malloc arenas is not all returned, so with it the
    resident set grew with every block read (hidden-1024 blocks: about +40 MiB each over the first
    blocks; sequential: flat)."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    sequential = os.environ.get(SEQUENTIAL_LOAD)
    logging.disable_progress_bar()
    os.environ[SEQUENTIAL_LOAD] = "1"
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()
        if sequential is None:
            del os.environ[SEQUENTIAL_LOAD]
        else:
            os.environ[SEQUENTIAL_LOAD] = sequential


def _named_tensors(module: nn.Module, recurse: bool) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(recurse=recurse), *module.named_buffers(recurse=recurse)]


def _own_state(module: nn.Module) -> list[str]:
    """The persistent tensors a module holds itself (not its children's)."""
    buffers = [k for k, b in module._buffers.items() if b is not None and k not in module._non_persistent_buffers_set]
    return [k for k, p in module._parameters.items() if p is not None] + buffers


def release(module: nn.Module) -> None:
    """Drop a module's tensors (back to the meta device): their memory is freed."""
    module.to("meta")


def load_outside_blocks(weights: CheckpointWeights, model: nn.Module, blocks: nn.Module, skip: Iterable[str] = (),
                        device: str | torch.device = "cpu") -> int:
    """Materialize every module outside the decoder blocks except those in ``skip`` (e.g. an untied
    head, read only when an evaluation or the output needs it); returns the bytes read."""
    inside = {id(m) for m in blocks.modules()}
    skipped = {id(m) for name in skip for m in model.get_submodule(name).modules()}
    total = 0
    for name, module in model.named_modules():
        if id(module) in inside or id(module) in skipped:
            continue
        total += weights.load(model, name, device, recurse=False)
    model.tie_weights()
    return total
