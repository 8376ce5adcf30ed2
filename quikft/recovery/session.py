"""The training session of one recovery run: what trains and everything that moves with it.

A :class:`TrainingSession` holds the trainable parameters, AdamW over them with its cosine
schedule, the loss curve so far and this process's place among the processes; it updates them
one optimizer step at a time, refuses a step that diverges before it spreads, and saves or resumes
all of it together with every process's random generators (:mod:`quikft.recovery.state`). The
data position needs no saving: rows are a function of the step (:mod:`quikft.recovery.data`), so a
resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

from quikft.recovery import sharding, state
from quikft.recovery.config import RecoverConfig
from quikft.recovery.run import Run

# Settings that change the training trajectory: a resumed run must match them.
TRAJECTORY_KEYS = ("model", "mode", "noise", "noise_bits", "bits", "salient", "quant_config", "data", "loss",
                   "teacher", "kd_temperature", "steps", "batch_size", "grad_accum", "seqlen", "lr", "weight_decay",
                   "warmup_ratio", "max_grad_norm", "compute_dtype", "lora_rank", "seed")


class TrainingDivergedError(ValueError):
    """A non-finite loss, gradient or trained weight; the message is one line naming the step."""


@dataclass
class Curve:
    """What training measured, with the names recover_report.json and the resumable state give it."""

    loss_curve: list[dict] = field(default_factory=list)  # one entry per step: loss, lr, grad_norm, tokens/s
    eval_curve: list[dict] = field(default_factory=list)  # --eval-every's quick ppl
    step_seconds: list[float] = field(default_factory=list)
    processes: int = 1  # data-parallel processes; batch_size is their sum
    peak_rss_mb_per_process: list[float] | None = None  # during training, known once it ends

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.peak_rss_mb_per_process is None:
            del out["peak_rss_mb_per_process"]
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Curve:
        names = {item.name for item in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})


def seed_generators(seed: int) -> None:
    """Seed the generators training draws from (GIFT-SW's noise, peft's initialization)."""
    random.seed(seed)
    torch.manual_seed(seed)


def lr_schedule(optimizer: torch.optim.Optimizer, config: RecoverConfig):
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * config.steps), config.steps)


def gradient_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """The total gradient norm, clipping the gradients to ``max_norm`` when it is positive."""
    if max_norm > 0:  # over sharded parameters the norm is a DTensor: as_number gathers it
        return sharding.as_number(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return sharding.as_number(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))


@dataclass
class TrainingSession:
    """The trainable parameters, their optimizer and schedule, the curve, and the processes they train on.

    ``accelerator`` is accelerate's (process rank and count, collectives); ``sharded_model`` is the
    FSDP2-sharded model under ``--sharding fsdp2`` (:mod:`quikft.recovery.sharding`), else None
    (each process holds a DDP replica). ``settings`` is the config as it ran, saved with the state
    and compared on resume.
    """

    run: Run
    trainable: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    curve: Curve
    accelerator: Any
    settings: dict
    sharded_model: nn.Module | None = None

    @classmethod
    def start(cls, run: Run, trainable: dict[str, nn.Parameter], accelerator, settings: dict,
              sharded_model: nn.Module | None = None) -> TrainingSession:
        """A fresh session: AdamW over ``trainable`` with the cosine schedule, an empty curve."""
        config, world = run.config, accelerator.num_processes
        if config.batch_size % world:
            raise ValueError(f"--batch-size {config.batch_size} must be a multiple of the {world} processes")
        optimizer = torch.optim.AdamW(list(trainable.values()), lr=config.lr, weight_decay=config.weight_decay)
        return cls(run, trainable, optimizer, lr_schedule(optimizer, config), Curve(processes=world), accelerator,
                   settings, sharded_model)

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def sharded(self) -> bool:
        return self.sharded_model is not None

    @property
    def params(self) -> list[nn.Parameter]:
        return list(self.trainable.values())

    # ---------------------------------------------------------------- one step

    def gradient_sync(self, wrapped: nn.Module, sync: bool):
        """No gradient exchange on micro-batches before the last (gradient accumulation)."""
        if self.sharded:
            return sharding.gradient_sync(self.sharded_model, sync)
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(wrapped)

    def update(self, step: int, loss: float) -> tuple[float, float]:
        """Clip, check and apply the gradients of step ``step`` (0-based) whose loss was ``loss``;
        returns the learning rate the step used and the gradient norm. A non-finite loss or gradient
        stops before the update, a trained value beyond what the output stores right after it."""
        config = self.run.config
        params = self.params
        norm = gradient_norm(params, config.max_grad_norm)
        if not math.isfinite(loss):
            raise self.diverged(step + 1, f"the training loss is {loss}")
        if not math.isfinite(norm):
            raise self.diverged(step + 1, f"the gradient norm is {norm}")
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        peak = sharding.max_abs(params)
        if not peak <= self.run.mode.value_limit:  # also NaN; checked before anything is saved
            raise self.diverged(step + 1, f"the trained columns reach {peak:g}, beyond {self.run.mode.storage}")
        return lr, norm

    def record(self, step: int, loss: float, lr: float, norm: float, seconds: float) -> dict:
        """Add step ``step`` (0-based) to the curve and to the state's log; returns its entry."""
        config = self.run.config
        tokens_per_step = config.batch_size * config.grad_accum * config.seqlen
        self.curve.step_seconds.append(seconds)
        entry = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": norm,
                 "tokens_per_s": tokens_per_step / seconds}
        self.curve.loss_curve.append(entry)
        if self.is_main:
            state.append_log(self.run.state_dir, entry, fresh=step == 0)
        return entry

    def diverged(self, step: int, what: str) -> TrainingDivergedError:
        run = self.run
        saved = state.committed_step(run.state_dir) if run.state_dir.is_dir() else None
        kept = f"; the last resumable state (step {saved}) stays in {run.state_dir}" if saved else ""
        return TrainingDivergedError(f"step {step} of {run.config.steps}: {what}; training stopped, no output "
                                     f"written. The learning rate (--lr {run.config.lr:g}) is the likely cause: "
                                     f"lower it{kept}")

    # ---------------------------------------------------------------- save and resume

    def save(self, step: int) -> None:
        """Every rank's RNG into a fresh step directory, then rank 0's tensors, JSON and the commit.

        A sharded model's tensors and optimizer state are gathered whole first (every process takes
        part), so the state has the same layout whatever the sharding and number of processes."""
        if self.sharded:
            tensors = sharding.full_state(self.trainable)
            optimizer_state = sharding.full_optimizer_state(self.sharded_model, self.optimizer, list(self.trainable))
        else:
            tensors, optimizer_state = self.trainable, self.optimizer.state_dict()
        state_dir, accelerator = self.run.state_dir, self.accelerator
        directory = state.step_dir(state_dir, step)
        if self.is_main:
            state.begin_save(state_dir, step)
        accelerator.wait_for_everyone()
        state.save_rng(directory, self.rank)
        accelerator.wait_for_everyone()  # every rank's RNG is on disk before the commit that points at them
        if self.is_main:
            state.save_state(directory, state.TrainState(step, self.settings, self.world, tensors, optimizer_state,
                                                         self.scheduler.state_dict(), self.curve.to_dict()))
        accelerator.wait_for_everyone()

    def resume(self) -> int:
        """Continue from the committed state: the same settings and processes are required. Returns its step."""
        saved = state.load_state(self.run.state_dir)
        changed = [k for k in TRAJECTORY_KEYS if saved.settings.get(k) != self.settings.get(k)]
        if changed:
            raise ValueError(f"--resume: the saved run used different {', '.join(changed)} "
                             f"({', '.join(f'{k}={saved.settings.get(k)!r}' for k in changed)}); use the same settings")
        if saved.world != self.world:
            raise ValueError(f"--resume: the saved run used {saved.world} processes, this one {self.world}; use the "
                             f"same")
        if self.sharded:
            state.check_trainable(saved, self.trainable)
            sharding.load_full_state(self.trainable, saved.trainable)
            sharding.load_full_optimizer_state(self.sharded_model, self.optimizer, list(self.trainable),
                                               saved.optimizer)
            self.scheduler.load_state_dict(saved.scheduler)
        else:
            state.restore(saved, self.trainable, self.optimizer, self.scheduler)
        self.curve = Curve.from_dict({**self.curve.to_dict(), **saved.curve})
        state.load_rng(self.run.state_dir, self.rank)
        if self.rank == 0:
            state.rewrite_log(self.run.state_dir, self.curve.loss_curve)
        return saved.step
