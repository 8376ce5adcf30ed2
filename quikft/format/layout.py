"""The packed format's names: files, tensors, versions, dtypes and ``quantization_config`` keys.

Everything here is part of the on-disk contract (see :mod:`quikft.format`): a change is a new
``format_version``. The other modules of the format share these names; nothing outside the
format spells a file name of a checkpoint directory.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quikft.config import RestDtype
from quikft.validation import CheckpointError

QUANT_METHOD = "quikft"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# save_pretrained's shard names (huggingface_hub's suffix: -00001-of-00003).
SHARD_PATTERN = "model{suffix}.safetensors"
SALIENT_NAME = "salient_indices.safetensors"  # a job's salient columns per layer (int32), beside the weights
QUIK_TENSORS = ("qweight", "qzeros", "scales", "g_idx", "perm", "salient_idx", "salient_weight")
V1_TENSORS = tuple(name for name in QUIK_TENSORS if name != "perm")
DTYPE_REST = {RestDtype.BF16: torch.bfloat16, RestDtype.FP16: torch.float16, RestDtype.FP32: torch.float32}
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


def rest_dtype(qconfig: Mapping[str, Any]) -> torch.dtype:
    """The dtype of a checkpoint's unquantized tensors (format 1 stored them in float32)."""
    name = qconfig.get("dtype_rest", "fp32")
    if name not in DTYPE_REST:
        raise CheckpointError(f"quantization_config.dtype_rest is {name!r}; expected one of {', '.join(DTYPE_REST)}")
    return DTYPE_REST[name]


def declared_bits(qconfig: Mapping[str, Any], name: str) -> int:
    """The bit-width a checkpoint declares for one layer (per layer in a --target-bpw checkpoint)."""
    return int((qconfig.get(LAYER_BITS_KEY) or {}).get(name, qconfig["bits"]))


def layer_tensor_names(qconfig: Mapping[str, Any]) -> tuple[str, ...]:
    """The tensors each quantized layer stores in this checkpoint's format version."""
    return QUIK_TENSORS if qconfig["format_version"] >= 2 else V1_TENSORS


def is_format_file(name: str) -> bool:
    """A file the writer produces (config, weights, shards, index), as opposed to reports and the
    other files a checkpoint directory may hold."""
    return name in (CONFIG_NAME, WEIGHTS_NAME, INDEX_NAME, GENERATION_CONFIG_NAME) or name.startswith("model-")


def tied_weight_keys(model: nn.Module) -> set[str]:
    """State-dict keys that alias another weight and are re-tied by the loader (e.g. ``lm_head.weight``)."""
    return set(getattr(model, "all_tied_weights_keys", None) or {})
