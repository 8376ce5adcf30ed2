"""Bits per weight: counted from stored tensors, or predicted from a scheme without quantizing.

Two figures, one definition each:

- **linear**: every bit stored for the quantized linear layers (codes, scales, zeros, salient
  values, salient and permutation indices, ``g_idx``) over their number of weights (in × out).
  A layer's float32 bias is not part of the format's cost per weight; it counts in the model figure.
- **model**: every bit of every stored tensor (embeddings, head, norms, biases included; a tied
  head stored once counts once) over the model's parameters, each quantized linear counting its
  in × out weights.

:func:`count_bits` reads them from a checkpoint's headers (name → shape and bytes);
:func:`predict_bits` computes the same numbers from layer shapes and a scheme (bits, salient
columns, group size), from the shapes :func:`packed_layer_tensors` gives, so a README row or a
bit-budget search needs no quantized model. A test checks that both agree on written checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from quikft.config import resolve_salient
from quikft.packing import packed_words

INT32, FP16 = 4, 2  # bytes per element of the packed format's index/code and float tensors


class Stored(Protocol):
    """What a safetensors header says of a tensor (e.g. :class:`quikft.format.layout.TensorInfo`)."""

    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int: ...


@dataclass(frozen=True)
class BitsCount:
    """Stored bits and the weights they hold, for the quantized linears and for the whole model."""

    linear_bits: int
    linear_weights: int
    model_bits: int
    model_params: int

    @property
    def linear_bpw(self) -> float:
        return self.linear_bits / self.linear_weights if self.linear_weights else math.nan

    @property
    def model_bpw(self) -> float:
        return self.model_bits / self.model_params if self.model_params else math.nan

    def to_dict(self) -> dict[str, float]:
        """The reports' ``bits_per_weight`` entry."""
        return {"linear": self.linear_bpw, "model": self.model_bpw}


def n_groups(columns: int, group_size: int) -> int:
    """Scale/zero groups of a layer: groups of ``group_size`` over its quantized columns, or one per row."""
    return -(-columns // group_size) if group_size > 0 else 1


def packed_layer_tensors(in_features: int, out_features: int, bits: int, k: int,
                         groups: int) -> dict[str, tuple[tuple[int, ...], int]]:
    """The packed format's tensors of one linear layer (format 2, :mod:`quikft.nn.quik_linear`):
    name → (shape, bytes per element). Only the ``in - k`` quantized columns have codes."""
    n = in_features - k
    return {
        "qweight": ((packed_words(n, bits), out_features), INT32),
        "qzeros": ((groups, packed_words(out_features, bits)), INT32),
        "scales": ((groups, out_features), FP16),
        "g_idx": ((n,), INT32),
        "perm": ((n,), INT32),
        "salient_idx": ((k,), INT32),
        "salient_weight": ((out_features, k), FP16),
    }


def layer_bits(in_features: int, out_features: int, bits: int, salient: int | float, group_size: int) -> int:
    """Bits one packed linear layer stores under a scheme (its k resolved as quantize resolves it)."""
    k = resolve_salient(salient, in_features)
    tensors = packed_layer_tensors(in_features, out_features, bits, k, n_groups(in_features - k, group_size))
    return 8 * sum(math.prod(shape) * size for shape, size in tensors.values())


@dataclass(frozen=True)
class Unquantized:
    """A model's parameters outside its quantized linears (embeddings, norms, an untied head) and the
    bytes each is stored with (2 for the default bf16 ``dtype_rest``)."""

    params: int = 0
    bytes_each: int = 2

    @property
    def bits(self) -> int:
        return 8 * self.bytes_each * self.params


def predict_bits(shapes: Iterable[tuple[int, int]], bits: int, salient: int | float, group_size: int,
                 other: Unquantized = Unquantized()) -> BitsCount:
    """The count a checkpoint would give: ``shapes`` are the quantized linears' (in, out), ``other``
    the rest of the model (none by default: the linear figure alone is then meaningful)."""
    shapes = list(shapes)
    linear_bits = sum(layer_bits(i, o, bits, salient, group_size) for i, o in shapes)
    weights = sum(i * o for i, o in shapes)
    return BitsCount(linear_bits, weights, linear_bits + other.bits, weights + other.params)


def stored_layer_shape(tensors: Mapping[str, Stored], name: str) -> tuple[int, int]:
    """(in, out) of a stored packed layer: ``g_idx`` covers its quantized columns, ``salient_idx`` the
    others, ``scales`` is (groups, out)."""
    k = tensors[f"{name}.salient_idx"].shape[0]
    return tensors[f"{name}.g_idx"].shape[0] + k, tensors[f"{name}.scales"].shape[1]


def count_bits(tensors: Mapping[str, Stored], layers: Iterable[str], layer_tensors: Iterable[str]) -> BitsCount:
    """Bits per weight as stored: ``tensors`` every tensor of a checkpoint by name, ``layers`` its
    quantized linears and ``layer_tensors`` the suffixes of each one's packed tensors (bias excluded)."""
    suffixes = tuple(layer_tensors)
    linear_bits = linear_weights = 0
    packed: set[str] = set()
    for name in layers:
        keys = [f"{name}.{suffix}" for suffix in suffixes]
        linear_bits += 8 * sum(tensors[key].nbytes for key in keys)
        in_features, out_features = stored_layer_shape(tensors, name)
        linear_weights += in_features * out_features
        packed.update(keys)
    rest = [info for key, info in tensors.items() if key not in packed]
    return BitsCount(linear_bits, linear_weights, linear_bits + 8 * sum(info.nbytes for info in rest),
                     linear_weights + sum(math.prod(info.shape) for info in rest))
