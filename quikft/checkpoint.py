"""Packed checkpoints: a quantized model saved as :class:`~quikft.nn.QuikLinear` tensors.

On-disk format (``format_version`` 2)
-------------------------------------
A directory that follows ``save_pretrained`` conventions:

- ``config.json``: the model's config plus ``quantization_config`` =
  ``{quant_method: "quikft", format_version, bits, group_size, sym, salient, metric, act_order,
  method, dtype_rest, modules, settings, source_model}``; ``modules`` lists every quantized linear
  by its full name, ``salient`` the setting as given (a count, or a float fraction of each layer's
  input columns), ``dtype_rest`` is the dtype of every unquantized tensor (bf16 by default),
  ``settings`` holds the complete quantization scheme (provenance; no job settings such as the
  output path or device) and ``source_model`` the full-precision model that was quantized.
- ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards plus
  ``model.safetensors.index.json``: every tensor of the model's state dict, except that each
  quantized linear ``<name>.weight`` is replaced by the QuikLinear buffers ``<name>.qweight``,
  ``.qzeros``, ``.scales``, ``.g_idx``, ``.perm``, ``.salient_idx``, ``.salient_weight`` (and
  ``.bias`` in float32 when the layer has one); layouts and dtypes are documented in
  :mod:`quikft.nn.quik_linear`. Only the ``in - k`` non-salient columns have codes, stored
  group-contiguous: ``qweight`` is (ceil((in - k)*bits/32), out), ``perm`` (in - k,) names the
  input column of each stored column and ``g_idx`` (in - k,), non-decreasing, its group. Tied
  weights (e.g. ``lm_head`` tied to ``embed_tokens``) are stored once, under the name
  ``from_pretrained`` expects.
- tokenizer files and ``generation_config.json``.

Per-layer k and group count are not in ``config.json``: they are read from the tensor shapes
in the safetensors headers (``salient_idx`` is (k,), ``scales`` is (n_groups, out)), so a
layer whose k was capped needs no special case; the shapes of ``qweight`` and ``g_idx``
are then checked against the ``in - k`` they imply.

Format 1 (quikft 0.1) had no ``perm``: the non-salient columns were stored in ascending column
order with act-order's arbitrary ``g_idx``. Such checkpoints still load (the columns are
reordered in memory, the weights are identical) and ``quikft convert`` rewrites them as format 2.

Loading is strict: before any tensor is read, the headers are checked against the model the
config describes, and every missing, unexpected, misshapen, mistyped or truncated tensor is
reported as a one-line :class:`CheckpointError` naming the file and the tensor. A loaded model
is prepared for inference at once: every QuikLinear picks the fastest kernel for the device and
dtype (:mod:`quikft.nn.kernels`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import struct
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from quikft import arch
from quikft.atomic import atomic_directory, check_output, is_regular_file, write_json
from quikft.bits import BitsCount, count_bits
from quikft.config import BITS, REST_DTYPES, ConfigError, brief, parse_salient, salient_text
from quikft.hardware import compute_dtype, default_device, resolve_dtype
from quikft.nn.kernels import RefusalKind
from quikft.nn.quik_linear import QuikLinear, prepare_for_inference
from quikft.nn.stored_head import keep_tied_head_in_bf16
from quikft.runinfo import return_freed_memory
from quikft.validation import CheckpointError, checksum_metadata, validate_layer_values, verify_checksums

if TYPE_CHECKING:
    from quikft.config import QuantConfig
    from quikft.quant.gptq import QuantResult
    from quikft.quant.pipeline import QuantizedLayers

QUANT_METHOD = "quikft"
# Loading recomputes the checksums only on request: see the README (a full extra read of the weights).
VERIFY_ON_LOAD = False
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
QUIK_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "perm", "salient_idx", "salient_weight")
V1_TENSORS = tuple(name for name in QUIK_TENSORS if name != "perm")
DTYPE_REST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Keys of quantization_config that loading relies on.
REQUIRED_KEYS = ("bits", "group_size", "sym", "salient", "modules")
SETTING_KEYS = ("bits", "group_size", "sym", "salient", "metric", "act_order", "method")
EXPERTS_KEY = "unfused_experts"
LAYER_BITS_KEY = "layer_bits"  # --target-bpw: name -> bits of every layer

# safetensors dtype codes -> torch dtypes (those a checkpoint of ours can hold).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says about one tensor."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0  # absolute byte offset of the tensor's data in ``file``

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


# --------------------------------------------------------------------------------------------
# saving


def save_packed(model: nn.Module, tokenizer: Any, quantized: QuantizedLayers, out_dir: str | os.PathLike,
                quant_config: QuantConfig | Mapping[str, Any], overwrite: bool = True,
                max_shard_size: int | str = "5GB", source_model: str | None = None) -> Path:
    """Write ``model`` with its quantized linears packed as a loadable checkpoint directory.

    ``quantized`` is what :func:`quikft.quant.pipeline.quantize_model` returned for ``model``;
    the model itself is not modified and no full-size weight is copied. The directory is
    written under a temporary name and renamed at the end, so a failure leaves nothing behind.
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as staging:
        write_packed(model, tokenizer, quantized, staging, quant_config, max_shard_size, source_model)
    return out_dir


def write_packed(model: nn.Module, tokenizer: Any, quantized: QuantizedLayers, directory: str | os.PathLike,
                 quant_config: QuantConfig | Mapping[str, Any], max_shard_size: int | str = "5GB",
                 source_model: str | None = None) -> dict:
    """:func:`save_packed` into an existing (staging) directory; returns the quantization_config.

    ``source_model`` (the full-precision model quantized; provenance, and the default KD teacher
    of a later recovery) is recorded in its own field; ``quant_config`` is the scheme only.
    """
    qconfig = build_quantization_config(quantized, quant_config, source_model)
    _write(model, tokenizer, packed_state_dict(model, quantized), qconfig, Path(directory), max_shard_size)
    return qconfig


def write_quik_model(model: nn.Module, tokenizer: Any, directory: str | os.PathLike,
                     qconfig: Mapping[str, Any] | None = None, max_shard_size: int | str = "5GB") -> dict:
    """Write a model whose quantized linears already are :class:`QuikLinear` layers (a loaded
    checkpoint, e.g. after Post-GIFT-SW changed its salient columns) into ``directory``.

    Its buffers are the checkpoint format, so this is the state dict as it is (codes a loader
    dropped are rebuilt bit for bit); ``qconfig`` defaults to the model's own
    ``quantization_config`` and always gets the current format version.
    """
    qconfig = dict(qconfig if qconfig is not None else model.config.quantization_config)
    quik = sorted(name for name, m in model.named_modules() if isinstance(m, QuikLinear))
    if not quik or quik != sorted(qconfig.get("modules", [])):
        raise ValueError("the model's QuikLinear layers do not match its quantization_config modules")
    qconfig["format_version"] = FORMAT_VERSION  # a loaded format-1 model was reordered in memory
    state = model.state_dict()
    for key in tied_weight_keys(model):
        state.pop(key, None)
    _write(model, tokenizer, state, qconfig, Path(directory), max_shard_size)
    return qconfig


