"""The optimisation loop of a recovery run: batches, gradient accumulation, evaluation and saves.

Each optimizer step takes ``grad_accum`` micro-batches; under data parallel each process takes
different rows of every micro-batch (:func:`batch_rows`), and the step's loss is the mean over all
its labelled tokens whatever the split (:func:`step_label_count`). What the step updates, checks,
records and saves is the :class:`~quikft.recovery.session.TrainingSession`'s.
"""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from quikft.recovery.config import RecoverConfig
from quikft.recovery.data import IGNORE, TrainingMixture
from quikft.recovery.evaluation import quick_ppl
from quikft.recovery.loss import Distillation, TrainingObjective
from quikft.recovery.modes import Prepared
from quikft.recovery.session import TrainingSession


def batch_rows(step: int, micro: int, config: RecoverConfig, rank: int, world: int) -> list[int]:
    """This process's row indices of one micro-batch (disjoint across processes)."""
    first = (step * config.grad_accum + micro) * config.batch_size
    return list(range(first + rank, first + config.batch_size, world))


def step_label_count(data: TrainingMixture, step: int, config: RecoverConfig) -> int:
    """Labelled (predicted) tokens in one optimizer step over every process and micro-batch.

    Each process can count them alone (rows are a function of their index), and dividing every
    micro-batch's summed loss by this count makes the step's loss the mean over all its labelled
    tokens, whatever the split into processes and micro-batches. A rank whose rows happen to hold
    no labelled token then adds zero instead of a NaN mean of nothing.
    """
    rows = config.batch_size * config.grad_accum
    labels = data.batch(list(range(step * rows, (step + 1) * rows)))["labels"]
    return int((labels[:, 1:] != IGNORE).sum())


def set_activation_checkpointing(model, enabled: bool) -> None:
    """Recompute each block in backward. Non-reentrant, so frozen inputs and GiftLinear's noise
    (re-drawn from the restored RNG state) work."""
    # transformers renamed gradient_* to activation_checkpointing_* (and the kwargs) in 5.x; accept both.
    if enabled:
        options = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    else:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()


def train(session: TrainingSession, prepared: Prepared, data: TrainingMixture, distillation: Distillation | None,
          progress: bool) -> None:
    """Run the session's steps on ``prepared.model`` (from the saved state on --resume); the curve,
    timings included, is the session's."""
    run, accelerator, model = session.run, session.accelerator, prepared.model
    config = run.config
    start = session.resume() if config.resume else 0
    if config.gradient_checkpointing:
        set_activation_checkpointing(model, True)
    # FSDP2 gathers the embedding and head only inside the whole model's forward: sharded runs take
    # the loss from the model's logits instead of splitting decoder and head.
    objective = TrainingObjective(model, run.dtype.dtype, data.batch([0])["input_ids"].to(accelerator.device),
                                  distillation, split_head=not session.sharded)
    model.train()
    wrapped = objective if session.sharded else accelerator.prepare_model(objective)
    bar = tqdm(range(start, config.steps), desc=f"recover {config.mode}", disable=not progress, unit="step",
               initial=start, total=config.steps)
    for step in bar:
        began = time.perf_counter()
        loss = accumulate_gradients(session, wrapped, data, step)
        lr, norm = session.update(step, loss)
        entry = session.record(step, loss, lr, norm, time.perf_counter() - began)
        bar.set_postfix({"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{entry['tokens_per_s']:.0f}"})
        after_step(session, prepared, step)
    if config.gradient_checkpointing:
        set_activation_checkpointing(model, False)
    model.eval()


def accumulate_gradients(session: TrainingSession, wrapped: nn.Module, data: TrainingMixture, step: int) -> float:
    """Forward and backward over this process's rows of every micro-batch of ``step``; returns the
    step's loss, the mean over all its labelled tokens (summed over the processes)."""
    config, accelerator, world = session.run.config, session.accelerator, session.world
    count = max(step_label_count(data, step, config), 1)
    loss_sum = torch.zeros((), device=accelerator.device)
    for micro in range(config.grad_accum):
        batch = data.batch(batch_rows(step, micro, config, session.rank, world))
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with session.gradient_sync(wrapped, sync=micro == config.grad_accum - 1):
            summed = wrapped(input_ids=batch["input_ids"], labels=batch["labels"])
            # Data parallel averages gradients over processes: scale by their number to get the sum.
            accelerator.backward(summed * (world / count))
        loss_sum = loss_sum + summed.detach().float()
    return accelerator.reduce(loss_sum.reshape(1), reduction="sum").item() / count


def after_step(session: TrainingSession, prepared: Prepared, step: int) -> None:
    """--eval-every's quick ppl and --save-every's resumable state, when step ``step`` (0-based) is due."""
    config, done = session.run.config, step + 1
    # A sharded model's forward needs every process: then all of them evaluate.
    if config.eval_every and done % config.eval_every == 0 and (session.is_main or session.sharded):
        ppl = quick_ppl(prepared.model, prepared.tokenizer, config, f"step {done}")
        session.curve.eval_curve.append({"step": done, "ppl": ppl["ppl"] if ppl else None})
    if config.save_every and done % config.save_every == 0 and done < config.steps:
        session.save(done)
