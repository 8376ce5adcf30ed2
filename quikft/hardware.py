"""What this machine runs fast: one rule for the compute dtype and the default device.

Every stage that picks a dtype on its own (recovery's autocast, evaluation, the packed-model
kernels) asks :func:`compute_dtype`, so a slow configuration cannot hide in one of them.

bf16 is chosen only where its matmul is native: CUDA devices that support it, and CPUs whose
kernels PyTorch dispatches at AVX-512 (or higher) level *and* that have the AVX512-BF16 or AMX
instructions. Elsewhere PyTorch falls back to a scalar reference GEMM for bf16 (measured on an
AVX2 machine with torch 2.13: a 2048x576 by 576x49152 matmul took 1.6 s in fp32 and 8.4 s
forward / 174 s backward under bf16 autocast), so fp32 is the fast choice there.

``ATEN_CPU_CAPABILITY=avx2`` lowers the capability PyTorch dispatches to (and with it this
choice), which is how an AVX2 machine can be emulated on a newer one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

AUTO = "auto"
DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class DtypeChoice:
    """A compute dtype and why it was chosen (recorded in every report)."""

    dtype: torch.dtype
    reason: str

    @property
    def name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def to_dict(self) -> dict[str, str]:
        return {"dtype": self.name, "reason": self.reason}


def cpu_capability() -> str:
    """The instruction-set level PyTorch dispatches CPU kernels to, e.g. ``AVX512`` or ``AVX2``."""
    return torch.backends.cpu.get_cpu_capability()


def _cpu_native_bf16() -> tuple[bool, str]:
    capability = cpu_capability()
    avx512_bf16 = torch.cpu._is_avx512_bf16_supported()
    amx = torch.cpu._is_amx_tile_supported()
    features = [name for name, present in (("avx512_bf16", avx512_bf16), ("amx", amx)) if present]
    description = f"cpu capability {capability}" + (f" with {'+'.join(features)}" if features else "")
    native = capability.startswith("AVX512") and bool(features)
    return native, description


def native_bf16(device: str | torch.device = "cpu") -> tuple[bool, str]:
    """Whether ``device`` multiplies bf16 matrices natively, and a one-line description of why."""
    device = torch.device(device)
    if device.type == "cuda":
        supported = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "no CUDA device"
        return supported, f"cuda {name}" + ("" if supported else " without bf16")
    if device.type == "cpu":
        return _cpu_native_bf16()
    return False, f"{device.type}: bf16 speed unknown"


def compute_dtype(device: str | torch.device = "cpu") -> DtypeChoice:
    """bf16 where the device runs it natively, fp32 otherwise."""
    native, description = native_bf16(device)
    if native:
        return DtypeChoice(torch.bfloat16, f"{description}: native bf16")
    return DtypeChoice(torch.float32, f"{description}: no native bf16, fp32 is faster")


def resolve_dtype(name: str | torch.dtype | None, device: str | torch.device = "cpu") -> DtypeChoice:
    """An explicit dtype (a name or ``torch.dtype``) as given, or ``auto``/None by :func:`compute_dtype`."""
    if name is None or name == AUTO:
        return compute_dtype(device)
    if isinstance(name, torch.dtype):
        return DtypeChoice(name, "requested")
    try:
        return DtypeChoice(DTYPE_NAMES[name], "requested")
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; use auto or one of {', '.join(sorted(DTYPE_NAMES))}") from None


def default_device() -> str:
    """``cuda`` when a GPU is present, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(name: str | None) -> None:
    """A one-line error for a device this machine does not have (before any model is loaded)."""
    if name not in (None, AUTO) and torch.device(name).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no CUDA device (or torch was built without CUDA); "
                         f"use --device cpu or auto")


def resolve_device(name: str | None) -> str:
    """``auto``/None to :func:`default_device`; anything else as given."""
    return default_device() if name in (None, AUTO) else name


def cache_root() -> Path:
    """``$QUIKFT_CACHE`` or ``~/.cache/quikft``."""
    return Path(os.environ.get("QUIKFT_CACHE", Path.home() / ".cache" / "quikft")).expanduser()


def _cpu_model_and_flags() -> tuple[str, str]:
    """The CPU's model name and feature flags (Linux /proc/cpuinfo; the platform's word elsewhere)."""
    found: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            found.setdefault(key.strip().lower(), value.strip())
    except OSError:
        pass
    model = found.get("model name") or found.get("cpu model") or platform.processor() or platform.machine()
    return model, found.get("flags") or found.get("features", "")


def machine_description() -> dict[str, str | int]:
    """What a kernel timing depends on besides the layer: CPU, ISA level, threads, library versions."""
    model, flags = _cpu_model_and_flags()
    try:
        from importlib.metadata import version

        ort_version = version("onnxruntime")
    except Exception:  # not installed
        ort_version = "none"
    return {"cpu": model, "machine": platform.machine(), "capability": cpu_capability(),
            "flags": hashlib.sha256(flags.encode()).hexdigest()[:16], "threads": torch.get_num_threads(),
            "torch": torch.__version__, "onnxruntime": ort_version}


def machine_key() -> str:
    """A short stable hash of :func:`machine_description`."""
    text = json.dumps(machine_description(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