def _write(model: nn.Module, tokenizer: Any, state: dict[str, Tensor], qconfig: dict, directory: Path,
           max_shard_size: int | str) -> None:
    """Shards (unquantized tensors in the checkpoint's ``dtype_rest``), config files and tokenizer."""
    state = cast_unquantized(state, qconfig["modules"], rest_dtype(qconfig))
    write_shards(state, directory, max_shard_size)
    write_model_config(model, qconfig, directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def rest_dtype(qconfig: Mapping[str, Any]) -> torch.dtype:
    """The dtype of a checkpoint's unquantized tensors (format 1 stored them in float32)."""
    name = qconfig.get("dtype_rest", "fp32")
    if name not in DTYPE_REST:
        raise CheckpointError(f"quantization_config.dtype_rest is {name!r}; expected one of {', '.join(DTYPE_REST)}")
    return DTYPE_REST[name]


def build_quantization_config(quantized: QuantizedLayers, quant_config: QuantConfig | Mapping[str, Any],
                              source_model: str | None = None) -> dict:
    """The ``quantization_config`` entry of config.json (see the module docstring)."""
    settings = dict(quant_config.to_dict() if hasattr(quant_config, "to_dict") else quant_config)
    missing = [key for key in SETTING_KEYS if key not in settings]
    if missing:
        raise ValueError(f"quantize settings lack {', '.join(missing)}")
    # Streamed jobs keep no results in memory (each block was packed and written when done): the
    # layer reports name the modules then, and the writer checked every layer's bits and grid.
    modules = list(quantized.results) or [layer.name for layer in quantized.layers]
    if not modules:
        raise ValueError("nothing to save: the model has no quantized layers")
    for name, result in quantized.results.items():
        check_layer_grid(name, result, settings)
    dtype_rest = settings.get("dtype_rest", "fp32")
    if dtype_rest not in DTYPE_REST:
        raise ValueError(f"dtype_rest {dtype_rest!r} is not one of {', '.join(DTYPE_REST)}")
    qconfig = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION,
               **{key: settings[key] for key in SETTING_KEYS}, "dtype_rest": dtype_rest,
               "modules": modules, "settings": settings, "source_model": source_model}
    if settings.get("target_bpw") is not None:
        qconfig.update(_mixed_settings(quantized, modules))
    if quantized.experts:
        # MoE layers whose 3-D expert weights are stored as one packed linear per expert.
        qconfig[EXPERTS_KEY] = list(quantized.experts)
    return qconfig


def _mixed_settings(quantized: QuantizedLayers, modules: list[str]) -> dict[str, Any]:
    """A --target-bpw checkpoint's per-layer bits (``layer_bits``, what loaders unpack with) and, as
    ``bits``/``salient``, the most common choices (what a reader of the summary sees first)."""
    chosen = {name: (r.bits, int(r.salient.numel())) for name, r in quantized.results.items()} or \
        {layer.name: (layer.bits, layer.salient) for layer in quantized.layers}
    missing = [name for name in modules if chosen.get(name, (None,))[0] not in BITS]
    if missing:
        raise ValueError(f"layer {missing[0]} has no recorded bit-width")
    most = Counter(chosen[name] for name in modules).most_common(1)[0][0]
    return {"bits": most[0], "salient": most[1], LAYER_BITS_KEY: {name: chosen[name][0] for name in modules}}


def declared_bits(qconfig: Mapping[str, Any], name: str) -> int:
    """The bit-width a checkpoint declares for one layer (per layer in a --target-bpw checkpoint)."""
    return int((qconfig.get(LAYER_BITS_KEY) or {}).get(name, qconfig["bits"]))


def check_layer_grid(name: str, result: QuantResult, settings: Mapping[str, Any]) -> None:
    """The config is the loader's only source for bits; a layer that disagrees would unpack wrongly.
    (Under --target-bpw each layer's bits are recorded from its result.)"""
    per_layer = settings.get("target_bpw") is not None
    if (result.bits != settings["bits"] and not per_layer) or result.sym != settings["sym"]:
        raise ValueError(f"layer {name} was quantized with bits={result.bits}, sym={result.sym}, but the "
                         f"settings say bits={settings['bits']}, sym={settings['sym']}")


def packed_state_dict(model: nn.Module, quantized: QuantizedLayers) -> dict[str, Tensor]:
    """The model's state dict with each quantized linear's weight (and bias) replaced by packed tensors.

    State-dict tensors are references to the model's own storage, so the only new memory is
    the packed tensors themselves.
    """
    state = model.state_dict()
    for key in tied_weight_keys(model):
        state.pop(key, None)
    return pack_into(state, quantized.results)


def pack_into(state: dict[str, Tensor], results: Mapping[str, QuantResult]) -> dict[str, Tensor]:
    """Replace each quantized layer's ``weight`` (and ``bias``) in ``state`` by its packed tensors."""
    for name, result in results.items():
        if f"{name}.weight" not in state:
            raise ValueError(f"quantized layer {name} is not a linear layer of this model")
        del state[f"{name}.weight"]
        bias = state.pop(f"{name}.bias", None)
        layer = QuikLinear.from_quantized(result.codes, result.scales, result.zeros, result.g_idx, result.salient,
                                          result.salient_weight, bias, result.bits, result.group_size)
        state.update({f"{name}.{key}": tensor for key, tensor in layer.state_dict().items()})
    return state


def cast_unquantized(state: dict[str, Tensor], modules: Iterable[str], dtype: torch.dtype) -> dict[str, Tensor]:
    """Floating tensors other than the packed layers' own, in ``dtype`` (the checkpoint's dtype_rest)."""
    quik = {f"{name}.{key}" for name in modules for key in (*QUIK_TENSORS, "bias")}
    return {name: t.to(dtype) if t.is_floating_point() and name not in quik else t for name, t in state.items()}


def tied_weight_keys(model: nn.Module) -> set[str]:
    """State-dict keys that alias another weight and are re-tied by the loader (e.g. ``lm_head.weight``)."""
    return set(getattr(model, "all_tied_weights_keys", None) or {})


