"""Zero-shot multiple-choice scoring by log-likelihood, the way lm-evaluation-harness does it.

Each choice's score is log p(continuation | context) summed over the continuation's tokens.
Tokenization follows lm-eval so the numbers agree with it: trailing whitespace of the context
moves into the continuation, then ``encode(context + continuation)`` is split after
``len(encode(context))`` tokens (so the split falls on a token boundary of the joined text),
with the tokenizer's default special tokens. acc takes the argmax of the scores, acc_norm the
argmax of score / len(choice text); standard errors are sample std / sqrt(n).

Requests are deduplicated by model input (BoolQ's " no"/" yes" share one forward pass), sorted
longest first and batched with right padding, which leaves every real position's logits
unchanged under a causal mask.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from quikft import arch
from quikft.eval.lm_eval_backend import evaluate_tasks_lm_eval
from quikft.eval.results import EvalBackend, TaskResult, ZeroShotSettings
from quikft.eval.tasks import Example, TaskData, TaskRef, load_task

# ---------------------------------------------------------------------------- tokenization

def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation token ids, split at the token boundary of the joined text."""
    stripped = context.rstrip()
    if stripped != context:  # "Answer: " + "x" would otherwise tokenize the space on its own
        continuation = context[len(stripped):] + continuation
        context = stripped
    if not context:  # condition on a start token, as lm-eval does for an empty context
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [start], tokenizer.encode(continuation, add_special_tokens=False)
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids):]


# ---------------------------------------------------------------------------- scoring

@dataclass
class _Input:
    """One distinct model input and the requests that read their scores from it."""

    ids: list[int]
    requests: list[tuple[int, list[int]]] = field(default_factory=list)  # (request index, continuation ids)

    def first_needed(self) -> int:
        return len(self.ids) - max(len(cont) for _, cont in self.requests)


def _group_inputs(pairs: list[tuple[list[int], list[int]]], max_length: int) -> list[_Input]:
    """Distinct inputs (context + continuation minus its last token, left-truncated to the model)."""
    inputs: dict[tuple[int, ...], _Input] = {}
    for index, (context, continuation) in enumerate(pairs):
        if not continuation:
            raise ValueError(f"request {index} has an empty continuation after tokenization")
        if len(continuation) > max_length:
            raise ValueError(f"a continuation of {len(continuation)} tokens exceeds the model's {max_length}")
        ids = (context + continuation)[-(max_length + 1):][:-1]
        inputs.setdefault(tuple(ids), _Input(ids)).requests.append((index, continuation))
    # Longest first: similar lengths share a batch (little padding) and memory peaks at the start.
    return sorted(inputs.values(), key=lambda item: -len(item.ids))


def _hidden_and_head(model, ids: torch.Tensor, mask: torch.Tensor):
    """Final hidden states and the head that maps them to logits (or logits and identity)."""
    if arch.head_path_matches(model, ids[:1, : int(mask[0].sum())]):
        # run the vocab head only where a continuation token is predicted
        hidden = arch.decoder_hidden(model, ids, attention_mask=mask)
        return hidden, arch.logits_from_hidden(model)
    return model(input_ids=ids, attention_mask=mask).logits, None


def _score_batch(model, batch: list[_Input], pad_id: int, scores: list[float]) -> None:
    device = next(model.parameters()).device
    width = max(len(item.ids) for item in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        ids[row, :len(item.ids)] = torch.tensor(item.ids)
        mask[row, :len(item.ids)] = 1
    states, head = _hidden_and_head(model, ids.to(device), mask.to(device))
    for row, item in enumerate(batch):
        first, last = item.first_needed(), len(item.ids)
        picked = states[row, first:last]
        logprobs = F.log_softmax((head(picked) if head is not None else picked).float(), dim=-1)
        for index, continuation in item.requests:
            # logits at input position p predict token p + 1: the continuation's are the last ones.
            rows = torch.arange(last - len(continuation), last, device=logprobs.device) - first
            targets = torch.tensor(continuation, device=logprobs.device)
            scores[index] = logprobs[rows, targets].sum().item()


def model_max_length(model, default: int = 2048) -> int:
    return int(getattr(model.config, "max_position_embeddings", None) or default)


@torch.inference_mode()
def loglikelihoods(model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 16,
                   progress: str | None = "loglikelihood") -> list[float]:
    """log p(continuation | context) for each ``(context, continuation)`` request; ``progress``
    labels the progress bar (None: no bar)."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1 (got {batch_size})")
    pairs = [encode_pair(tokenizer, context, continuation) for context, continuation in requests]
    inputs = _group_inputs(pairs, model_max_length(model))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = [math.nan] * len(pairs)
    with tqdm(total=len(inputs), desc=progress, disable=progress is None, unit="seq") as bar:
        for start in range(0, len(inputs), batch_size):
            batch = inputs[start:start + batch_size]
            _score_batch(model, batch, pad_id, scores)
            bar.update(len(batch))
    return scores


# ---------------------------------------------------------------------------- metrics

def mean_and_stderr(values: Sequence[float]) -> dict[str, float | None]:
    """Mean and its standard error (sample std / sqrt(n)); no stderr for fewer than 2 values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"value": mean, "stderr": None}
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return {"value": mean, "stderr": math.sqrt(variance / n)}


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # first maximum, like numpy


