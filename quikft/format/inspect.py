"""``quikft info``: what a packed checkpoint holds, its sizes and bits per weight, and the kernel
each layer would run on this machine (:func:`describe`, printed by :func:`format_description`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from quikft.bits import BitsCount, count_bits
from quikft.config import salient_text
from quikft.format.header import read_headers, weight_files, weights_source
from quikft.format.layout import (
    LAYER_BITS_KEY,
    QUIK_TENSORS,
    SETTING_KEYS,
    V1_TENSORS,
    TensorInfo,
    declared_bits,
    layer_tensor_names,
)
from quikft.format.loader import check_checkpoint
from quikft.format.reader import read_quantization_config
from quikft.hardware import compute_dtype, default_device
from quikft.nn.kernels import RefusalKind
from quikft.nn.quik_linear import PackedShape, QuikLinear
from quikft.validation import CheckpointError


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
    stored = layer_tensor_names(qconfig)
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


def bits_of(qconfig: Mapping[str, Any], tensors: Mapping[str, TensorInfo]) -> BitsCount:
    """Bits per weight of a checkpoint's linear layers and of the whole model, from its headers."""
    return count_bits(tensors, qconfig["modules"], layer_tensor_names(qconfig))


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
    layer = QuikLinear(PackedShape(layout.in_features, layout.out_features, layout.bits, int(qconfig["group_size"]),
                                   layout.k, n_groups, f"{name}.bias" in tensors))
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
