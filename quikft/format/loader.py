"""Loading a packed checkpoint: the model skeleton, its QuikLinear layers, the tensors, the checks.

Loading is strict: before any tensor is read, the headers are checked against the model the
config describes, and every missing, unexpected, misshapen, mistyped or truncated tensor is
reported as a one-line :class:`CheckpointError` naming the file and the tensor. A loaded model
is prepared for inference at once: every QuikLinear picks the fastest kernel for the device and
dtype (:mod:`quikft.nn.kernels`). The transformers quantizer (:mod:`quikft.hf`) runs the same
checks through :func:`swap_in_quik_layers`, :func:`check_tensors`, :func:`check_layer_values`
and :func:`finish_loading`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from quikft import arch
from quikft.format.header import read_headers, read_metadata, weight_files, weights_source
from quikft.format.layout import (
    CONFIG_NAME,
    EXPERTS_KEY,
    FORMAT_VERSION,
    QUIK_TENSORS,
    TensorInfo,
    declared_bits,
    tied_weight_keys,
)
from quikft.format.reader import check_model_config, read_model_config, read_quantization_config
from quikft.hardware import resolve_dtype
from quikft.nn.quik_linear import PackedShape, QuikLinear, prepare_for_inference
from quikft.nn.stored_head import keep_tied_head_in_bf16
from quikft.runinfo import return_freed_memory
from quikft.validation import CheckpointError, DeclaredLayer, validate_layer_values, verify_checksums

# Loading recomputes the checksums only on request: see the README (a full extra read of the weights).
VERIFY_ON_LOAD = False


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
        shape = PackedShape(in_features, out_features, declared_bits(qconfig, name), int(qconfig["group_size"]), k,
                            n_groups, f"{name}.bias" in tensors)
        layer = QuikLinear(shape, device=device)
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
    declared = DeclaredLayer(in_features, declared_bits(qconfig, name), int(qconfig["group_size"]),
                             bool(qconfig["sym"]))
    validate_layer_values(name, values, files, declared)


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


@dataclass(frozen=True)
class LoadOptions:
    """How :func:`load` prepares the model it loads: its keyword arguments (see its docstring)."""

    prepare: bool = True
    verify: bool = VERIFY_ON_LOAD
    trust_remote_code: bool = False
    kernel: str | None = None
    compact_head: bool = True


def load(path: str | os.PathLike, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
         **options: Any) -> nn.Module:
    """Load a packed checkpoint directory as a model with QuikLinear layers, in eval mode.

    ``dtype`` applies to the unquantized tensors (embeddings, norms, lm_head) and so to the
    activations; the packed buffers keep their stored dtypes. ``None``/``"auto"`` picks what the
    device runs fast (bf16 where native, else fp32: :mod:`quikft.hardware`). The model is built
    on the meta device, so no memory is spent on the full-precision linears it replaces.
    ``options`` are :class:`LoadOptions`' fields, by keyword. With ``prepare`` (the default) every
    QuikLinear takes its fastest kernel for that device and dtype at once (on a CPU with bf16, the
    int4 path, which then holds the codes alone); ``prepare=False`` keeps the stored layout untouched
    until the first forward. ``kernel`` (or ``$QUIKFT_KERNEL``) forces one registered kernel on every
    layer instead of the measured choice. ``compact_head`` holds a tied embedding and head stored in
    bf16 once in bf16 on an fp32 model (exact; training loads turn it off so the head stays an
    ``nn.Linear``). ``verify`` recomputes the recorded checksums first (see :data:`VERIFY_ON_LOAD`).
    A model class defined by code in the checkpoint runs only with ``trust_remote_code``.
    """
    settings = LoadOptions(**options)
    path, device = Path(path), torch.device(device)
    dtype = resolve_dtype(dtype, device).dtype
    model, qconfig, files, tensors = _checked_skeleton(path, dtype, settings.trust_remote_code)
    if settings.verify:
        verify_checksums(tensors, {file: read_metadata(file) for file in files})
    _load_tensors(model, tensors, dtype, device)
    materialize_non_persistent(model, device)
    arch.mark_quantized(model)  # as transformers' own quantized loading does
    model.tie_weights()
    _check_materialized(model)
    check_layer_values(model, tensors, qconfig)
    finish_loading(model, model.config.quantization_config, settings.prepare, settings.kernel,
                   settings.compact_head)
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
