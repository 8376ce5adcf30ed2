"""Datasets by name or path: evaluation text, calibration windows and instruction records.

Names resolve to a local folder laid out like the project's shared data when ``$QUIKFT_DATA``
points at one, and to the Hugging Face hub (through ``datasets``) otherwise. Paths may be
``.txt``, ``.json``/``.jsonl`` (a ``text`` field or instruction fields) or ``.parquet``.

Calibration and training never read a test split: ``wikitext2`` calibrates from ``train`` where
it exists and from ``validation`` otherwise (the local copy has no train split).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch


class DataError(ValueError):
    """A dataset is missing, malformed, empty or too short for the request."""


@dataclass(frozen=True)
class NamedDataset:
    """Where a named dataset lives locally (relative to ``$QUIKFT_DATA``) and on the hub."""

    local: dict[str, str]  # split -> relative path
    hub: tuple[str, str | None]  # (hub path, config name)
    kind: str  # "wikitext" (raw lines), "text" (documents), "instruction"
    hub_field: str = "text"


DATASETS: dict[str, NamedDataset] = {
    "wikitext2": NamedDataset(
        local={"test": "wikitext-2-raw/wiki.test.raw", "validation": "wikitext-2-raw/wiki.valid.raw"},
        hub=("Salesforce/wikitext", "wikitext-2-raw-v1"), kind="wikitext"),
    "c4": NamedDataset(
        local={"train": "c4-sample/c4_demo.jsonl"}, hub=("allenai/c4", "en"), kind="text"),
    "ptb": NamedDataset(
        local={"validation": "ptb/ptb.valid.txt"}, hub=("ptb-text-only/ptb_text_only", None),
        kind="text", hub_field="sentence"),
    "alpaca": NamedDataset(
        local={"train": "alpaca/alpaca_data_1k.json"}, hub=("tatsu-lab/alpaca", None), kind="instruction"),
    "alpaca-gpt4": NamedDataset(
        local={"train": "alpaca-gpt4/alpaca_en_demo.json"}, hub=("vicgalle/alpaca-gpt4", None),
        kind="instruction"),
}

# Splits a calibration or training run may read, in order of preference.
TRAINING_SPLITS = ("train", "validation")


def data_root() -> Path | None:
    """The local data folder from ``$QUIKFT_DATA``, if set and present."""
    root = os.environ.get("QUIKFT_DATA")
    if not root:
        return None
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"QUIKFT_DATA={root} is not a directory; point it at a folder laid out like shared/data")
    return path


# ---------------------------------------------------------------------------- file readers

def wikitext_rows(text: str) -> list[str]:
    """Rows as the hub's ``wikitext-2-raw-v1`` has them: each line is a row keeping its
    trailing newline, and a blank line (``" \\n"``) becomes ``""``."""
    return ["" if line.strip() == "" else line for line in text.splitlines(keepends=True)]


def _read_json_records(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        records = []
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        return records
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if isinstance(data, dict):  # {"data": [...]} style
        data = next((v for v in data.values() if isinstance(v, list)), [data])
    return list(data)


def _read_records(path: Path) -> list[dict]:
    if path.suffix in (".json", ".jsonl"):
        return _read_json_records(path)
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow; run `pip install pyarrow`") from None
        return pq.read_table(path).to_pylist()
    raise DataError(f"{path}: unsupported file type; use .txt, .json, .jsonl or .parquet")


def instruction_text(record: dict) -> str:
    """Flatten an instruction record into plain text (for calibration or LM-style training)."""
    if "messages" in record:
        return "\n\n".join(str(m.get("content", "")) for m in record["messages"])
    parts = [record.get("instruction", ""), record.get("input", ""), record.get("output", "")]
    return "\n\n".join(p for p in parts if p)


def _record_text(record: dict, source: str) -> str:
    if "text" in record:
        return str(record["text"])
    if "instruction" in record or "messages" in record:
        return instruction_text(record)
    raise DataError(f"{source}: records need a 'text' field or instruction fields "
                    f"(instruction/input/output or messages); found {sorted(record)}")


def read_documents(path: str | os.PathLike) -> list[str]:
    """Documents of a local file: lines of a .txt, or the text of each json/parquet record."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if path.suffix in (".txt", ".raw", ".tokens"):
        return path.read_text().splitlines(keepends=True)
    return [_record_text(r, str(path)) for r in _read_records(path)]


