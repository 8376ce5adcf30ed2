"""transformers integration: ``AutoModelForCausalLM.from_pretrained`` on a quikft packed checkpoint.

Importing this module registers the ``quikft`` quantization method with transformers
(``register_quantization_config`` / ``register_quantizer``). ``import quikft`` arranges that
import lazily, right after transformers loads its quantizer registry, so ``import quikft``
itself stays free of transformers' import cost.

How a load goes: transformers builds the model skeleton on the meta device and hands it to
:meth:`QuikftHfQuantizer._process_model_before_weight_loading`, which reads the safetensors
headers, checks them strictly against the config (the same checks as :func:`quikft.load`)
and swaps the listed linears for empty :class:`~quikft.nn.QuikLinear` layers of the stored
shapes. transformers then loads every tensor straight into those buffers: their dtypes
(int32 codes, fp16 scales) come from the empty buffers, so nothing is cast. After loading, the
index values are checked and every layer takes its fastest kernel for the device and dtype,
exactly as :func:`quikft.load` does (:func:`~quikft.format.loader.finish_loading`).

The dtype: ``from_pretrained``'s default (``"auto"``) is the checkpoint's ``dtype_rest``, bf16
by default. On a machine without native bf16 matmuls that would make every step ~100x slower
(:mod:`quikft.hardware`), so there the quantizer turns a bf16 request into float32.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from quikft.format.header import read_headers, weight_files, weights_source
from quikft.format.layout import CONFIG_NAME, QUANT_METHOD
from quikft.format.loader import check_layer_values, check_tensors, finish_loading, swap_in_quik_layers
from quikft.format.reader import check_model_config, validate_quantization_config
from quikft.hardware import compute_dtype, default_device
from quikft.nn.quik_linear import QuikLinear
from quikft.validation import CheckpointError


class QuikftConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a quikft checkpoint, kept verbatim.

    Every key of config.json's entry becomes an attribute, so ``to_dict`` (used when a loaded
    model is saved again) writes back exactly what was read.
    """

    def __init__(self, **entries: Any) -> None:
        entries.setdefault("quant_method", QUANT_METHOD)
        # Validated when the checkpoint files are known (the quantizer below), so the error names
        # config.json exactly as quikft.load and quikft info do.
        self.__dict__.update(entries)


class QuikftHfQuantizer(HfQuantizer):
    """Loads pre-quantized quikft checkpoints; quantizing on the fly is the job of ``quikft quantize``."""

    # Calibration data is needed to quantize, so only pre-quantized checkpoints load.
    requires_calibration = True
    quantization_config: QuikftConfig

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:
            raise ValueError("quikft cannot quantize while loading; run `quikft quantize` and load its output")

    def update_attn_implementation(self, config: Any) -> Any:
        """Called with the model's config before the model is built: the checks quikft.load makes before
        building (the declared sizes; for a local directory, against the stored headers), so a crafted
        config is refused with the same message before transformers builds a million layers."""
        directory = Path(str(getattr(config, "name_or_path", "") or ""))
        local = directory.is_dir() and (directory / CONFIG_NAME).is_file()
        source = directory / CONFIG_NAME if local else CONFIG_NAME
        qconfig = self.quantization_config.to_dict()
        validate_quantization_config(qconfig, source)
        tensors = read_headers(weight_files(directory)) if local else None
        check_model_config(config.to_dict(), qconfig, tensors, source)
        return super().update_attn_implementation(config)

    def update_dtype(self, dtype: torch.dtype) -> torch.dtype:
        choice = compute_dtype(default_device())
        if dtype == torch.bfloat16 and choice.dtype != torch.bfloat16:
            warnings.warn(f"quikft: loading in float32, not bfloat16 ({choice.reason})", stacklevel=2)
            return choice.dtype
        return dtype

    def _process_model_before_weight_loading(self, model: Any, checkpoint_files: list[str] | None = None,
                                             **kwargs: Any) -> Any:
        files = [Path(file) for file in checkpoint_files or ()]
        if not files or any(file.suffix != ".safetensors" for file in files):
            raise CheckpointError("quikft checkpoints load from safetensors files only")
        validate_quantization_config(self.quantization_config.to_dict(), files[0].parent / CONFIG_NAME)
        tensors = read_headers(files)
        # The skeleton is built under a meta-device context, so device=None keeps the new layers empty.
        swap_in_quik_layers(model, self.quantization_config.to_dict(), tensors, weights_source(files))
        check_tensors(model, tensors, weights_source(files))
        self._tensors = tensors
        _skip_reinitialization(model)
        return model

    def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
        check_layer_values(model, self._tensors, self.quantization_config.to_dict())
        qconfig = self.quantization_config.to_dict()
        finish_loading(model, qconfig)
        self.quantization_config.format_version = qconfig["format_version"]
        return model

    def is_serializable(self, safe_serialization: Any = None) -> bool:
        # The state dict of a model with QuikLinear layers is the packed format itself.
        return True

    @property
    def is_trainable(self) -> bool:
        # GIFT-SW recovery trains the FP16 salient columns of the loaded layers.
        return True

    @property
    def is_qat_trainable(self) -> bool:
        # transformers' Trainer refuses a quantized model without PEFT adapters unless this holds.
        return True


def _skip_reinitialization(model: Any) -> None:
    """Keep transformers' weight initialization away from the modules we rebuilt.

    After loading, transformers calls the family's ``_init_weights`` on every module not marked
    initialized, and some families reach into children there (e.g. a block's output projection
    ``.weight``, or the 3-D parameters of an experts module), which a QuikLinear or an unfused
    experts module no longer has. Every tensor of such a module comes from the checkpoint, so
    its initialization would be overwritten anyway; modules with computed (non-persistent)
    buffers of their own keep theirs.
    """
    from quikft.arch import RoutedExperts

    for module in model.modules():
        rebuilt = isinstance(module, RoutedExperts) or any(isinstance(c, QuikLinear) for c in module.children())
        if rebuilt and not _has_computed_buffers(module):
            module._is_hf_initialized = True


def _has_computed_buffers(module: Any) -> bool:
    return any(name in module._non_persistent_buffers_set and buffer is not None
               for name, buffer in module._buffers.items())


def register() -> None:
    """Register the config and quantizer once (a second call, e.g. after a reload, is a no-op)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(QuikftConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(QuikftHfQuantizer)


register()
