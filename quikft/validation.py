"""The checks every loader of a packed checkpoint runs: one validator, one checksum rule.

``quikft.load``, the transformers quantizer (``from_pretrained``) and ``quikft info`` call
:func:`validate_layer_values` on every quantized layer's stored tensors, so they accept and
refuse exactly the same checkpoints with the same one-line :class:`CheckpointError`. Shapes and
dtypes are checked before (from the safetensors headers, :mod:`quikft.format.header`); these are
the checks shapes cannot make: index values, grouping, finiteness, the symmetric zero-point.

Checksums: every safetensors file quikft writes records the sha256 of each tensor's bytes in its
header metadata (``quikft.sha256``, a JSON object). :func:`verify_checksums` recomputes them and
names the file and tensor of any mismatch.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from quikft.packing import unpack_zeros

CHECKSUM_KEY = "quikft.sha256"
_CHUNK = 1 << 24


class CheckpointError(ValueError):
    """A packed checkpoint that cannot be loaded; the message is one line naming file and tensor.

    A ``ValueError`` so the CLI reports it as a one-line user error.
    """


class StoredTensor(Protocol):
    """Where a tensor's bytes are: what a safetensors header says (see ``quikft.format.layout.TensorInfo``)."""

    file: Path
    offset: int  # absolute byte offset of the data in ``file``
    nbytes: int


# ------------------------------------------------------------------------------------ values

@dataclass(frozen=True)
class DeclaredLayer:
    """What the model and the checkpoint's config say a quantized layer is, before its values are read."""

    in_features: int
    bits: int
    group_size: int
    sym: bool