def write_shards(state: dict[str, Tensor], directory: Path, max_shard_size: int | str) -> None:
    """Save ``state`` with ``save_pretrained``'s file names: one file, or shards plus an index."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_weights({name: state[name] for name in names}, directory / filename)
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": dict(split.tensor_to_filename)}
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


def write_model_config(model: nn.Module, qconfig: dict, directory: Path) -> None:
    """config.json (with quantization_config) and generation_config.json, leaving ``model`` untouched."""
    config = copy.deepcopy(model.config)
    config.quantization_config = qconfig
    config.architectures = [type(model).__name__]
    config.dtype = str(rest_dtype(qconfig)).removeprefix("torch.")  # dtype of the unquantized tensors
    config.save_pretrained(directory)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and model.can_generate():
        generation_config.save_pretrained(directory)


# --------------------------------------------------------------------------------------------
# reading and checking


def is_packed_checkpoint(path: str | os.PathLike) -> bool:
    """True for a local directory whose config.json declares ``quant_method: quikft``."""
    config_file = Path(path) / CONFIG_NAME
    if not config_file.is_file():
        return False
    try:
        qconfig = json.loads(config_file.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, AttributeError):
        return False
    return isinstance(qconfig, dict) and qconfig.get("quant_method") == QUANT_METHOD


def read_model_config(path: str | os.PathLike) -> dict:
    """The ``config.json`` of the checkpoint directory ``path``, as JSON (an object)."""
    config_file = Path(path) / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: not found; is {path} a checkpoint directory?")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({brief(err)})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: not a model config (a JSON object)")
    return config


def read_quantization_config(path: str | os.PathLike) -> dict:
    """The validated ``quantization_config`` of the checkpoint directory ``path``."""
    config_file = Path(path) / CONFIG_NAME
    qconfig = read_model_config(path).get("quantization_config")
    if not isinstance(qconfig, dict):
        raise CheckpointError(f"{config_file}: no quantization_config; this is not a quikft packed checkpoint")
    validate_quantization_config(qconfig, config_file)
    return qconfig


def validate_quantization_config(qconfig: Mapping[str, Any], source: str | os.PathLike) -> None:
    """Refuse configs of another method, of an unknown format version, or lacking what loading needs."""
    method = qconfig.get("quant_method")
    if method != QUANT_METHOD:
        raise CheckpointError(f"{source}: quantization_config.quant_method is {method!r}, not {QUANT_METHOD!r}")
    version = qconfig.get("format_version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise CheckpointError(f"{source}: quikft format_version {version!r} is not supported by this quikft "
                              f"(it reads versions {', '.join(map(str, READABLE_VERSIONS))}); upgrade quikft")
    missing = [key for key in REQUIRED_KEYS if key not in qconfig]
    if missing:
        raise CheckpointError(f"{source}: quantization_config lacks {', '.join(missing)}")
    if not isinstance(qconfig["modules"], list) or not qconfig["modules"]:
        raise CheckpointError(f"{source}: quantization_config.modules must be a non-empty list of layer names")
    _check_declared_values(qconfig, source)


def _check_declared_values(qconfig: Mapping[str, Any], source: str | os.PathLike) -> None:
    """The scalar settings a checkpoint declares have the types and ranges quantize writes (``info``
    prints them and loaders build layers from them, so a crafted value must not pass as another)."""
    def integer(key: str) -> Any:
        value = qconfig.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    bits, group_size = integer("bits"), integer("group_size")
    problems = []
    if bits not in BITS:
        problems.append(f"bits {brief(qconfig.get('bits'))} (one of {', '.join(map(str, BITS))})")
    if group_size is None or not (group_size == -1 or group_size > 0):
        problems.append(f"group_size {brief(qconfig.get('group_size'))} (a positive size or -1)")
    if not _declared_salient(qconfig.get("salient")):
        problems.append(f"salient {brief(qconfig.get('salient'))} (a count >= 0 or a fraction in (0, 1))")
    if not isinstance(qconfig.get("sym"), bool):
        problems.append(f"sym {brief(qconfig.get('sym'))} (true or false)")
    if "dtype_rest" in qconfig and qconfig["dtype_rest"] not in REST_DTYPES:
        problems.append(f"dtype_rest {brief(qconfig['dtype_rest'])} (one of {', '.join(REST_DTYPES)})")
    layer_bits = qconfig.get(LAYER_BITS_KEY)
    if layer_bits is not None and not (isinstance(layer_bits, dict) and all(
            isinstance(v, int) and not isinstance(v, bool) and v in BITS for v in layer_bits.values())
            and set(layer_bits) <= set(map(str, qconfig.get("modules") or []))):
        problems.append(f"{LAYER_BITS_KEY} {brief(layer_bits)} (its layers' bits, each one of "
                        f"{', '.join(map(str, BITS))})")
    if problems:
        raise CheckpointError(f"{source}: quantization_config declares {'; '.join(problems)}")


def _declared_salient(value: Any) -> bool:
    """The scheme as quantize records it: a count or a float fraction (never the CLI's "3%" text)."""
    if isinstance(value, str):
        return False
    try:
        parse_salient(value)
    except ConfigError:
        return False
    return True


# Config entries that size the model a config builds, and never hold a negative value in any family.
SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "moe_intermediate_size", "max_position_embeddings")
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "n_shared_experts")


def check_model_config(config: Mapping[str, Any], qconfig: Mapping[str, Any],
                       tensors: Mapping[str, TensorInfo] | None, source: str | os.PathLike) -> None:
    """The sizes ``config.json`` declares, checked before the model it describes is built: building
    runs the family's code on them (a negative vocabulary fails inside torch), and its cost grows
    with the layer and expert counts (a million layers took minutes and gigabytes before any check).
    With the stored ``tensors``, the model may have no more layers or experts than they can fill."""
    sections = [config, *(v for k, v in config.items() if k.endswith("_config") and isinstance(v, Mapping)
                          and k != "quantization_config")]
    for section in sections:
        for key in (*SIZE_KEYS, *EXPERT_COUNT_KEYS):
            value = section.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise CheckpointError(f"{source}: {key} is {brief(value)}; a size must be a count >= 0")
    if tensors is None:
        return
    prefix, stored = stored_blocks(qconfig, tensors)
    for section in sections:
        layers = section.get("num_hidden_layers")
        if layers is not None and prefix and layers > len(stored):
            raise CheckpointError(f"{source}: num_hidden_layers is {layers}, but the weights hold {len(stored)} "
                                  f"blocks under {prefix}")
        for key in EXPERT_COUNT_KEYS:
            if (section.get(key) or 0) > len(tensors):  # every expert stores at least one tensor
                raise CheckpointError(f"{source}: {key} is {section[key]}, more experts than the weights hold "
                                      f"tensors ({len(tensors)})")


