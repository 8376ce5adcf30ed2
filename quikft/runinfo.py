"""Provenance recorded with every result: library versions, peak memory, wall time."""

from __future__ import annotations

import ctypes
import platform
import resource
import sys
from importlib import metadata


def library_versions() -> dict[str, str]:
    """Versions of the packages that determine a result, for JSON reports."""
    versions = {"python": platform.python_version()}
    for name in ("quikft", "torch", "transformers", "safetensors", "accelerate", "gguf"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def return_freed_memory() -> None:
    """Give the heap memory freed so far back to the operating system (glibc's ``malloc_trim``).

    Between the blocks of a quantize run the freed activations, Hessians and GPTQ temporaries stay
    in glibc's heap as scattered free chunks (0.45-0.58 GB of the default model's RSS after each
    block, measured); returning them keeps the next block's peak from stacking on them. A no-op
    where the C library has no ``malloc_trim`` (macOS, musl).
    """
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)
