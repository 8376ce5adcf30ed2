"""What the format needs of a quantizer's output, as structural types.

The writer packs whatever has these attributes, so :mod:`quikft.format` never imports
:mod:`quikft.quant` (the quantizer depends on the format, not the other way round):
:class:`~quikft.quant.gptq.QuantResult` is a :class:`QuantizedLayer`,
:class:`~quikft.quant.steps.QuantizedLayers` a :class:`QuantizedModel` and
:class:`~quikft.config.QuantConfig` a :class:`Scheme`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from torch import Tensor


class QuantizedLayer(Protocol):
    """One quantized linear: codes and grid of every column, and the salient columns kept in fp16."""

    @property
    def codes(self) -> Tensor: ...  # (out, in) integer codes
    @property
    def scales(self) -> Tensor: ...  # (out, n_groups), fp16-exact
    @property
    def zeros(self) -> Tensor: ...  # (out, n_groups), integer-valued
    @property
    def g_idx(self) -> Tensor: ...  # (in,) group of every column
    @property
    def salient(self) -> Tensor: ...  # (k,) sorted column indices
    @property
    def salient_weight(self) -> Tensor: ...  # (out, k), fp16-exact
    @property
    def bits(self) -> int: ...
    @property
    def group_size(self) -> int: ...
    @property
    def sym(self) -> bool: ...


class LayerRecord(Protocol):
    """What a job keeps of a quantized layer once its tensors are written (a streamed job keeps no
    results): enough for ``quantization_config``."""

    @property
    def name(self) -> str: ...
    @property
    def bits(self) -> int | None: ...
    @property
    def salient(self) -> int: ...  # k


class QuantizedModel(Protocol):
    """A quantized model's layers: results in memory (may be empty once streamed), a record of every
    layer, and the experts modules stored as one linear per expert."""

    @property
    def results(self) -> Mapping[str, QuantizedLayer]: ...
    @property
    def layers(self) -> Sequence[LayerRecord]: ...
    @property
    def experts(self) -> Sequence[str]: ...


class Scheme(Protocol):
    """A quantization scheme that lists its settings (a mapping serves too)."""

    def to_dict(self) -> dict[str, Any]: ...