def validate_layer_values(name: str, values: Mapping[str, Tensor], files: Mapping[str, Path],
                          declared: DeclaredLayer) -> None:
    """Refuse one quantized layer whose stored tensors cannot give the layer ``declared`` says.

    ``values`` maps the layer's tensor names (``qzeros``, ``scales``, ``g_idx``, ``perm``,
    ``salient_idx``, ``salient_weight``, ``bias``) to their stored values; ``perm`` is absent in
    a format-1 layer, whose ``g_idx`` need not be contiguous. ``files`` names the file of each.
    """
    in_features, bits, group_size = declared.in_features, declared.bits, declared.group_size
    def fail(key: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{files[key]}: tensor {name}.{key} {problem}")

    salient, g_idx = values["salient_idx"].long().cpu(), values["g_idx"].long().cpu()
    if salient.numel() and (int(salient.min()) < 0 or int(salient.max()) >= in_features
                            or not bool((salient.diff() > 0).all())):
        raise fail("salient_idx", f"must be sorted unique columns in [0, {in_features})")
    _check_groups(g_idx, values["scales"].shape[0], in_features - salient.numel(), group_size, fail)
    if "perm" in values:
        _check_partition(values["perm"].long().cpu(), salient, g_idx, in_features, fail)
    for key in ("scales", "salient_weight", "bias"):
        # float(): torch's isfinite on fp16 is many times slower than on fp32 on CPU
        if key in values and not bool(torch.isfinite(values[key].float()).all()):
            raise fail(key, "holds non-finite values (NaN or inf); the checkpoint is corrupt or its training "
                            "diverged")
    if declared.sym:
        zeros = unpack_zeros(values["qzeros"].cpu(), bits, values["scales"].shape[1])
        if not bool((zeros == 2 ** (bits - 1)).all()):
            raise fail("qzeros", f"must all be {2 ** (bits - 1)} in a symmetric (sym) checkpoint")


def _check_groups(g_idx: Tensor, n_groups: int, n: int, group_size: int, fail) -> None:
    """Groups as the quantizer forms them: ceil(n / group_size) groups (one per row with -1),
    each holding between 1 and group_size of the n quantized columns."""
    expected = 1 if group_size == -1 else math.ceil(n / group_size)
    if n_groups != expected:
        raise fail("scales", f"has {n_groups} groups; {n} quantized columns in groups of {group_size} make "
                             f"{expected}")
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        raise fail("g_idx", f"has values outside [0, {n_groups})")
    sizes = torch.bincount(g_idx, minlength=n_groups)
    limit = n if group_size == -1 else group_size
    if n and (int(sizes.min()) < 1 or int(sizes.max()) > limit):
        raise fail("g_idx", f"puts between {int(sizes.min())} and {int(sizes.max())} columns in a group; "
                            f"group size {group_size} allows 1 to {limit}")


def _check_partition(perm: Tensor, salient: Tensor, g_idx: Tensor, in_features: int, fail) -> None:
    """Format 2: groups stored contiguously, and perm and salient_idx name every input column once."""
    if g_idx.numel() > 1 and not bool((g_idx[1:] >= g_idx[:-1]).all()):
        raise fail("g_idx", "must be non-decreasing (format 2 stores groups contiguously)")
    if perm.numel() and (int(perm.min()) < 0 or int(perm.max()) >= in_features):
        raise fail("perm", f"has values outside [0, {in_features})")
    seen = torch.zeros(in_features, dtype=torch.int32)
    seen.index_add_(0, perm, torch.ones_like(perm, dtype=torch.int32))
    seen.index_add_(0, salient, torch.ones_like(salient, dtype=torch.int32))
    if not bool((seen == 1).all()):
        raise fail("perm", "and salient_idx must together name every input column exactly once")


# ------------------------------------------------------------------------------------ checksums

def tensor_digest(tensor: Tensor) -> str:
    """sha256 of a tensor's bytes as safetensors stores them (C order, little-endian)."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy().data).hexdigest()


def checksum_metadata(tensors: Mapping[str, Tensor]) -> dict[str, str]:
    """The header metadata entry that records every tensor's digest."""
    return {CHECKSUM_KEY: json.dumps({name: tensor_digest(t) for name, t in sorted(tensors.items())})}


def recorded_digests(metadata: Mapping[str, str] | None, file: Path) -> dict[str, str] | None:
    """The digests a file's metadata records, or None when it records none (written by another tool)."""
    if not metadata or CHECKSUM_KEY not in metadata:
        return None
    try:
        digests = json.loads(metadata[CHECKSUM_KEY])
    except json.JSONDecodeError:
        raise CheckpointError(f"{file}: corrupt checksum metadata ({CHECKSUM_KEY})") from None
    if not isinstance(digests, dict):
        raise CheckpointError(f"{file}: corrupt checksum metadata ({CHECKSUM_KEY})")
    return digests


def _file_digest(info: StoredTensor) -> str:
    digest = hashlib.sha256()
    with open(info.file, "rb") as handle:
        handle.seek(info.offset)
        remaining = info.nbytes
        while remaining:
            chunk = handle.read(min(_CHUNK, remaining))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.hexdigest()


def verify_checksums(tensors: Mapping[str, StoredTensor], metadata: Mapping[Path, Mapping[str, str] | None]
                     ) -> dict[str, Any]:
    """Recompute every recorded digest. Returns counts; raises naming the file and tensor of a mismatch
    (and how many others differ), or a tensor the metadata does not cover."""
    checked, unrecorded, bad = 0, [], []
    files = sorted({info.file for info in tensors.values()})
    for file in files:
        digests = recorded_digests(metadata.get(file), file)
        if digests is None:
            unrecorded.append(file)
            continue
        for name, info in sorted(tensors.items()):
            if info.file != file:
                continue
            if name not in digests:
                raise CheckpointError(f"{file}: tensor {name} has no recorded checksum")
            checked += 1
            if _file_digest(info) != digests[name]:
                bad.append((file, name))
    if bad:
        file, name = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CheckpointError(f"{file}: tensor {name} does not match its recorded sha256 checksum{more}; "
                              f"the file is corrupt")
    return {"tensors": checked, "files": len(files) - len(unrecorded),
            "files_without_checksums": [str(file) for file in unrecorded]}
