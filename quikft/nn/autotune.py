"""Kernels chosen by measurement: per layer layout, the fastest kernel for decode and for prefill.

Which kernel is fastest depends on the CPU (AVX2 or AVX-512, native bf16 or not, NEON), the
thread count, the library versions and the layer's shape, and a fixed priority got it wrong
(on AVX2 the bf16 island loses to dense fp32 at small shapes and wins at large ones; ONNX
Runtime's int8-activation kernel wins most decode shapes). So on a CPU, the first time a layout
is seen, every kernel that accepts it and whose activation precision the policy allows
(:data:`~quikft.nn.kernels.DEFAULT_ACTIVATIONS`) is timed briefly on a one-row input (decode) and
on a :data:`PREFILL_ROWS`-row input (prefill); a layer then runs each input with the winner of its
row class (a second kernel for prefill only where it is at least 1.5x faster there, since it holds
a second copy of the layer's weights). The timings are cached per machine (CPU model and flags, ISA level, threads, torch and
onnxruntime versions) under ``$QUIKFT_CACHE/kernels/`` (or in the file ``$QUIKFT_KERNEL_TIMINGS``
names), so later loads measure nothing and choose the same kernels, which keeps repeated loads'
outputs identical. Delete the file to measure again.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from pathlib import Path

import torch

from quikft.hardware import cache_root, machine_description, machine_key
from quikft.nn.kernels import (
    DEFAULT_ACTIVATIONS,
    LayerLayout,
    QuikKernel,
    available_kernels,
    get_kernel,
    why_not,
)

DECODE, PREFILL = "decode", "prefill"
ROW_CLASSES = {DECODE: 1, PREFILL: 128}  # rows of the timed input of each class
PREFILL_ROWS = ROW_CLASSES[PREFILL]
DECODE_MAX_ROWS = 1  # inputs of at most this many rows are decode
KERNEL_ENV = "QUIKFT_KERNEL"  # force one kernel for every layer (what quikft.load(kernel=...) sets)
TIMINGS_ENV = "QUIKFT_KERNEL_TIMINGS"  # a file to keep the timings in instead of the cache folder
TIMING_BUDGET_S = 0.03  # time spent per kernel and row class after warm-up
TIMING_ROUNDS = 3
# A layer keeps a second kernel (and so a second copy of its weights) for prefill only when that
# kernel runs a prefill-sized input at least this many times faster than the decode kernel.
PREFILL_SECOND_KERNEL_MIN_GAIN = 1.5


def row_class(rows: int) -> str:
    return DECODE if rows <= DECODE_MAX_ROWS else PREFILL


def layout_key(layout: LayerLayout, dtype: torch.dtype) -> str:
    """What a kernel's speed depends on in a layer: shape, bits, k, group structure, activation dtype."""
    groups = ",".join(f"{size}x{count}" for size, count in sorted(_counts(layout.group_sizes).items()))
    return (f"{layout.out_features}x{layout.in_features}-b{layout.bits}-k{layout.k}-g{groups}"
            f"-{'c' if layout.contiguous_groups else 'n'}-{str(dtype).removeprefix('torch.')}")


