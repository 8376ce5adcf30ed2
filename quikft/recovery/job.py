"""The ``quikft recover`` job: GIFT-SW recovery fine-tuning, from config to output.

``recover(config)`` is what the CLI calls; it is equally usable from Python. It plans the run
(:mod:`quikft.recovery.run`), lets the mode prepare and wrap the model
(:mod:`quikft.recovery.modes`), trains (:mod:`quikft.recovery.training`, one
:class:`~quikft.recovery.session.TrainingSession`) and lets the mode write its output, atomically,
with ``recover_report.json`` (:mod:`quikft.recovery.report`).

Only the trainable slices (``GiftLinear.salient_weight``, or LoRA adapters) have gradients and
optimizer state. Runs under ``accelerate launch`` as data parallel (each process takes different
rows of every batch), or sharded with ``--sharding fsdp2``; rank 0 evaluates and saves. A
non-finite loss or gradient stops the run before the update that would spread it, and nothing is
written.
"""

from __future__ import annotations

import shutil
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from quikft.atomic import OutputLock, atomic_directory, write_json
from quikft.models import load_model, load_tokenizer
from quikft.recovery import sharding
from quikft.recovery.config import RecoverConfig
from quikft.recovery.data import TrainingMixture
from quikft.recovery.loss import Distillation, Loss
from quikft.recovery.modes import Prepared
from quikft.recovery.report import Outcome, bits_per_weight, build_report, run_settings
from quikft.recovery.run import REPORT_NAME, Run, plan
from quikft.recovery.session import Curve, TrainingSession, seed_generators
from quikft.recovery.sharding import Sharding
from quikft.recovery.training import train
from quikft.runinfo import peak_rss_mb


def recover(config: RecoverConfig, progress: bool = True) -> dict | None:
    """Run the whole recovery job for ``config``; returns the report (rank 0; None on the other
    processes of a distributed run) that is also saved."""
    run = plan(config)
    accelerator = _accelerator(cpu=run.device == "cpu")
    # One writer per output: its state and output stay this run's until it ends (or dies).
    lock = OutputLock(run.out_dir, "recover") if accelerator.is_main_process else None
    try:
        return _recover(run, accelerator, progress)
    finally:
        if lock is not None:
            lock.release()


def _recover(run: Run, accelerator, progress: bool) -> dict | None:
    config = run.config
    main = accelerator.is_main_process
    began = time.perf_counter()
    seed_generators(config.seed + accelerator.process_index)
    if progress and main:
        tqdm.write(f"recover {config.mode}: compute dtype {run.dtype.name} ({run.dtype.reason}), device {run.device}")
    # Data first: a bad --data should fail in seconds, not after loading and evaluating the model.
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    data = TrainingMixture(tokenizer, config.data, config.seqlen, config.seed)
    prepared = run.mode.prepare(config, run.device, evaluate=main and config.eval_before, progress=progress and main)
    trainable = run.mode.wrap(prepared, config)
    distillation = load_distillation(run, prepared)
    sharded = Sharding(config.sharding).shards_parameters and accelerator.num_processes > 1
    if sharded:
        sharding.shard_model(prepared.model, accelerator.device)
        trainable = {name: p for name, p in prepared.model.named_parameters() if name in trainable}
    session = TrainingSession.start(run, trainable, accelerator, run_settings(run, prepared),
                                    prepared.model if sharded else None)
    train(session, prepared, data, distillation, progress and main)
    curve = session.curve
    # Every process's peak memory during training (before the first one finishes alone).
    peaks = accelerator.gather(torch.tensor([peak_rss_mb()], device=accelerator.device))
    curve.peak_rss_mb_per_process = [round(float(v), 1) for v in peaks.cpu()]
    if sharded:  # whole trained tensors, then the first process finishes on a fresh unsharded model
        trained = sharding.full_state(trainable)
        if main:
            prepared, trainable = run.mode.rebuild(prepared, config, run.device, trained)
    report = None
    if main:
        report = finish(run, prepared, trainable, curve, began)
        shutil.rmtree(run.state_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return report


def load_distillation(run: Run, prepared: Prepared) -> Distillation | None:
    """``--loss kd``: the full-precision teacher (one more model in memory and a forward per step)."""
    if not Loss(run.config.loss).needs_teacher:
        return None
    name = prepared.teacher(run.config)
    if name is None:
        raise ValueError(f"--loss kd: {run.config.model} does not record the model it was quantized from; "
                         f"pass --teacher")
    teacher, _ = load_model(name, device=run.device, trust_remote_code=run.config.trust_remote_code,
                            for_training=True)
    return Distillation(teacher.requires_grad_(False).eval(), run.config.kd_temperature)


def finish(run: Run, prepared: Prepared, trainable: dict[str, nn.Parameter], curve: Curve, began: float) -> dict:
    """Put the trained columns back, quantize (pre), evaluate, and write the output atomically."""
    config = run.config
    trainable_params = sum(p.numel() for p in trainable.values())
    with atomic_directory(run.out_dir, overwrite=config.overwrite, marker=REPORT_NAME) as staging:
        ppl_after = run.mode.finish(prepared, config, staging, str(run.out_dir))
        outcome = Outcome(ppl_after, trainable_params, time.perf_counter() - began, bits_per_weight(staging))
        report = build_report(run, prepared, curve, outcome)
        write_json(staging / REPORT_NAME, report)
    report["out"] = str(run.out_dir)
    return report


def end_distributed() -> None:
    """Destroy the process group a launched run made, before the interpreter exits.

    Left to interpreter finalization, gloo's worker threads can still hold work objects whose tensors
    need the GIL that is being torn down, and a run that finished and saved its output then dies with
    SIGABRT (seen once in CI on a 2-process recover; pytorch/pytorch#179291 describes the mechanism).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _accelerator(cpu: bool):
    from accelerate import Accelerator, DistributedDataParallelKwargs

    # cpu=True makes a multi-process launch (accelerate launch --multi_gpu, torchrun) use gloo on CPU.
    # Buffers (packed codes, frozen weights) never change: do not re-broadcast them every forward.
    return Accelerator(cpu=cpu, kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