def stored_blocks(qconfig: Mapping[str, Any], tensors: Mapping[str, TensorInfo]) -> tuple[str, set[int]]:
    """The decoder blocks' name prefix (from the first quantized module's name, e.g. ``model.layers``)
    and the block numbers the stored tensors hold under it."""
    parts = str(next(iter(qconfig.get("modules") or []), "")).split(".")
    index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
    if index is None:
        return "", set()
    prefix = ".".join(parts[:index])
    blocks = {name[len(prefix) + 1:].split(".", 1)[0] for name in tensors if name.startswith(f"{prefix}.")}
    return prefix, {int(block) for block in blocks if block.isdigit()}


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory (one file, or the shards of the index)."""
    path = Path(path)
    index_file = path / INDEX_NAME
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index_file}: not a valid safetensors index ({brief(err)})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_file}: weight_map must map tensor names to file names")
        return [_shard(path, name, index_file) for name in sorted(set(weight_map.values()))]
    if (path / WEIGHTS_NAME).exists():
        return [path / WEIGHTS_NAME]
    raise CheckpointError(f"{path}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found")


def _shard(path: Path, name: str, index_file: Path) -> Path:
    """A shard the index names: a plain file name inside the checkpoint directory (never a path that
    leaves it), naming a regular file (a hub snapshot's link to its blob is one)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or Path(name).is_absolute():
        raise CheckpointError(f"{index_file}: shard {brief(name)} is not a file name inside the checkpoint "
                              f"directory; indexes name their shards, never paths")
    shard = path / name
    if shard.exists() and not shard.is_file():
        raise CheckpointError(f"{shard}: not a regular file (a shard must be a safetensors file)")
    return shard


def _raw_header(file: Path) -> tuple[dict, int, int]:
    """A safetensors file's header JSON, the offset where its data starts and the data's size."""
    if not file.is_file():
        raise CheckpointError(f"{file}: weights file not found")
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise CheckpointError(f"{file}: truncated or corrupt safetensors file (header of {header_len} bytes, "
                                  f"file of {size})")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # RecursionError: nested 100k deep
            raise CheckpointError(f"{file}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header")
    return header, 8 + header_len, size - 8 - header_len


def read_header(file: str | os.PathLike) -> dict[str, TensorInfo]:
    """Parse one safetensors header, checking that every tensor's bytes are inside the file.

    Reading the header alone is cheap, and checking the data offsets here catches a truncated
    or corrupt file before anything is loaded, with the name of the first tensor it damages.
    """
    file = Path(file)
    header, data_start, data_size = _raw_header(file)
    tensors = {name: _tensor_info(file, name, entry, data_start, data_size)
               for name, entry in header.items() if name != "__metadata__"}
    _check_tiling(file, tensors, data_start, data_size)
    return tensors


def _check_tiling(file: Path, tensors: Mapping[str, TensorInfo], data_start: int, data_size: int) -> None:
    """The tensors' bytes follow one another without gap or overlap, as safetensors requires (its own
    reader refuses such a file later with a traceback; two names sharing bytes would alias)."""
    expected = data_start
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].offset, item[1].nbytes)):
        if info.offset != expected:
            where = "overlaps the tensor before it" if info.offset < expected else "leaves a gap before it"
            raise CheckpointError(f"{file}: corrupt header: tensor {name} starts at data byte "
                                  f"{info.offset - data_start}, which {where} (expected {expected - data_start})")
        expected += info.nbytes
    if expected != data_start + data_size:
        raise CheckpointError(f"{file}: corrupt safetensors file: {data_start + data_size - expected} bytes after "
                              f"its last tensor")


def read_metadata(file: str | os.PathLike) -> dict[str, str] | None:
    """The ``__metadata__`` of one safetensors file (where quikft records checksums), if any."""
    metadata = _raw_header(Path(file))[0].get("__metadata__")
    return metadata if isinstance(metadata, dict) else None


def _tensor_info(file: Path, name: str, entry: Any, data_start: int, data_size: int) -> TensorInfo:
    try:
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        shape = tuple(int(n) for n in entry["shape"])
        begin, end = (int(n) for n in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{file}: corrupt header entry for tensor {name}") from None
    info = TensorInfo(file, dtype, shape, data_start + begin)
    if begin < 0 or end < begin or any(n < 0 for n in shape):
        raise CheckpointError(f"{file}: corrupt header entry for tensor {name} (negative size or offset)")
    if end > data_size:
        raise CheckpointError(f"{file}: truncated safetensors file: tensor {name} ends at data byte {end}, "
                              f"the file holds {data_size}")
    if end - begin != info.nbytes:
        raise CheckpointError(f"{file}: corrupt header: tensor {name} spans {end - begin} bytes, "
                              f"its shape and dtype need {info.nbytes}")
    return info


def read_headers(files: Iterable[str | os.PathLike]) -> dict[str, TensorInfo]:
    """All tensors of a (possibly sharded) checkpoint by name; a name stored twice is an error."""
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in read_header(file).items():
            if name in tensors:
                raise CheckpointError(f"{file}: tensor {name} is also stored in {tensors[name].file.name}")
            tensors[name] = info
    return tensors


def weights_source(files: list[Path]) -> Path:
    """The file to name when a tensor is missing: the only weights file, or the shards' index."""
    return files[0] if len(files) == 1 else files[0].parent / INDEX_NAME


def swap_in_quik_layers(model: nn.Module, qconfig: Mapping[str, Any], tensors: Mapping[str, TensorInfo],
                        source: Path, device: torch.device | str | None = None) -> None:
    """Replace every listed linear of ``model`` by an empty QuikLinear shaped after the stored tensors.

    in/out features come from the model the config builds; k and the group count from the
    stored ``salient_idx`` and ``scales``. The empty layer's buffers have the shapes these
    imply (``qweight`` rows ceil((in - k)*bits/32), ``g_idx`` length in - k), which
    :func:`check_tensors` then compares with every stored shape. ``source`` is
    :func:`weights_source`; ``device=None`` follows the current default device, so inside a
    meta-device context the new layers allocate nothing. Experts modules the config lists under
    ``unfused_experts`` are first given one linear per expert (see :mod:`quikft.arch.experts`).
    """
    try:
        arch.unfuse_listed_experts(model, qconfig.get(EXPERTS_KEY, []))
    except arch.UnsupportedArchitectureError as err:
        raise CheckpointError(f"{source.parent / CONFIG_NAME}: {err}") from None
    for name in qconfig["modules"]:
        in_features, out_features = arch.dims_of(_linear(model, name, source))
        k = _stored_k(tensors, name, in_features, source)
        n_groups = _stored_dim(tensors, f"{name}.scales", 2, source)
        layer = QuikLinear(in_features, out_features, declared_bits(qconfig, name), int(qconfig["group_size"]), k,
                           n_groups, f"{name}.bias" in tensors, device=device)
        if qconfig["format_version"] == 1:
            layer.perm = None  # format 1 stores no perm; finish_loading derives it
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)


def _linear(model: nn.Module, name: str, source: Path) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if module is None or not arch.is_projection(module):
        raise CheckpointError(f"{source.parent / CONFIG_NAME}: quantized module {name} is not a linear layer "
                              f"of {type(model).__name__}")
    return module


def _stored_k(tensors: Mapping[str, TensorInfo], name: str, in_features: int, source: Path) -> int:
    """The layer's k (length of its stored ``salient_idx``), which cannot exceed in_features."""
    k = _stored_dim(tensors, f"{name}.salient_idx", 1, source)
    if k > in_features:
        raise CheckpointError(f"{tensors[f'{name}.salient_idx'].file}: tensor {name}.salient_idx has {k} "
                              f"entries, more than the layer's {in_features} input columns")
    return k