def _counts(sizes: tuple[int, ...]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for size in sizes:
        counts[size] = counts.get(size, 0) + 1
    return counts


def candidates(layout: LayerLayout, device: torch.device, dtype: torch.dtype,
               activations: frozenset[str] = DEFAULT_ACTIVATIONS) -> list[QuikKernel]:
    """Kernels that accept the layer and whose activation precision ``activations`` allows."""
    kernels = [get_kernel(name) for name in available_kernels()]
    return [k for k in kernels if k.activations in activations and why_not(k, layout, device, dtype) is None]


class TimingCache:
    """Measured µs per (layout, kernel, row class) on this machine, one JSON file per machine key."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or timings_path()
        self._data: dict | None = None

    def entries(self) -> dict[str, dict[str, dict[str, float]]]:
        if self._data is None:
            try:
                data = json.loads(self.path.read_text())
                self._data = data if isinstance(data.get("layouts"), dict) else {"layouts": {}}
            except (OSError, ValueError, AttributeError):
                self._data = {"layouts": {}}
        return self._data["layouts"]

    def get(self, key: str) -> dict[str, dict[str, float]]:
        return self.entries().get(key, {})

    def put(self, key: str, timings: dict[str, dict[str, float]]) -> None:
        self.entries()[key] = timings
        self._data["machine"] = machine_description()
        # Atomic, and a read-only or full cache directory only costs a re-measurement next time.
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(f".{os.getpid()}.tmp")
            temporary.write_text(json.dumps(self._data, indent=1, sort_keys=True) + "\n")
            temporary.replace(self.path)


_CACHE: TimingCache | None = None


def timings_path() -> Path:
    """``$QUIKFT_KERNEL_TIMINGS``, else ``$QUIKFT_CACHE/kernels/<machine key>.json``."""
    override = os.environ.get(TIMINGS_ENV)
    return Path(override) if override else cache_root() / "kernels" / f"{machine_key()}.json"


def timing_cache() -> TimingCache:
    """The process's cache (re-read when the environment or the thread count changes its path)."""
    global _CACHE
    path = timings_path()
    if _CACHE is None or _CACHE.path != path:
        _CACHE = TimingCache(path)
    return _CACHE


def time_kernels(layer, kernels: list[QuikKernel], device: torch.device, dtype: torch.dtype
                 ) -> dict[str, dict[str, float]]:
    """µs per call of each kernel on ``layer`` for each row class (prepared once, not registered).

    Kernels are timed in turns, :data:`TIMING_ROUNDS` rounds of about ``TIMING_BUDGET_S /
    TIMING_ROUNDS`` each, and each keeps its best round's median: load that comes and goes (another
    process on the cores) then touches every kernel alike instead of deciding the choice.
    """
    with torch.inference_mode(False), torch.no_grad():
        states = {kernel.name: (kernel, kernel.prepare(layer, device, dtype)) for kernel in kernels}
    generator = torch.Generator().manual_seed(0)
    best: dict[str, dict[str, float]] = {name: {} for name in states}
    with torch.inference_mode():
        for row_class, rows in ROW_CLASSES.items():
            x = torch.randn(rows, layer.in_features, generator=generator).to(device=device, dtype=dtype)
            for kernel, state in states.values():
                kernel.forward(layer, state, x)  # warm-up (first-call allocations, bindings)
            for _ in range(TIMING_ROUNDS):
                for name, (kernel, state) in states.items():
                    median = _median_call(kernel, layer, state, x, TIMING_BUDGET_S / TIMING_ROUNDS)
                    best[name][row_class] = min(best[name].get(row_class, median), median)
    return {name: {c: round(us * 1e6, 1) for c, us in classes.items()} for name, classes in best.items()}


def _median_call(kernel: QuikKernel, layer, state, x: torch.Tensor, budget: float) -> float:
    samples: list[float] = []
    spent = 0.0
    while spent < budget or len(samples) < 3:
        start = time.perf_counter()
        kernel.forward(layer, state, x)
        elapsed = time.perf_counter() - start
        samples.append(elapsed)
        spent += elapsed
    return statistics.median(samples)


def choose(layer, device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """The fastest allowed kernel per row class for ``layer`` (measured once per layout and machine)."""
    return {name: entry["kernel"] for name, entry in measured_plan(layer, device, dtype).items()}


def measured_plan(layer, device: torch.device, dtype: torch.dtype) -> dict[str, dict]:
    """Per row class: the kernel chosen for ``layer`` and its measured µs (None when only one kernel
    accepts the layer, which is then not timed)."""
    layout = layer.layout()
    kernels = candidates(layout, device, dtype)
    if len(kernels) == 1:
        return {name: {"kernel": kernels[0].name, "us": None} for name in ROW_CLASSES}
    cache = timing_cache()
    key = layout_key(layout, dtype)
    timings = cache.get(key)
    if any(k.name not in timings for k in kernels):
        layer.restore_codes()  # every kernel prepares from the portable codes
        timings = time_kernels(layer, kernels, device, dtype)  # all in turns, never mixed with old ones
        cache.put(key, timings)
    allowed = sorted(k.name for k in kernels)

    def fastest(row_class: str) -> str:
        return min(allowed, key=lambda k: (timings[k][row_class], k))

    decode, prefill = fastest(DECODE), fastest(PREFILL)
    # A second kernel holds a second copy of the layer's weights: only where prefill gains enough.
    if timings[decode][PREFILL] < PREFILL_SECOND_KERNEL_MIN_GAIN * timings[prefill][PREFILL]:
        prefill = decode
    return {DECODE: {"kernel": decode, "us": timings[decode][DECODE]},
            PREFILL: {"kernel": prefill, "us": timings[prefill][PREFILL]}}


def forced_kernel() -> str | None:
    """``$QUIKFT_KERNEL`` if set (checked to name a registered kernel)."""
    name = os.environ.get(KERNEL_ENV) or None
    if name is not None:
        get_kernel(name)
    return name
