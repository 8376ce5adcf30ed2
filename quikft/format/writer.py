"""The one writer of packed checkpoints: tensors packed, ``config.json`` with its
``quantization_config``, the salient indices; the weights files are :mod:`quikft.format.shards`.

:func:`save_packed` writes a quantized in-memory model; :func:`write_quik_model` a model whose
layers already are :class:`~quikft.nn.QuikLinear`; a streamed quantize job packs each block with
:func:`pack_state` into a file of its own (:func:`~quikft.format.shards.save_weights`), shards those
files into the output with :func:`~quikft.format.shards.write_shards`, and writes the config with
:func:`build_quantization_config` and :func:`write_model_config` (a fake-quant output, stored
unpacked, with :func:`write_plain_config`). What the writer needs of a quantizer's output is
:mod:`quikft.format.protocol`, not the quantizer's own types.
"""

from __future__ import annotations

import copy
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quikft.atomic import atomic_directory
from quikft.config import BITS
from quikft.format.layout import (
    DTYPE_REST,
    EXPERTS_KEY,
    FORMAT_VERSION,
    LAYER_BITS_KEY,
    QUANT_METHOD,
    QUIK_TENSORS,
    SALIENT_NAME,
    SETTING_KEYS,
    rest_dtype,
    tied_weight_keys,
)
from quikft.format.protocol import QuantizedLayer, QuantizedModel, Scheme
from quikft.format.shards import write_shards
from quikft.nn.quik_linear import QuikLinear


@dataclass(frozen=True)
class SaveOptions:
    """How :func:`save_packed` and :func:`write_packed` write, beside what: their keyword arguments."""

    # The full-precision model quantized (provenance, and the default KD teacher of a later
    # recovery), recorded in quantization_config's own field.
    source_model: str | None = None
    max_shard_size: int | str | None = None  # None: quikft.format.shards.MAX_SHARD_SIZE
    overwrite: bool = True  # save_packed: replace an existing directory


def save_packed(model: nn.Module, tokenizer: Any, quantized: QuantizedModel, out_dir: str | os.PathLike,
                quant_config: Scheme | Mapping[str, Any], **options: Any) -> Path:
    """Write ``model`` with its quantized linears packed as a loadable checkpoint directory.

    ``quantized`` is what quantizing ``model`` returned (:func:`quikft.quant.model.quantize_model`),
    ``quant_config`` its scheme and ``options`` :class:`SaveOptions`' fields; the model itself is not
    modified and no full-size weight is copied. The directory is written under a temporary name and
    renamed at the end, so a failure leaves nothing behind.
    """
    out_dir = Path(out_dir)
    with atomic_directory(out_dir, overwrite=SaveOptions(**options).overwrite) as staging:
        write_packed(model, tokenizer, quantized, staging, quant_config, **options)
    return out_dir


def write_packed(model: nn.Module, tokenizer: Any, quantized: QuantizedModel, directory: str | os.PathLike,
                 quant_config: Scheme | Mapping[str, Any], **options: Any) -> dict:
    """:func:`save_packed` into an existing (staging) directory; returns the quantization_config."""
    settings = SaveOptions(**options)
    qconfig = build_quantization_config(quantized, quant_config, settings.source_model)
    state = stored_state(packed_state_dict(model, quantized), qconfig)
    write_shards(state, Path(directory), settings.max_shard_size)
    _write_configs(model, tokenizer, qconfig, Path(directory))
    return qconfig


def write_quik_model(model: nn.Module, tokenizer: Any, directory: str | os.PathLike,
                     qconfig: Mapping[str, Any] | None = None, max_shard_size: int | str | None = None) -> dict:
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
    write_shards(stored_state(state, qconfig), Path(directory), max_shard_size)
    _write_configs(model, tokenizer, qconfig, Path(directory))
    return qconfig


def stored_state(state: dict[str, Tensor], qconfig: Mapping[str, Any]) -> dict[str, Tensor]:
    """``state`` as the checkpoint stores it: the unquantized tensors in its ``dtype_rest``."""
    return cast_unquantized(state, qconfig["modules"], rest_dtype(qconfig))


