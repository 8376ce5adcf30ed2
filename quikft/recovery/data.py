"""Training rows for recovery fine-tuning: instruction data (loss on responses only) and plain text.

Each source becomes one token stream with a parallel label stream (``-100`` where no loss is
taken: prompts, system text). Examples are shuffled with the seed, each ends with the
tokenizer's end token, and the stream is cut into rows of ``seqlen`` tokens (packing: no
padding is wasted). A mixture of sources takes its rows round-robin, one source per row.

Row ``i`` is a pure function of (sources, seqlen, seed, i), so a resumed run reads exactly the
rows the interrupted one would have read, and data-parallel ranks can take disjoint rows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from quikft.data import (
    DATASETS,
    TRAINING_SPLITS,
    DataError,
    available_split,
    load_documents,
    load_instruction_records,
    read_documents,
)

IGNORE = -100  # label of tokens without loss (transformers' convention)


@dataclass
class TokenStream:
    """One source, tokenized: ids and labels of equal length (int64)."""

    name: str
    ids: torch.Tensor
    labels: torch.Tensor


def chat_messages(record: dict) -> list[dict]:
    """An instruction record as chat messages: ``messages`` as given, alpaca fields as user/assistant."""
    if "messages" in record:
        return [{"role": m["role"], "content": str(m.get("content", ""))} for m in record["messages"]]
    prompt = str(record.get("instruction", ""))
    if record.get("input"):
        prompt = f"{prompt}\n\n{record['input']}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(record.get("output", ""))}]


def _plain_prompt(messages: list[dict]) -> str:
    """Alpaca-style prompt for tokenizers without a chat template."""
    parts = []
    for message in messages:
        header = {"system": "### System:", "user": "### Instruction:", "assistant": "### Response:"}
        parts.append(f"{header.get(message['role'], '### ' + message['role'] + ':')}\n{message['content']}\n\n")
    return "".join(parts)


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    text = _plain_prompt(messages)
    return text + "### Response:\n" if generation_prompt else text


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_instruction(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    """Token ids and labels of one conversation; only assistant turns carry labels.

    Each assistant turn's tokens are what rendering the conversation up to that turn adds
    after rendering it with a generation prompt, so prompt and template tokens get no loss.
    """
    messages = chat_messages(record)
    ids: list[int] = []
    labels: list[int] = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _encode(tokenizer, _render(tokenizer, messages[:turn], generation_prompt=True))
        full = _encode(tokenizer, _render(tokenizer, messages[:turn + 1], generation_prompt=False))
        if full[:len(prompt)] != prompt or prompt[:len(ids)] != ids:
            # The template re-tokenizes earlier text differently: fall back to one prompt/response split.
            ids, labels = prompt, [IGNORE] * len(prompt)
            full = full if full[:len(prompt)] == prompt else prompt + _encode(tokenizer, message["content"])
        labels += [IGNORE] * (len(prompt) - len(ids)) + full[len(prompt):]
        ids = full
    if not getattr(tokenizer, "chat_template", None) and tokenizer.eos_token_id is not None:
        ids, labels = ids + [tokenizer.eos_token_id], labels + [tokenizer.eos_token_id]
    return ids, labels


def encode_text(tokenizer, document: str) -> list[int]:
    ids = _encode(tokenizer, document)
    return ids + [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else ids


def _is_instruction_source(source: str) -> bool:
    if source in DATASETS:
        return DATASETS[source].kind == "instruction"
    try:
        load_instruction_records(source)
        return True
    except DataError:
        return False


def _documents(source: str) -> list[str]:
    """A text source's documents from a training split (never the test split we report)."""
    if source in DATASETS:
        return load_documents(source, available_split(source, TRAINING_SPLITS))
    return read_documents(source)


def build_stream(tokenizer, source: str, seed: int) -> TokenStream:
    """Tokenize every example of ``source`` (shuffled with ``seed``) into one stream."""
    rng = random.Random(f"{seed}:{source}")
    ids: list[int] = []
    labels: list[int] = []
    if _is_instruction_source(source):
        records = list(load_instruction_records(source))
        rng.shuffle(records)
        for record in records:
            example_ids, example_labels = encode_instruction(tokenizer, record)
            ids += example_ids
            labels += example_labels
    else:
        documents = [d for d in _documents(source) if d.strip()]
        rng.shuffle(documents)
        for document in documents:
            example = encode_text(tokenizer, document)
            ids += example
            labels += example
    if not ids:
        raise DataError(f"training data {source!r} has no examples")
    return TokenStream(Path(source).name if source not in DATASETS else source,
                       torch.tensor(ids, dtype=torch.int64), torch.tensor(labels, dtype=torch.int64))


class TrainingMixture:
    """Rows of ``seqlen`` tokens taken round-robin from the sources (seeded, resumable by index)."""

    def __init__(self, tokenizer, sources: list[str] | tuple[str, ...], seqlen: int, seed: int = 0) -> None:
        if not sources:
            raise DataError("no training data given; pass --data (e.g. --data alpaca --data c4)")
        self.seqlen = seqlen
        self.streams = [build_stream(tokenizer, source, seed) for source in sources]
        for stream in self.streams:
            if stream.ids.numel() < seqlen:
                raise DataError(f"training data {stream.name!r} has {stream.ids.numel()} tokens, fewer than one "
                                f"row of --seqlen {seqlen}; use a shorter --seqlen or more data")
            if not bool((stream.labels != IGNORE).any()):
                raise DataError(f"training data {stream.name!r} has no tokens to learn from (no responses)")

    def row(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        stream = self.streams[index % len(self.streams)]
        per_source = index // len(self.streams)
        start = (per_source % (stream.ids.numel() // self.seqlen)) * self.seqlen
        return stream.ids[start:start + self.seqlen], stream.labels[start:start + self.seqlen]

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [self.row(i) for i in indices]
        return {"input_ids": torch.stack([r[0] for r in rows]), "labels": torch.stack([r[1] for r in rows])}