def _stored_dim(tensors: Mapping[str, TensorInfo], name: str, ndim: int, source: Path) -> int:
    """Leading dimension of a stored tensor that must have ``ndim`` dimensions."""
    info = tensors.get(name)
    if info is None:
        raise CheckpointError(f"{source}: tensor {name} is missing")
    if len(info.shape) != ndim:
        raise CheckpointError(f"{info.file}: tensor {name} has shape {list(info.shape)}, expected {ndim} dimensions")
    return info.shape[0]


def check_tensors(model: nn.Module, tensors: Mapping[str, TensorInfo], source: Path) -> None:
    """Compare the stored tensors with what ``model`` (with its QuikLinears in place) expects.

    Quantized tensors must match dtype exactly (a cast would change the packed bits or the
    fp16-exact scales); other floating tensors may be stored in any float dtype, as with
    ``from_pretrained``. ``source`` (see :func:`weights_source`) is named for missing tensors.
    """
    quik = {f"{name}.{key}" for name, m in model.named_modules() if isinstance(m, QuikLinear)
            for key in (*QUIK_TENSORS, "bias")}
    expected = {key: value for key, value in model.state_dict().items() if key not in tied_weight_keys(model)}
    for name, ref in expected.items():
        info = tensors.get(name)
        if info is None:
            raise CheckpointError(f"{source}: tensor {name} is missing")
        if info.shape != tuple(ref.shape):
            raise CheckpointError(f"{info.file}: tensor {name} has shape {list(info.shape)}, "
                                  f"expected {list(ref.shape)}")
        if info.dtype != ref.dtype and (name in quik or not (info.dtype.is_floating_point and ref.is_floating_point())):
            raise CheckpointError(f"{info.file}: tensor {name} has dtype {info.dtype}, expected {ref.dtype}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{tensors[unexpected[0]].file}: unexpected tensor {unexpected[0]}")


def check_layer_values(model: nn.Module, tensors: Mapping[str, TensorInfo], qconfig: Mapping[str, Any]) -> None:
    """:func:`~quikft.validation.validate_layer_values` on every QuikLinear of a just-loaded model (its
    buffers are the stored tensors; a format-1 layer, with no ``perm`` yet, before its reordering)."""
    for name, layer in model.named_modules():
        if isinstance(layer, QuikLinear):
            values = {key: getattr(layer, key) for key in (*QUIK_TENSORS, "bias") if getattr(layer, key) is not None}
            _validate_layer(name, values, tensors, qconfig, layer.in_features)


def _validate_layer(name: str, values: Mapping[str, Tensor], tensors: Mapping[str, TensorInfo],
                    qconfig: Mapping[str, Any], in_features: int) -> None:
    files = {key: tensors[f"{name}.{key}"].file for key in values if f"{name}.{key}" in tensors}
    validate_layer_values(name, values, files, in_features=in_features, bits=declared_bits(qconfig, name),
                          group_size=int(qconfig["group_size"]), sym=bool(qconfig["sym"]))


def finish_loading(model: nn.Module, qconfig: dict, prepare: bool = True, kernel: str | None = None,
                   compact_head: bool = True) -> dict[str, int]:
    """Bring a loaded model's QuikLinears to the current layout and prepare their kernels.

    Format-1 layers are reordered group-contiguously (the weights do not change) and the
    in-memory ``quantization_config`` then says format 2. With ``prepare`` every layer picks its
    kernel for the model's device and dtype now (``kernel`` forces one) and, where that kernel
    can rebuild them, drops the stored codes (see :func:`~quikft.nn.prepare_for_inference`); with
    ``compact_head`` too, a tied fp32 embedding and head whose values are all bf16 numbers are held
    once in bf16 (:func:`~quikft.nn.keep_tied_head_in_bf16`). Returns the kernel counts.
    """
    if qconfig.get("format_version") == 1:
        for layer in model.modules():
            if isinstance(layer, QuikLinear):
                layer.upgrade_from_v1()
        qconfig["format_version"] = FORMAT_VERSION
    if not prepare:
        return {}
    counts = prepare_for_inference(model, kernel=kernel)
    if compact_head:
        keep_tied_head_in_bf16(model)
    # The widened embedding, the released codes and the kernels' temporaries are free now: give the
    # heap back, so the process holds about what the model holds.
    return_freed_memory()
    return counts


# --------------------------------------------------------------------------------------------
# loading


def load(path: str | os.PathLike, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
         *, prepare: bool = True, verify: bool = VERIFY_ON_LOAD, trust_remote_code: bool = False,
         kernel: str | None = None, compact_head: bool = True) -> nn.Module:
    """Load a packed checkpoint directory as a model with QuikLinear layers, in eval mode.

    ``dtype`` applies to the unquantized tensors (embeddings, norms, lm_head) and so to the
    activations; the packed buffers keep their stored dtypes. ``None``/``"auto"`` picks what the
    device runs fast (bf16 where native, else fp32: :mod:`quikft.hardware`). The model is built
    on the meta device, so no memory is spent on the full-precision linears it replaces. With
    ``prepare`` (the default) every QuikLinear takes its fastest kernel for that device and
    dtype at once (on a CPU with bf16, the int4 path, which then holds the codes alone);
    ``prepare=False`` keeps the stored layout untouched until the first forward. ``kernel`` (or
    ``$QUIKFT_KERNEL``) forces one registered kernel on every layer instead of the measured choice.
    ``compact_head`` holds a tied embedding and head stored in bf16 once in bf16 on an fp32 model
    (exact; training loads turn it off so the head stays an ``nn.Linear``). ``verify``
    recomputes the recorded checksums first (see :data:`VERIFY_ON_LOAD`). A model class defined
    by code in the checkpoint runs only with ``trust_remote_code``.
    """
    path, device = Path(path), torch.device(device)
    dtype = resolve_dtype(dtype, device).dtype
    model, qconfig, files, tensors = _checked_skeleton(path, dtype, trust_remote_code)
    if verify:
        verify_checksums(tensors, {file: read_metadata(file) for file in files})
    _load_tensors(model, tensors, dtype, device)
    materialize_non_persistent(model, device)
    arch.mark_quantized(model)  # as transformers' own quantized loading does
    model.tie_weights()
    _check_materialized(model)
    check_layer_values(model, tensors, qconfig)
    finish_loading(model, model.config.quantization_config, prepare, kernel, compact_head)
    return model.eval()