def _write_configs(model: nn.Module, tokenizer: Any, qconfig: dict, directory: Path) -> None:
    write_model_config(model, qconfig, directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def build_quantization_config(quantized: QuantizedModel, quant_config: Scheme | Mapping[str, Any],
                              source_model: str | None = None) -> dict:
    """The ``quantization_config`` entry of config.json (see :mod:`quikft.format`)."""
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


def _mixed_settings(quantized: QuantizedModel, modules: list[str]) -> dict[str, Any]:
    """A --target-bpw checkpoint's per-layer bits (``layer_bits``, what loaders unpack with) and, as
    ``bits``/``salient``, the most common choices (what a reader of the summary sees first)."""
    chosen = {name: (r.bits, int(r.salient.numel())) for name, r in quantized.results.items()} or \
        {layer.name: (layer.bits, layer.salient) for layer in quantized.layers}
    missing = [name for name in modules if chosen.get(name, (None,))[0] not in BITS]
    if missing:
        raise ValueError(f"layer {missing[0]} has no recorded bit-width")
    most = Counter(chosen[name] for name in modules).most_common(1)[0][0]
    return {"bits": most[0], "salient": most[1], LAYER_BITS_KEY: {name: chosen[name][0] for name in modules}}


def check_layer_grid(name: str, result: QuantizedLayer, settings: Mapping[str, Any]) -> None:
    """The config is the loader's only source for bits; a layer that disagrees would unpack wrongly.
    (Under --target-bpw each layer's bits are recorded from its result.)"""
    per_layer = settings.get("target_bpw") is not None
    if (result.bits != settings["bits"] and not per_layer) or result.sym != settings["sym"]:
        raise ValueError(f"layer {name} was quantized with bits={result.bits}, sym={result.sym}, but the "
                         f"settings say bits={settings['bits']}, sym={settings['sym']}")


def packed_state_dict(model: nn.Module, quantized: QuantizedModel) -> dict[str, Tensor]:
    """The model's state dict with each quantized linear's weight (and bias) replaced by packed tensors.

    State-dict tensors are references to the model's own storage, so the only new memory is
    the packed tensors themselves.
    """
    state = model.state_dict()
    for key in tied_weight_keys(model):
        state.pop(key, None)
    return pack_into(state, quantized.results)


def pack_into(state: dict[str, Tensor], results: Mapping[str, QuantizedLayer]) -> dict[str, Tensor]:
    """Replace each quantized layer's ``weight`` (and ``bias``) in ``state`` by its packed tensors."""
    for name, result in results.items():
        if f"{name}.weight" not in state:
            raise ValueError(f"quantized layer {name} is not a linear layer of this model")
        del state[f"{name}.weight"]
        bias = state.pop(f"{name}.bias", None)
        layer = QuikLinear.from_quantized(result, bias)
        state.update({f"{name}.{key}": tensor for key, tensor in layer.state_dict().items()})
    return state


def cast_unquantized(state: dict[str, Tensor], modules: Iterable[str], dtype: torch.dtype) -> dict[str, Tensor]:
    """Floating tensors other than the packed layers' own, in ``dtype`` (the checkpoint's dtype_rest)."""
    quik = {f"{name}.{key}" for name in modules for key in (*QUIK_TENSORS, "bias")}
    return {name: t.to(dtype) if t.is_floating_point() and name not in quik else t for name, t in state.items()}


def pack_state(state: dict[str, Tensor], results: Mapping[str, QuantizedLayer], dtype: torch.dtype,
               settings: Mapping[str, Any] | None = None) -> dict[str, Tensor]:
    """Part of a model's state (a decoder block, or the tensors outside the blocks) as the format stores
    it: each quantized layer packed (:func:`pack_into`), the other floating tensors in ``dtype`` (the
    checkpoint's dtype_rest). With ``settings`` each layer's grid is checked against them first."""
    for name, result in results.items() if settings is not None else ():
        check_layer_grid(name, result, settings)
    return cast_unquantized(pack_into(state, results), results, dtype)


def write_model_config(model: nn.Module, qconfig: dict, directory: Path) -> None:
    """config.json (with quantization_config) and generation_config.json, leaving ``model`` untouched."""
    config = copy.deepcopy(model.config)
    config.quantization_config = qconfig
    config.architectures = [type(model).__name__]
    config.dtype = str(rest_dtype(qconfig)).removeprefix("torch.")  # dtype of the unquantized tensors
    config.save_pretrained(directory)
    _write_generation_config(model, directory)


def write_plain_config(model: nn.Module, directory: Path) -> None:
    """config.json and generation_config.json of a model stored unpacked (a fake-quant output)."""
    model.config.save_pretrained(directory)
    _write_generation_config(model, directory)


def _write_generation_config(model: nn.Module, directory: Path) -> None:
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and model.can_generate():
        generation_config.save_pretrained(directory)


def write_salient_indices(directory: Path, indices: Mapping[str, Tensor]) -> None:
    """``salient_indices.safetensors``: each quantized layer's salient columns (int32), as a job chose them."""
    from safetensors.torch import save_file

    save_file({name: t.contiguous() for name, t in indices.items()}, directory / SALIENT_NAME)