def read_instructions(path: str | os.PathLike) -> list[dict]:
    """Instruction records (alpaca fields or chat ``messages``) of a local json/jsonl/parquet file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    records = _read_records(path)
    for number, record in enumerate(records, 1):
        if not ("messages" in record or "output" in record):
            raise DataError(f"{path}: record {number} has neither 'messages' nor 'output'")
    return records


# ---------------------------------------------------------------------------- named datasets

def _hub_rows(spec: NamedDataset, split: str, field: str) -> list:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"loading {spec.hub[0]} from the hub needs `pip install datasets` (or set QUIKFT_DATA "
            f"to a local data folder)") from None
    try:
        dataset = datasets.load_dataset(spec.hub[0], spec.hub[1], split=split)
    except Exception as err:  # network or hub errors come in many types
        raise DataError(f"cannot load {spec.hub[0]} split {split} from the hub ({type(err).__name__}); "
                        f"set QUIKFT_DATA to a local data folder or pass a file path") from None
    return list(dataset) if field == "*" else list(dataset[field])


def available_split(name: str, preferred: tuple[str, ...]) -> str:
    """The first split of ``preferred`` that the configured source has."""
    spec = _named(name)
    root = data_root()
    if root is None:
        return preferred[0]
    for split in preferred:
        if split in spec.local and (root / spec.local[split]).exists():
            return split
    raise DataError(f"{name}: none of the splits {list(preferred)} is in {root}; "
                    f"available: {sorted(spec.local)}")


def check_source(source: str, setting: str = "--data") -> None:
    """Refuse (before any model loads) a data source that is neither a known name nor an existing file."""
    if source in DATASETS:
        return
    path = Path(source).expanduser()
    if path.is_file():
        return
    if path.exists():
        raise DataError(f"{setting} {source} is a directory; pass a .txt, .json, .jsonl or .parquet file")
    raise DataError(f"{setting} {source!r} is neither a known dataset ({', '.join(sorted(DATASETS))}) "
                    f"nor an existing file")


def _named(name: str) -> NamedDataset:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; use one of {sorted(DATASETS)} or a file path")
    return DATASETS[name]


def _local_file(name: str, split: str) -> Path | None:
    root = data_root()
    if root is None:
        return None
    spec = _named(name)
    if split not in spec.local:
        raise DataError(f"{name}: split {split!r} is not in the local data folder {root} "
                        f"(it has {sorted(spec.local)}); unset QUIKFT_DATA to use the hub")
    path = root / spec.local[split]
    if not path.exists():
        raise DataError(f"{name}: expected {path} under QUIKFT_DATA")
    return path


def load_documents(source: str, split: str = "test") -> list[str]:
    """Documents (or wikitext rows) of a named dataset split or a file path."""
    if source not in DATASETS:
        return read_documents(source)
    spec = _named(source)
    local = _local_file(source, split)
    if spec.kind == "wikitext":
        if local is not None:
            return wikitext_rows(local.read_text())
        return _hub_rows(spec, split, "text")
    if spec.kind == "instruction":
        records = read_instructions(local) if local else _hub_rows(spec, split, "*")
        return [instruction_text(r) for r in records]
    return read_documents(local) if local else [str(t) for t in _hub_rows(spec, split, spec.hub_field)]


def load_instruction_records(source: str) -> list[dict]:
    """Instruction records of a named instruction dataset or a file path."""
    if source not in DATASETS:
        return read_instructions(source)
    spec = _named(source)
    if spec.kind != "instruction":
        raise DataError(f"{source} is plain text, not instruction data")
    local = _local_file(source, "train")
    return read_instructions(local) if local else _hub_rows(spec, "train", "*")


def eval_text(source: str, split: str = "test") -> str:
    """The evaluation string of the GPTQ protocol: the split's rows joined with blank lines."""
    return "\n\n".join(load_documents(source, split))


# ---------------------------------------------------------------------------- calibration

def calibration_text(source: str) -> str:
    """Text for calibration: a training split of a named dataset, or a file, never a test split."""
    split = available_split(source, TRAINING_SPLITS) if source in DATASETS else "train"
    documents = load_documents(source, split)
    text = "\n\n".join(d for d in documents if d.strip())
    if not text.strip():
        raise DataError(f"{source}: no text found (0 non-empty documents of {len(documents)})")
    return text


def sample_windows(token_ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets of one token stream."""
    if nsamples <= 0 or seqlen <= 0:
        raise DataError(f"nsamples and seqlen must be positive (got {nsamples} and {seqlen})")
    total = token_ids.numel()
    if total < seqlen:
        raise DataError(f"calibration text has {total} tokens, fewer than one window of {seqlen}; "
                        f"use a shorter --seqlen or more text")
    rng = random.Random(seed)
    starts = [rng.randint(0, total - seqlen) for _ in range(nsamples)]
    return torch.stack([token_ids[s:s + seqlen] for s in starts])


def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """Seeded ``(nsamples, seqlen)`` int64 token windows drawn from ``source``."""
    text = calibration_text(source)
    ids = tokenize_stream(tokenizer, text)
    return sample_windows(ids, nsamples, seqlen, seed)


def tokenize_stream(tokenizer, text: str, add_special_tokens: bool = False) -> torch.Tensor:
    """Tokenize a long string once into a flat int64 tensor.

    Perplexity passes ``add_special_tokens=True`` to match the GPTQ protocol, which calls the
    tokenizer on the joined text with its defaults (a BOS for LLaMA-2, nothing for SmolLM2).
    """
    ids = tokenizer(text, add_special_tokens=add_special_tokens, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)

