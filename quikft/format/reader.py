"""``config.json`` of a packed checkpoint: read, and its ``quantization_config`` and sizes validated.

Loaders build layers and models from these values, and ``quikft info`` prints them, so every
value is checked for the type and range quantize writes before anything is built.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from quikft.config import BITS, ConfigError, RestDtype, brief, parse_salient
from quikft.format.layout import (
    CONFIG_NAME,
    LAYER_BITS_KEY,
    QUANT_METHOD,
    READABLE_VERSIONS,
    REQUIRED_KEYS,
    TensorInfo,
)
from quikft.validation import CheckpointError


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
    if "dtype_rest" in qconfig and qconfig["dtype_rest"] not in RestDtype.names():
        problems.append(f"dtype_rest {brief(qconfig['dtype_rest'])} (one of {', '.join(RestDtype.names())})")
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
