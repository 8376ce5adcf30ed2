"""``quikft convert``: a packed checkpoint rewritten in the current format version (1 -> 2)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from quikft.atomic import atomic_directory, check_output, is_regular_file, write_json
from quikft.format.layout import FORMAT_VERSION, is_format_file, rest_dtype
from quikft.format.loader import load
from quikft.format.reader import read_quantization_config
from quikft.format.writer import write_quik_model

CONVERT_REPORT = "convert_report.json"  # marks a convert's output: only such a directory is replaced


def convert(path: str | os.PathLike, out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Rewrite a packed checkpoint in the current format (format 1 -> 2) into the new ``out_dir``.

    The weights are identical (format 2 only stores the quantized columns in another order);
    unquantized tensors keep their stored dtype, and every other file of the directory (reports,
    salient indices) is copied. ``out_dir`` is checked before the model loads, as every job's output
    is (``overwrite`` replaces only a previous convert's output), and written under a temporary name.
    """
    import shutil

    path, out_dir = Path(path), Path(out_dir)
    qconfig = read_quantization_config(path)
    check_output(out_dir, CONVERT_REPORT, overwrite, inputs=[path])
    model = load(path, dtype=rest_dtype(qconfig), prepare=False)
    tokenizer = _stored_tokenizer(path)
    with atomic_directory(out_dir, overwrite=overwrite, marker=CONVERT_REPORT) as staging:
        for item in path.iterdir():
            if is_regular_file(item) and not is_format_file(item.name):
                shutil.copy2(item, staging / item.name)
        write_quik_model(model, tokenizer, staging)
        write_json(staging / CONVERT_REPORT, {"job": "convert", "source": str(path),
                                              "format_version": [qconfig["format_version"], FORMAT_VERSION]})
    return out_dir


def _stored_tokenizer(path: Path) -> Any:
    """The directory's tokenizer as stored (no pad-token defaults added), or None if it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError):
        return None
