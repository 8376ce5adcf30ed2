"""Where the calibration activations between blocks live: ``--offload-activations {none,cpu,disk}``.

The activations entering the current block are a list of batches. ``none`` keeps them on the
compute device (fastest; a GPU then holds the current block plus the activations), ``cpu`` in
host memory (moved to the device one batch at a time), ``disk`` in one safetensors file per
batch under a scratch directory (read back one batch at a time, so neither device nor host
memory holds more than a batch or two). Values are stored exactly in the model's dtype, so
every mode gives bit-identical results.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quikft.config import OffloadMode


class ActivationStore:
    """A list of activation batches kept per the offload mode; iterate to get each on ``device``."""

    _generations = itertools.count()

    def __init__(self, mode: str, device: str | torch.device, scratch: str | os.PathLike | None = None):
        if mode not in OffloadMode.names():
            raise ValueError(f"--offload-activations {mode!r} is not one of {', '.join(OffloadMode.names())}")
        self.mode = OffloadMode(mode)
        self.device = torch.device(device)
        self._items: list = []
        self._dir: Path | None = None
        if self.mode is OffloadMode.DISK:
            root = Path(scratch) if scratch is not None else None
            if root is not None:
                root.mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix=f"activations-{next(self._generations)}-", dir=root))

    def like(self) -> ActivationStore:
        """An empty store of the same mode (the next block's outputs), beside this one on disk."""
        return ActivationStore(self.mode, self.device, self._dir.parent if self._dir else None)

    def append(self, batch: torch.Tensor) -> None:
        batch = batch.detach()
        if self.mode is OffloadMode.NONE:
            self._items.append(batch.to(self.device))
        elif self.mode is OffloadMode.CPU:
            self._items.append(batch.to("cpu"))
        else:
            path = self._dir / f"{len(self._items):05d}.safetensors"
            save_file({"x": batch.contiguous().cpu()}, path)
            self._items.append(path)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self._items[index]
        if isinstance(item, Path):
            return load_file(item, device=str(self.device))["x"]
        return item.to(self.device)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    def shapes(self) -> list[torch.Size]:
        """Each batch's shape, without loading a disk-stored batch's values."""
        return [self[i].shape if not isinstance(item, Path) else _stored_shape(item)
                for i, item in enumerate(self._items)]

    def nbytes(self) -> int:
        return sum(item.stat().st_size if isinstance(item, Path) else item.numel() * item.element_size()
                   for item in self._items)

    def persist(self, directory: Path) -> None:
        """Write the batches to ``directory`` as ``00000.safetensors``, ... (a disk store links its files)."""
        directory.mkdir(parents=True, exist_ok=True)
        for index, item in enumerate(self._items):
            target = directory / f"{index:05d}.safetensors"
            if isinstance(item, Path):
                link_or_copy(item, target)
            else:
                save_file({"x": item.contiguous().cpu()}, target)

    @classmethod
    def load(cls, directory: Path, mode: str, device: str | torch.device, scratch: Path | None = None
             ) -> ActivationStore:
        """A store of ``mode`` holding the batches :meth:`persist` wrote to ``directory``."""
        store = cls(mode, device, scratch)
        for path in sorted(directory.glob("*.safetensors")):
            if store.mode is OffloadMode.DISK:
                target = store._dir / path.name
                link_or_copy(path, target)
                store._items.append(target)
            else:
                store.append(load_file(path)["x"])
        return store

    def close(self) -> None:
        """Drop the batches (and their files)."""
        self._items = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # no copy: the same data under a second name
    except OSError:
        shutil.copyfile(source, target)


def _stored_shape(path: Path) -> torch.Size:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        return torch.Size(handle.get_slice("x").get_shape())


def store_batches(batches, mode: str, device: str | torch.device, scratch: str | os.PathLike | None = None
                  ) -> ActivationStore:
    """An :class:`ActivationStore` holding ``batches``."""
    store = ActivationStore(mode, device, scratch)
    for batch in batches:
        store.append(batch)
    return store


@dataclass(frozen=True)
class Offload:
    """Where a walk's activations wait between blocks: the ``--offload-activations`` mode, the compute
    device they are read back to, and the scratch directory disk stores live in."""

    mode: str
    device: str | torch.device
    scratch: Path | None = None

    def store(self, batches) -> ActivationStore:
        """An :class:`ActivationStore` of this placement holding ``batches``."""
        return store_batches(batches, self.mode, self.device, self.scratch)

    def load(self, directory: Path) -> ActivationStore:
        """The batches :meth:`ActivationStore.persist` wrote to ``directory``, in a store of this placement."""
        return ActivationStore.load(directory, self.mode, self.device, self.scratch)