def choice_metrics(examples: Sequence[Example], scores: Sequence[Sequence[float]],
                   metrics: Sequence[str] = ("acc", "acc_norm")) -> dict[str, dict[str, float | None]]:
    """acc / acc_norm (mean and stderr) from each example's per-choice log-likelihoods."""
    hits: dict[str, list[float]] = {name: [] for name in metrics}
    for example, lls in zip(examples, scores, strict=True):
        if "acc" in hits:
            hits["acc"].append(float(_argmax(lls) == example.gold))
        if "acc_norm" in hits:
            normed = [ll / length for ll, length in zip(lls, example.norm_lengths, strict=True)]
            hits["acc_norm"].append(float(_argmax(normed) == example.gold))
    return {name: mean_and_stderr(values) for name, values in hits.items()}


def example_scores(task: TaskData, flat: Sequence[float]) -> list[list[float]]:
    """Split the flat per-request scores back into one list per example."""
    out, offset = [], 0
    for example in task.examples:
        count = len(example.contexts)
        out.append(list(flat[offset:offset + count]))
        offset += count
    return out


def evaluate_task(model, tokenizer, task: TaskData, settings: ZeroShotSettings | None = None) -> TaskResult:
    """Score every example of ``task`` and return its acc (and acc_norm where lm-eval reports it)."""
    settings = settings or ZeroShotSettings()
    began = time.perf_counter()
    requests = [pair for example in task.examples for pair in example.requests()]
    flat = loglikelihoods(model, tokenizer, requests, settings.batch_size, task.name if settings.progress else None)
    metrics = choice_metrics(task.examples, example_scores(task, flat), task.metrics)
    return TaskResult(model=settings.model_name or getattr(model.config, "_name_or_path", "model"), task=task.name,
                      n=len(task.examples), metrics=metrics, seconds=time.perf_counter() - began,
                      source=task.source)


def evaluate_tasks(model, tokenizer, refs: Sequence[TaskRef], settings: ZeroShotSettings | None = None
                   ) -> list[TaskResult]:
    """Evaluate several tasks with our scorer (``native``) or lm-evaluation-harness (``lm-eval``)."""
    settings = settings or ZeroShotSettings()
    if settings.backend not in EvalBackend.names():
        raise ValueError(f"unknown backend {settings.backend!r}; use one of {', '.join(EvalBackend.names())}")
    # Read every task file first, so a bad file stops the run before any scoring.
    tasks = [load_task(ref, settings.limit) for ref in refs]
    if settings.backend == EvalBackend.LM_EVAL:
        return evaluate_tasks_lm_eval(model, tokenizer, list(refs), settings)
    return [evaluate_task(model, tokenizer, task, settings) for task in tasks]


def format_table(rows: Sequence[dict]) -> str:
    """A plain-text table of ``task, metric, value, stderr, n`` rows (values in percent for acc)."""
    header = f"{'task':<16} {'metric':<10} {'value':>8} {'stderr':>8} {'n':>6}"
    lines = [header, "-" * len(header)]
    for row in rows:
        value, stderr = row["value"], row["stderr"]
        scale = 100.0 if row["metric"].startswith("acc") else 1.0
        shown = f"{value * scale:8.2f}" if value is not None else f"{'–':>8}"
        err = f"{stderr * scale:8.2f}" if stderr is not None else f"{'–':>8}"
        lines.append(f"{row['task']:<16} {row['metric']:<10} {shown} {err} {row['n']:>6}")
    return "\n".join(lines)
