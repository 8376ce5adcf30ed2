"""Provenance recorded with every result: library versions, peak memory, wall time."""

from __future__ import annotations

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
