"""The weights files of a checkpoint directory and their safetensors headers, checked before any read.

A header is cheap to read, and checking it first (every tensor's bytes inside the file, tiled
without gap or overlap, each name stored once; an index that names plain files inside the
directory) turns a truncated or crafted file into a one-line :class:`CheckpointError` naming the
file and the tensor, before anything is loaded.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from quikft.config import brief
from quikft.format.layout import INDEX_NAME, SAFETENSORS_DTYPES, WEIGHTS_NAME, TensorInfo
from quikft.validation import CheckpointError


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory (one file, or the shards of the index)."""
    path = Path(path)
    index_file = path / INDEX_NAME
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index_file}: not a valid safetensors index ({brief(err)})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index_file}: weight_map must map tensor names to file names")
        return [_shard(path, name, index_file) for name in sorted(set(weight_map.values()))]
    if (path / WEIGHTS_NAME).exists():
        return [path / WEIGHTS_NAME]
    raise CheckpointError(f"{path}: neither {WEIGHTS_NAME} nor {INDEX_NAME} found")


def _shard(path: Path, name: str, index_file: Path) -> Path:
    """A shard the index names: a plain file name inside the checkpoint directory (never a path that
    leaves it), naming a regular file (a hub snapshot's link to its blob is one)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or Path(name).is_absolute():
        raise CheckpointError(f"{index_file}: shard {brief(name)} is not a file name inside the checkpoint "
                              f"directory; indexes name their shards, never paths")
    shard = path / name
    if shard.exists() and not shard.is_file():
        raise CheckpointError(f"{shard}: not a regular file (a shard must be a safetensors file)")
    return shard


def _raw_header(file: Path) -> tuple[dict, int, int]:
    """A safetensors file's header JSON, the offset where its data starts and the data's size."""
    if not file.is_file():
        raise CheckpointError(f"{file}: weights file not found")
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{file}: truncated or corrupt safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise CheckpointError(f"{file}: truncated or corrupt safetensors file (header of {header_len} bytes, "
                                  f"file of {size})")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):  # RecursionError: nested 100k deep
            raise CheckpointError(f"{file}: corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header")
    return header, 8 + header_len, size - 8 - header_len


def read_header(file: str | os.PathLike) -> dict[str, TensorInfo]:
    """Parse one safetensors header, checking that every tensor's bytes are inside the file.

    Reading the header alone is cheap, and checking the data offsets here catches a truncated
    or corrupt file before anything is loaded, with the name of the first tensor it damages.
    """
    file = Path(file)
    header, data_start, data_size = _raw_header(file)
    tensors = {name: _tensor_info(file, name, entry, data_start, data_size)
               for name, entry in header.items() if name != "__metadata__"}
    _check_tiling(file, tensors, data_start, data_size)
    return tensors


def _check_tiling(file: Path, tensors: Mapping[str, TensorInfo], data_start: int, data_size: int) -> None:
    """The tensors' bytes follow one another without gap or overlap, as safetensors requires (its own
    reader refuses such a file later with a traceback; two names sharing bytes would alias)."""
    expected = data_start
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].offset, item[1].nbytes)):
        if info.offset != expected:
            where = "overlaps the tensor before it" if info.offset < expected else "leaves a gap before it"
            raise CheckpointError(f"{file}: corrupt header: tensor {name} starts at data byte "
                                  f"{info.offset - data_start}, which {where} (expected {expected - data_start})")
        expected += info.nbytes
    if expected != data_start + data_size:
        raise CheckpointError(f"{file}: corrupt safetensors file: {data_start + data_size - expected} bytes after "
                              f"its last tensor")


def read_metadata(file: str | os.PathLike) -> dict[str, str] | None:
    """The ``__metadata__`` of one safetensors file (where quikft records checksums), if any."""
    metadata = _raw_header(Path(file))[0].get("__metadata__")
    return metadata if isinstance(metadata, dict) else None


def _tensor_info(file: Path, name: str, entry: Any, data_start: int, data_size: int) -> TensorInfo:
    try:
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        shape = tuple(int(n) for n in entry["shape"])
        begin, end = (int(n) for n in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{file}: corrupt header entry for tensor {name}") from None
    info = TensorInfo(file, dtype, shape, data_start + begin)
    if begin < 0 or end < begin or any(n < 0 for n in shape):
        raise CheckpointError(f"{file}: corrupt header entry for tensor {name} (negative size or offset)")
    if end > data_size:
        raise CheckpointError(f"{file}: truncated safetensors file: tensor {name} ends at data byte {end}, "
                              f"the file holds {data_size}")
    if end - begin != info.nbytes:
        raise CheckpointError(f"{file}: corrupt header: tensor {name} spans {end - begin} bytes, "
                              f"its shape and dtype need {info.nbytes}")
    return info


def read_headers(files: Iterable[str | os.PathLike]) -> dict[str, TensorInfo]:
    """All tensors of a (possibly sharded) checkpoint by name; a name stored twice is an error."""
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        for name, info in read_header(file).items():
            if name in tensors:
                raise CheckpointError(f"{file}: tensor {name} is also stored in {tensors[name].file.name}")
            tensors[name] = info
    return tensors


def weights_source(files: list[Path]) -> Path:
    """The file to name when a tensor is missing: the only weights file, or the shards' index."""
    return files[0] if len(files) == 1 else files[0].parent / INDEX_NAME
