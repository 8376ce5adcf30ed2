"""Perplexity with the GPTQ/QUIK protocol.

Join the split's rows with blank lines, tokenize once, cut non-overlapping windows of
``seqlen`` tokens (dropping the remainder), and report exp(mean next-token NLL) over all
predicted tokens. ``window_stride``/``max_windows`` pick a deterministic subset of windows so
quick comparisons stay cheap; every number we compare uses the same subset.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quikft import arch
from quikft.data import eval_text, tokenize_stream
from quikft.runinfo import library_versions

# Positions per head call: the head runs in chunks instead of materialising a (seqlen x vocab)
# float tensor per window, wherever the architecture adapter can reproduce the model's logits.
HEAD_CHUNK = 512


@dataclass
class PplResult:
    model: str
    dataset: str
    seqlen: int
    windows: int
    total_windows: int
    window_stride: int
    tokens: int
    ppl: float
    nll: float
    seconds: float
    tokens_per_s: float
    versions: dict = field(default_factory=library_versions)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return (f"{self.dataset} ppl {self.ppl:.4f}  ({self.windows}/{self.total_windows} windows x "
                f"{self.seqlen} tokens, {self.seconds:.1f}s, {self.tokens_per_s:.0f} tok/s)  model={self.model}")


class NonFiniteResultError(ValueError):
    """A perplexity that is not a number: refused as a result (one-line message)."""


def require_finite(result: PplResult) -> PplResult:
    """``result`` if its mean NLL is finite; a NaN or infinite perplexity is never reported as a result."""
    if not math.isfinite(result.nll):
        raise NonFiniteResultError(f"{result.dataset} perplexity of {result.model} is {result.ppl} (mean NLL "
                                   f"{result.nll}): the model produces non-finite logits; this is not a result")
    return result


def _exp(x: float) -> float:
    """exp that saturates at inf instead of raising OverflowError (NaN stays NaN)."""
    return math.inf if x > 709 else math.exp(x)


def window_starts(total_tokens: int, seqlen: int, max_windows: int | None = None, window_stride: int = 1) -> list[int]:
    """Start offsets of the evaluated windows: every ``window_stride``-th full window, at most ``max_windows``."""
    if window_stride < 1:
        raise ValueError(f"window_stride must be >= 1 (got {window_stride})")
    n_windows = total_tokens // seqlen
    starts = [i * seqlen for i in range(0, n_windows, window_stride)]
    return starts[:max_windows] if max_windows is not None else starts


@torch.inference_mode()
def window_nll(model, ids: torch.Tensor) -> float:
    """Sum of next-token NLL over one ``(1, seqlen)`` window (``seqlen - 1`` predictions)."""
    targets = ids[:, 1:]
    if not arch.head_path_matches(model, ids):
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
    hidden = arch.decoder_hidden(model, ids)[:, :-1]
    head = arch.logits_from_hidden(model)
    total = 0.0
    for start in range(0, hidden.shape[1], HEAD_CHUNK):
        logits = head(hidden[:, start:start + HEAD_CHUNK]).float()
        chunk_targets = targets[:, start:start + HEAD_CHUNK]
        total += F.cross_entropy(logits.flatten(0, 1), chunk_targets.flatten(), reduction="sum").item()
    return total


def perplexity_of_ids(model, ids: torch.Tensor, seqlen: int, starts: list[int], progress: str | None = "ppl"
                      ) -> tuple[float, int]:
    """Mean next-token NLL and number of predicted tokens over the given windows of ``ids``;
    ``progress`` labels the progress bar (None: no bar)."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    bar = tqdm(starts, desc=progress, disable=progress is None, unit="win")
    for start in bar:
        window = ids[start:start + seqlen].unsqueeze(0).to(device)
        total_nll += window_nll(model, window)
        total_tokens += seqlen - 1
        bar.set_postfix(ppl=f"{_exp(total_nll / total_tokens):.3f}")
    return total_nll / total_tokens, total_tokens


def max_context(model, seqlen: int) -> int:
    limit = getattr(model.config, "max_position_embeddings", None)
    return min(seqlen, limit) if limit else seqlen


@dataclass(frozen=True)
class PplTask:
    """What a perplexity measures: a dataset's split (or a text file) tokenized once, cut into
    non-overlapping windows of ``seqlen`` tokens (the model's context if shorter), every
    ``window_stride``-th of them, at most ``max_windows`` (None: all)."""

    dataset: str = "wikitext2"
    seqlen: int = 2048
    max_windows: int | None = None
    window_stride: int = 1
    split: str = "test"


def evaluate_ppl(model, tokenizer, dataset: str = "wikitext2", *, progress: bool = True,
                 model_name: str | None = None, **windows: Any) -> PplResult:
    """Perplexity of ``model`` on ``dataset`` with the paper protocol; ``windows`` are :class:`PplTask`'s
    other fields, by keyword (``seqlen``, ``max_windows``, ``window_stride``, ``split``)."""
    return task_ppl(model, tokenizer, PplTask(dataset, **windows), progress, model_name)


def task_ppl(model, tokenizer, task: PplTask, progress: bool = True, model_name: str | None = None) -> PplResult:
    """Perplexity of ``model`` on ``task`` with the paper protocol."""
    seqlen = max_context(model, task.seqlen)
    ids = tokenize_stream(tokenizer, eval_text(task.dataset, task.split), add_special_tokens=True)
    total_windows = ids.numel() // seqlen
    starts = window_starts(ids.numel(), seqlen, task.max_windows, task.window_stride)
    if not starts:
        raise ValueError(f"{task.dataset}: {ids.numel()} tokens give no window of {seqlen}; use a smaller --seqlen")
    began = time.perf_counter()
    nll, tokens = perplexity_of_ids(model, ids, seqlen, starts, f"ppl {task.dataset}" if progress else None)
    seconds = time.perf_counter() - began
    return PplResult(
        model=model_name or getattr(model.config, "_name_or_path", "model"), dataset=task.dataset, seqlen=seqlen,
        windows=len(starts), total_windows=total_windows, window_stride=task.window_stride, tokens=tokens,
        ppl=_exp(nll), nll=nll, seconds=seconds, tokens_per_s=len(starts) * seqlen / seconds)


class QuickEval(Protocol):
    """A job's quick-evaluation settings (the quantize job's and recovery's configs have them)."""

    eval_windows: int
    eval_stride: int
    eval_seqlen: int


def quick_ppl(model, tokenizer, settings: QuickEval, label: str) -> dict | None:
    """The jobs' quick WikiText-2 check: the first ``eval_windows`` windows of the stride subset, in
    eval mode (no training noise), as a dict; None when ``eval_windows`` is 0. A non-finite ppl is an
    error."""
    if settings.eval_windows == 0:
        return None
    task = PplTask("wikitext2", settings.eval_seqlen, settings.eval_windows, settings.eval_stride)
    was_training = model.training
    model.eval()
    try:
        result = task_ppl(model, tokenizer, task, model_name=label)
    finally:
        model.train(was_training)
    return require_finite(result).to_dict()