def _checked_skeleton(path: Path, dtype: torch.dtype, trust_remote_code: bool
                      ) -> tuple[nn.Module, dict, list[Path], dict[str, TensorInfo]]:
    """The checks every loader runs before reading a tensor: config, headers against the model the
    config describes (a meta-device skeleton with empty QuikLinears of the stored shapes)."""
    from transformers import AutoConfig

    qconfig = read_quantization_config(path)
    files = weight_files(path)
    tensors = read_headers(files)
    check_model_config(read_model_config(path), qconfig, tensors, path / CONFIG_NAME)
    model = _skeleton(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), dtype,
                      trust_remote_code)
    # Empty layers on the meta device: the stored tensors replace their buffers (assign=True).
    swap_in_quik_layers(model, qconfig, tensors, weights_source(files), device="meta")
    check_tensors(model, tensors, weights_source(files))
    return model, qconfig, files, tensors


def check_checkpoint(path: str | os.PathLike, verify: bool = False, trust_remote_code: bool = False) -> dict:
    """Every check :func:`load` makes, without loading the model (what ``quikft info`` runs).

    The headers are checked against the model skeleton, then each quantized layer's stored values
    (everything but the packed codes) are read and validated; ``verify`` also recomputes every
    recorded checksum. Returns what was checked; raises :class:`CheckpointError` otherwise.
    """
    from safetensors import safe_open

    path = Path(path)
    model, qconfig, files, tensors = _checked_skeleton(path, torch.float32, trust_remote_code)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuikLinear)}
    with contextlib.ExitStack() as stack:
        handles = {file: stack.enter_context(safe_open(file, framework="pt")) for file in files}
        for name, layer in layers.items():
            # Everything but the packed codes: the values the checks read, a small part of the file.
            keys = [f"{name}.{key}" for key in (*QUIK_TENSORS, "bias") if key != "qweight"]
            values = {key.rpartition(".")[2]: handles[tensors[key].file].get_tensor(key)
                      for key in keys if key in tensors}
            _validate_layer(name, values, tensors, qconfig, layer.in_features)
    checked = {"layers": len(layers)}
    if verify:
        checked["checksums"] = verify_checksums(tensors, {file: read_metadata(file) for file in files})
    return checked


def _skeleton(config: Any, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model the config describes, on the meta device, with its quantization_config as a dict.

    The quantization_config is set aside while building, so transformers builds a plain
    skeleton; our loader, not transformers, puts the quantized layers in.
    """
    from transformers import AutoModelForCausalLM

    qconfig = config.quantization_config
    del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.config.quantization_config = qconfig
    return model


def _load_tensors(model: nn.Module, tensors: Mapping[str, TensorInfo], dtype: torch.dtype,
                  device: torch.device) -> None:
    """Assign the stored tensors one file at a time (peak memory: the model plus one shard)."""
    from safetensors import SafetensorError, safe_open

    quik = {name for name, m in model.named_modules() if isinstance(m, QuikLinear)}
    for file in sorted({info.file for info in tensors.values()}):
        state = {}
        try:
            with safe_open(file, framework="pt", device=str(device)) as handle:
                for name in handle.keys():  # noqa: SIM118 -- safe_open handles are not iterable
                    state[name] = _as_loaded(handle.get_tensor(name), name, quik, dtype)
        except SafetensorError as err:
            reason = (str(err).splitlines() or ["unknown error"])[0]
            raise CheckpointError(f"{file}: cannot read safetensors file ({reason})") from None
        result = model.load_state_dict(state, strict=False, assign=True)
        if result.unexpected_keys:  # check_tensors ran first, so this means a loader bug
            raise CheckpointError(f"{file}: unexpected tensor {result.unexpected_keys[0]}")


def _as_loaded(tensor: Tensor, name: str, quik: set[str], dtype: torch.dtype) -> Tensor:
    """Cast unquantized floating tensors to the requested dtype; packed buffers stay as stored."""
    if tensor.is_floating_point() and name.rpartition(".")[0] not in quik:
        return tensor.to(dtype)
    return tensor


def materialize_non_persistent(model: nn.Module, device: torch.device | str, root: nn.Module | None = None,
                               recurse: bool = True) -> None:
    """Compute the buffers that are not saved (e.g. rotary ``inv_freq``), still on meta after loading.

    transformers' own meta-device loading recomputes them through ``_init_weights``; we do the
    same for exactly the modules that own such buffers (``root`` and, with ``recurse``, the modules
    below it; by default the whole model).
    """
    root = root or model
    for module in root.modules() if recurse else [root]:
        if any(b is not None and b.is_meta for b in module.buffers(recurse=False)):
            # The module may also own loaded tensors (a scaled embedding: its weight beside a computed
            # scale), which to_empty and _init_weights would overwrite: keep them.
            loaded = {name: t.detach() for name, t in [*module._parameters.items(), *module._buffers.items()]
                      if t is not None and not t.is_meta}
            module.to_empty(device=device, recurse=False)
            model._init_weights(module)
            with torch.no_grad():
                for name, tensor in loaded.items():
                    getattr(module, name).copy_(tensor)


def _check_materialized(model: nn.Module) -> None:
    """Nothing may stay on the meta device: it would fail at the first forward, far from the cause."""
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"cannot materialize {leftover[0]}: it is neither stored nor tied nor computable")


CONVERT_REPORT = "convert_report.json"  # marks a convert's output: only such a directory is replaced


def convert(path: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Rewrite a packed checkpoint in the current format (format 1 -> 2) into the new ``out_dir``.

    The weights are identical (format 2 only stores the quantized columns in another order);
    unquantized tensors keep their stored dtype, and every other file of the directory (reports,
    salient indices) is copied. ``out_dir`` is checked before the model loads, as every job's output
    is (``overwrite`` replaces only a previous convert's output), and written under a temporary name.
    """
    import shutil

    path, out_dir = Path(path), Path(out_dir)
    qconfig = read_quantization_config(path)
    check_output(out_dir, CONVERT_REPORT, overwrite, inputs=[path])
    model = load(path, dtype=rest_dtype(qconfig), prepare=False)
    tokenizer = _stored_tokenizer(path)
    with atomic_directory(out_dir, overwrite=overwrite, marker=CONVERT_REPORT) as staging:
        written = {CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME, "generation_config.json"}
        for item in path.iterdir():
            if is_regular_file(item) and item.name not in written and not item.name.startswith("model-"):
                shutil.copy2(item, staging / item.name)
        write_quik_model(model, tokenizer, staging)
        write_json(staging / CONVERT_REPORT, {"job": "convert", "source": str(path),
                                              "format_version": [qconfig["format_version"], FORMAT_VERSION]})
    return out_dir


def _stored_tokenizer(path: Path) -> Any:
    """The directory's tokenizer as stored (no pad-token defaults added), or None if it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# inspection (``quikft info``)


def describe(path: str | os.PathLike, verify: bool = False) -> dict:
    """Settings, sizes and per-layer salient fractions of a packed checkpoint.

    The checkpoint first passes every check :func:`load` makes (:func:`check_checkpoint`; with
    ``verify`` its checksums too), so ``info`` never describes a checkpoint that would not load.

    ``bits_per_weight`` (the quantized linears) and ``model_bits_per_weight`` (every stored tensor)
    are :mod:`quikft.bits`'s count, the one the job reports use. ``linear_limit_bytes`` is the
    information content of the quantized linears: per row, b bits for each non-salient column and
    16 for each salient one, plus an fp16 scale and a b-bit zero-point per group (and 16 bits per bias entry). Codes are stored for the
    non-salient columns only, so the overhead the packed bytes add on top of the limit is
    just the index tensors (g_idx, salient_idx) and word padding.
    """
    path = Path(path)
    checked = check_checkpoint(path, verify)
    qconfig = read_quantization_config(path)
    files = weight_files(path)
    tensors = read_headers(files)
    source = weights_source(files)
    stored = _layer_tensor_names(qconfig)
    layers = [_layer_summary(name, tensors, declared_bits(qconfig, name), source, stored)
              for name in qconfig["modules"]]
    device = default_device()
    choice = compute_dtype(device)
    for layer, plan in zip(layers, kernel_plan(qconfig, tensors, device, choice.dtype), strict=True):
        layer.update(plan)
    fp16, packed, limit = (sum(layer[key] for layer in layers) for key in ("fp16_bytes", "packed_bytes",
                                                                            "limit_bytes"))
    bits = bits_of(qconfig, tensors)
    return {
        "path": str(path), "format_version": qconfig["format_version"],
        **{key: qconfig.get(key) for key in SETTING_KEYS}, "dtype_rest": qconfig.get("dtype_rest", "fp32"),
        "target_bpw": (qconfig.get("settings") or {}).get("target_bpw") if LAYER_BITS_KEY in qconfig else None,
        "kernel_device": device, "kernel_dtype": choice.to_dict(), "checked": checked,
        "weights_bytes": sum(file.stat().st_size for file in files),
        "directory_bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
        "linear_fp16_bytes": fp16, "linear_packed_bytes": packed, "linear_limit_bytes": limit,
        "compression_vs_fp16": fp16 / packed, "packed_vs_limit": packed / limit,
        "bits_per_weight": bits.linear_bpw, "model_bits_per_weight": bits.model_bpw,
        "salient_fraction": sum(layer["k"] for layer in layers) / sum(layer["in_features"] for layer in layers),
        "layers": layers,
    }


def _layer_tensor_names(qconfig: Mapping[str, Any]) -> tuple[str, ...]:
    return QUIK_TENSORS if qconfig["format_version"] >= 2 else V1_TENSORS


def bits_of(qconfig: Mapping[str, Any], tensors: Mapping[str, TensorInfo]) -> BitsCount:
    """Bits per weight of a checkpoint's linear layers and of the whole model, from its headers."""
    return count_bits(tensors, qconfig["modules"], _layer_tensor_names(qconfig))


def stored_bits(path: str | os.PathLike) -> BitsCount:
    """:func:`bits_of` a packed checkpoint directory (reads its config and headers only)."""
    return bits_of(read_quantization_config(path), read_headers(weight_files(path)))


def kernel_plan(qconfig: Mapping[str, Any], tensors: Mapping[str, TensorInfo], device: str,
                dtype: torch.dtype) -> list[dict]:
    """Per quantized layer: the kernels a load on ``device`` with ``dtype`` activations will use for
    decode and prefill, and why each other registered kernel refuses it (from the stored ``g_idx``).

    On a CPU the choice is measured (:mod:`quikft.nn.autotune`): one stored layer of each distinct
    layout is read and its kernels timed, or their timings read from this machine's cache, which
    the next load then reuses. Elsewhere the highest-priority kernel that accepts the layer.
    """
    from safetensors import safe_open

    from quikft.nn import LayerLayout, autotune, available_kernels, get_kernel, select_kernel, why_not
    from quikft.nn.quik_linear import group_sizes

    plans, measured = [], {}
    for name in qconfig["modules"]:
        info = tensors[f"{name}.g_idx"]
        with safe_open(info.file, framework="pt") as handle:
            g_idx = handle.get_tensor(f"{name}.g_idx")
        n_groups, out_features = tensors[f"{name}.scales"].shape
        k = tensors[f"{name}.salient_idx"].shape[0]
        # Loading stores every layer group-contiguously (format 1 is reordered in memory).
        layout = LayerLayout(g_idx.numel() + k, out_features, declared_bits(qconfig, name), k,
                             group_sizes(g_idx, n_groups), contiguous_groups=True)
        refusals = {other: why_not(get_kernel(other), layout, torch.device(device), dtype)
                    for other in available_kernels()}
        refusals = {other: reason for other, reason in refusals.items() if reason is not None}
        # Plain strings, as ``quikft info --json`` prints them: the texts, and each one's kind.
        refusal_fields = {"refused": {other: reason.text for other, reason in refusals.items()},
                          "refusal_kinds": {other: reason.kind.value for other, reason in refusals.items()}}
        if torch.device(device).type == "cpu":
            key = autotune.layout_key(layout, dtype)
            if key not in measured:
                layer = _stored_layer(qconfig, tensors, name, layout)
                measured[key] = autotune.measured_plan(layer, torch.device(device), dtype)
            plan = measured[key]
            plans.append({"kernel": plan[autotune.DECODE]["kernel"], "decode_us": plan[autotune.DECODE]["us"],
                          "prefill_kernel": plan[autotune.PREFILL]["kernel"],
                          "prefill_us": plan[autotune.PREFILL]["us"], **refusal_fields})
        else:
            kernel = select_kernel(layout, device, dtype).name
            plans.append({"kernel": kernel, "prefill_kernel": kernel, **refusal_fields})
    return plans


def _stored_layer(qconfig: Mapping[str, Any], tensors: Mapping[str, TensorInfo], name: str,
                  layout: Any) -> QuikLinear:
    """One quantized layer read from the checkpoint (to time kernels on its real values)."""
    from safetensors import safe_open

    n_groups = tensors[f"{name}.scales"].shape[0]
    layer = QuikLinear(layout.in_features, layout.out_features, layout.bits, int(qconfig["group_size"]), layout.k,
                       n_groups, f"{name}.bias" in tensors)
    values = {}
    for key in (*QUIK_TENSORS, *V1_TENSORS, "bias"):
        info = tensors.get(f"{name}.{key}")
        if info is not None and key not in values:
            with safe_open(info.file, framework="pt") as handle:
                values[key] = handle.get_tensor(f"{name}.{key}")
    if qconfig["format_version"] == 1:
        layer.perm = None
    layer.load_state_dict(values, strict=False, assign=True)
    if qconfig["format_version"] == 1:
        layer.upgrade_from_v1()
    return layer


def _layer_summary(name: str, tensors: Mapping[str, TensorInfo], bits: int, source: Path,
                   stored: tuple[str, ...]) -> dict:
    shapes = {}
    for key in stored:
        info = tensors.get(f"{name}.{key}")
        if info is None:
            raise CheckpointError(f"{source}: tensor {name}.{key} is missing")
        shapes[key] = info.shape
    (n_groups, out_features), k = shapes["scales"], shapes["salient_idx"][0]
    in_features = shapes["g_idx"][0] + k  # g_idx covers the non-salient columns only
    bias = tensors.get(f"{name}.bias")
    packed = sum(tensors[f"{name}.{key}"].nbytes for key in stored) + (bias.nbytes if bias else 0)
    limit_bits = (out_features * (bits * (in_features - k) + 16 * k) + n_groups * out_features * (16 + bits)
                  + (16 * out_features if bias else 0))
    return {"name": name, "in_features": in_features, "out_features": out_features, "bits": bits, "k": k,
            "salient_fraction": k / in_features, "n_groups": n_groups, "packed_bytes": packed,
            "fp16_bytes": 2 * in_features * out_features + (2 * out_features if bias else 0),
            "limit_bytes": limit_bits / 8}


def format_description(summary: Mapping[str, Any]) -> str:
    """A human-readable :func:`describe`: a few summary lines and one table row per layer kind."""
    mib = 1 << 20
    grid = "sym" if summary["sym"] else "asym"
    act_order = "on" if summary["act_order"] else "off"
    lines = [
        f"quikft packed checkpoint {summary['path']} (format {summary['format_version']})",
        f"{_scheme_text(summary)}, group size {summary['group_size']}, {grid}, "
        f"metric {summary['metric']}, method {summary['method']}, act-order {act_order}",
        f"size on disk: {summary['weights_bytes'] / mib:.2f} MiB of weights "
        f"({summary['directory_bytes'] / mib:.2f} MiB directory)",
        f"linear layers: {summary['linear_packed_bytes'] / mib:.2f} MiB packed vs "
        f"{summary['linear_fp16_bytes'] / mib:.2f} MiB FP16: compression {summary['compression_vs_fp16']:.2f}x, "
        f"{summary['bits_per_weight']:.2f} bits/weight ({summary['model_bits_per_weight']:.2f} for the whole "
        f"model as stored)",
        f"information limit: {summary['linear_limit_bytes'] / mib:.2f} MiB; packed = "
        f"{summary['packed_vs_limit']:.3f}x the limit",
        f"salient fraction: {summary['salient_fraction']:.1%} of linear input columns",
        f"unquantized tensors: {summary['dtype_rest']}; kernels here ({summary['kernel_device']}, "
        f"{summary['kernel_dtype']['dtype']} activations: {summary['kernel_dtype']['reason']}): "
        f"{_kernel_counts(summary['layers'])}",
        _checks_line(summary["checked"]),
        "",
        *_layer_table(summary["layers"]),
    ]
    return "\n".join(lines)


def _scheme_text(summary: Mapping[str, Any]) -> str:
    """``bits 3, salient k 128``, or for a --target-bpw checkpoint the per-layer spans."""
    layers = summary["layers"]
    if summary.get("target_bpw") is None:
        return f"bits {summary['bits']}, salient k {salient_text(summary['salient'])}"
    bits, ks = sorted({layer["bits"] for layer in layers}), sorted({layer["k"] for layer in layers})
    return (f"target {summary['target_bpw']:g} bits per weight: bits {', '.join(map(str, bits))} and salient k "
            f"{_span(str(ks[0]), str(ks[-1]))} chosen per layer")


def _checks_line(checked: Mapping[str, Any]) -> str:
    line = f"checks: headers and values of {checked['layers']} quantized layers pass the loader's checks"
    sums = checked.get("checksums")
    if sums is None:
        return f"{line} (checksums not verified; --verify reads the whole checkpoint)"
    missing = f"; {len(sums['files_without_checksums'])} file(s) record none" if sums["files_without_checksums"] else ""
    return f"{line}; sha256 of {sums['tensors']} tensors in {sums['files']} file(s) match{missing}"


def _layer_table(layers: list[dict]) -> list[str]:
    """Layers grouped by kind (the name after the block index), e.g. ``self_attn.q_proj``."""
    kinds: dict[str, list[dict]] = {}
    for layer in layers:
        kinds.setdefault(_layer_kind(layer["name"]), []).append(layer)
    rows = [("layer", "count", "out x in", "bits", "k", "salient", "packed MiB", "vs FP16", "vs limit", "kernel")]
    for kind, group in kinds.items():
        ks = sorted({layer["k"] for layer in group})
        bits = ",".join(str(b) for b in sorted({layer["bits"] for layer in group}))
        shapes = sorted({f"{layer['out_features']}x{layer['in_features']}" for layer in group})
        fractions = [layer["salient_fraction"] for layer in group]
        packed, fp16, limit = (sum(layer[key] for layer in group)
                               for key in ("packed_bytes", "fp16_bytes", "limit_bytes"))
        rows.append((kind, str(len(group)), ",".join(shapes), bits,
                     _span(str(ks[0]), str(ks[-1])),
                     _span(f"{min(fractions):.1%}", f"{max(fractions):.1%}"),
                     f"{packed / (1 << 20):.3f}", f"{fp16 / packed:.2f}x", f"{packed / limit:.3f}x",
                     _kernel_cell(group)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]


def _kernel_cell(group: list[dict]) -> str:
    """The decode and prefill kernel(s) of a layer kind, with their measured µs where measured."""
    cells = []
    for layer in {(layer["kernel"], layer["prefill_kernel"]): layer for layer in group}.values():
        decode, prefill = (f"{layer[k]}" + (f" {layer[us]:.0f} us" if layer.get(us) is not None else "")
                           for k, us in (("kernel", "decode_us"), ("prefill_kernel", "prefill_us")))
        cells.append(f"decode {decode}, prefill {prefill}")
    # Refusals for this layout's own reasons (not another device, dtype or width) say what a
    # re-quantization with other settings would gain.
    reasons = sorted({f"{kernel}: {reason}" for layer in group for kernel, reason in layer["refused"].items()
                      if layer["refusal_kinds"][kernel] == RefusalKind.LAYOUT})
    return "; ".join(cells) + (f" ({'; '.join(reasons)})" if reasons else "")


def _kernel_counts(layers: list[dict]) -> str:
    counts: dict[str, int] = {}
    for layer in layers:
        name = layer["kernel"] if layer["kernel"] == layer["prefill_kernel"] else \
            f"{layer['kernel']} (decode) + {layer['prefill_kernel']} (prefill)"
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(f"{name} x{count}" for name, count in counts.items())


def _span(low: str, high: str) -> str:
    return low if low == high else f"{low}-{high}"


def _layer_kind(name: str) -> str:
    """The name after the block index, later indices (experts) as ``*``: ``mlp.experts.down_proj.*``."""
    parts = name.split(".")
    digits = [i for i, part in enumerate(parts) if part.isdigit()]
    return ".".join("*" if part.isdigit() else part for part in parts[digits[0] + 1:]) if digits else name
