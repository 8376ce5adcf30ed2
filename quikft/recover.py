"""The ``quikft recover`` job: GIFT-SW recovery fine-tuning (SPEC §5).

``recover(config)`` is what the CLI calls; it is equally usable from Python.

- ``post``: a packed checkpoint in, its salient columns trained while step-scaled noise
  (4-bit Δ by default) perturbs the frozen quantized rest, the same checkpoint out with new
  salient columns; the integer codes are untouched.
- ``salient-ft``: ``post`` without noise (the paper's ablation).
- ``pre``: a full-precision model in; salient columns chosen on calibration data, trained
  with noise at the target bit-width, then the model is quantized keeping those columns.
- ``lora``: a LoRA baseline (peft adapters on the packed layers), for comparison.

Each mode is a small object (:class:`RecoveryMode`) chosen once from the config: it checks its
input, prepares the model, makes it trainable and writes its output.

Only the salient slices (``GiftLinear.salient_weight``) are parameters with gradients and
optimizer state. Runs under ``accelerate launch`` as data parallel (each process takes
different rows of every batch); rank 0 evaluates and saves. ``save_every`` writes a
resumable state (:mod:`quikft.train_state`: trainable tensors, optimizer, scheduler, every
rank's RNG; the data position is the step, since rows are a function of their index), so a
resumed run ends with the same weights as an uninterrupted one. A non-finite loss or gradient
stops the run before the update that would spread it, and nothing is written.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from quikft import arch
from quikft.atomic import OutputLock, atomic_directory, prepare_output, write_json
from quikft.config import ConfigError, QuantConfig, RecoverConfig, build_config
from quikft.data import calibration_windows, check_source
from quikft.eval.ppl import quick_ppl
from quikft.format.inspect import stored_bits
from quikft.format.reader import is_packed_checkpoint
from quikft.format.writer import write_packed, write_quik_model, write_salient_indices
from quikft.hardware import DtypeChoice, native_bf16, resolve_device, resolve_dtype
from quikft.models import (
    check_seqlen,
    load_model,
    load_tokenizer,
    model_label,
    model_reference,
    resolve_model,
)
from quikft.quant.model import quantize_model
from quikft.quant.pipeline import select_salient_model
from quikft.recovery import sharding
from quikft.recovery import state as train_state
from quikft.recovery.data import IGNORE, TrainingMixture
from quikft.recovery.gift_linear import unwrap_after_training, wrap_for_training
from quikft.recovery.loss import TrainingObjective
from quikft.runinfo import library_versions, peak_rss_mb

REPORT_NAME = "recover_report.json"
FP16_MAX = 65504.0  # trained columns are stored as fp16
# Settings that change the training trajectory: a resumed run must match them.
TRAJECTORY_KEYS = ("model", "mode", "noise", "noise_bits", "bits", "salient", "quant_config", "data", "loss",
                   "teacher", "kd_temperature", "steps", "batch_size", "grad_accum", "seqlen", "lr", "weight_decay",
                   "warmup_ratio", "max_grad_norm", "compute_dtype", "lora_rank", "seed")


class TrainingDivergedError(ValueError):
    """A non-finite loss, gradient or trained weight; the message is one line naming the step."""


@dataclass
class Job:
    """What a mode prepared: the model to train and what finishing needs."""

    model: nn.Module
    tokenizer: object
    ppl_before: dict | None
    fp_ppl: dict | None
    quantization: dict = field(default_factory=dict)  # the output's quantize settings (bits, salient, ...)
    source_model: str | None = None  # the full-precision model the output derives from (provenance, KD teacher)
    salient: dict[str, torch.Tensor] = field(default_factory=dict)  # pre mode
    calib: torch.Tensor | None = None  # pre mode: re-used to quantize after training
    quant_config: QuantConfig | None = None


@dataclass(frozen=True)
class Run:
    """Decisions made once at the start of a run."""

    config: RecoverConfig
    mode: RecoveryMode
    device: str
    dtype: DtypeChoice
    out_dir: Path
    state_dir: Path


def default_out_dir(config: RecoverConfig) -> Path:
    return Path("runs") / f"{model_label(config.model)}-{config.mode}"


def state_dir_for(out_dir: Path) -> Path:
    """Where the resumable training state lives: beside the output, which appears only at the end."""
    return out_dir.with_name(f"{out_dir.name}.train-state")


# ------------------------------------------------------------------------------------ modes

class RecoveryMode:
    """How one mode checks its input, prepares the model, makes it trainable and writes its output."""

    name = ""
    noise_default = True  # noise when --noise/--no-noise is not given
    packed_input = True  # a packed checkpoint in (False: a full-precision model)
    # The trained values must fit the dtype the output stores them in (GIFT-SW columns: fp16).
    value_limit = FP16_MAX
    storage = "fp16 (the checkpoint's dtype)"
    # --sharding fsdp2: the mode's model can be rebuilt from its input alone after training (rebuild).
    shardable = True

    def noise_bits(self, config: RecoverConfig) -> int | None:
        """The bit-width whose step scales the noise, or None for no noise."""
        if not (self.noise_default if config.noise is None else config.noise):
            return None
        return config.noise_bits or self.default_noise_bits(config)

    def default_noise_bits(self, config: RecoverConfig) -> int:
        return 4  # paper §6.3: 4-bit noise after quantization

    def check_input(self, config: RecoverConfig) -> None:
        """Refuse the wrong kind of input before anything is loaded."""
        packed = is_packed_checkpoint(resolve_model(config.model))
        if self.packed_input and not packed:
            raise ValueError(f"--mode {self.name} needs a packed checkpoint from `quikft quantize` as --model "
                             f"(got {config.model or 'the default FP model'}); or use --mode pre")
        if not self.packed_input and packed:
            raise ValueError(f"--mode {self.name} trains a full-precision model, but {config.model} is a packed "
                             f"checkpoint; pass the FP model, or use --mode post")

    def prepare(self, config: RecoverConfig, device: str, evaluate: bool, progress: bool) -> Job:
        """Load the packed input and measure its ppl (before any training)."""
        model, tokenizer = load_model(config.model, device=device, trust_remote_code=config.trust_remote_code,
                                      for_training=True)
        ppl = _quick_ppl(model, tokenizer, config, str(config.model)) if evaluate else None
        qconfig = dict(model.config.quantization_config)
        # Checkpoints written before source_model existed kept the source in their settings.
        source = qconfig.get("source_model") or qconfig.get("settings", {}).get("model")
        return Job(model, tokenizer, ppl, _fp_ppl_of(config), qconfig, source_model=source)

    def wrap(self, job: Job, config: RecoverConfig) -> dict[str, nn.Parameter]:
        """Make the mode's layers trainable (everything else frozen); the trainable parameters by name."""
        layers = wrap_for_training(job.model, self.noise_bits(config), job.salient or None,
                                   cache_base=config.cache_base)
        return {f"{name}.salient_weight": layer.salient_weight for name, layer in layers.items()}

    def rebuild(self, job: Job, config: RecoverConfig, device: str, trained: dict[str, torch.Tensor]
                ) -> tuple[Job, dict[str, nn.Parameter]]:
        """After sharded training: the mode's model built afresh (not sharded) with the trained values,
        for the first process to finish alone. The ppl measured before training is kept."""
        fresh = self.prepare(config, device, evaluate=False, progress=False)
        fresh.ppl_before, fresh.fp_ppl = job.ppl_before, job.fp_ppl
        trainable = self.wrap(fresh, config)
        sharding.load_full_state(trainable, trained)
        return fresh, trainable

    def finish(self, job: Job, config: RecoverConfig, staging: Path, label: str) -> dict | None:
        """Write the output into ``staging``; returns the quick ppl after training."""
        unwrap_after_training(job.model)
        ppl_after = _quick_ppl(job.model, job.tokenizer, config, label)
        write_quik_model(job.model, job.tokenizer, staging)
        return ppl_after


class PostMode(RecoveryMode):
    name = "post"


class SalientFtMode(RecoveryMode):
    name = "salient-ft"
    noise_default = False


class PreMode(RecoveryMode):
    name = "pre"
    packed_input = False
    shardable = False  # rebuilding would repeat the salient selection; pre mode runs as ddp

    def quant_config(self, config: RecoverConfig) -> QuantConfig:
        """The scheme used after training: --quant-config, with --bits/--salient overriding it when given."""
        return build_config(QuantConfig, config.quant_config, bits=config.bits, salient=config.salient)

    def default_noise_bits(self, config: RecoverConfig) -> int:
        return self.quant_config(config).bits  # noise at the target bit-width

    def check_input(self, config: RecoverConfig) -> None:
        super().check_input(config)
        scheme = self.quant_config(config)  # a bad preset fails here, not after training
        if scheme.target_bpw is not None:
            raise ConfigError("--mode pre trains salient columns it then keeps, and --target-bpw chooses them per "
                              "layer after measuring; quantize with --target-bpw, then recover with --mode post",
                              "quant_config")
        check_source(scheme.calib, "calib")

    def prepare(self, config: RecoverConfig, device: str, evaluate: bool, progress: bool) -> Job:
        scheme = self.quant_config(config)
        model, tokenizer = load_model(config.model, device=device, trust_remote_code=config.trust_remote_code)
        # Refuse unsupported architectures before any work.
        arch.check_supported(model, scheme.targets, scheme.ignore, scheme.quantize_lm_head)
        ppl = _quick_ppl(model, tokenizer, config, model_label(config.model)) if evaluate else None
        calib = calibration_windows(tokenizer, scheme.calib, scheme.nsamples, scheme.seqlen, scheme.seed)
        salient = select_salient_model(model, calib, scheme, progress=progress, device=device)
        return Job(model, tokenizer, ppl, ppl, scheme.to_dict(), source_model=model_reference(config.model),
                   salient=salient, calib=calib, quant_config=scheme)

    def finish(self, job: Job, config: RecoverConfig, staging: Path, label: str) -> dict | None:
        unwrap_after_training(job.model)
        device = str(next(job.model.parameters()).device)
        quantized = quantize_model(job.model, job.calib, job.quant_config, progress=False, device=device)
        ppl_after = _quick_ppl(job.model, job.tokenizer, config, label)
        write_packed(job.model, job.tokenizer, quantized, staging, job.quant_config, source_model=job.source_model)
        write_salient_indices(staging, quantized.salient_indices())
        return ppl_after


class LoraMode(RecoveryMode):
    name = "lora"
    noise_default = False
    value_limit = math.inf  # adapters are saved in fp32: only finiteness is required
    storage = "finite values"
    shardable = False  # a baseline: peft adapters under ddp

    def noise_bits(self, config: RecoverConfig) -> int | None:
        if config.noise:
            raise ConfigError("--mode lora trains adapters without noise; drop --noise", "noise")
        return None

    def wrap(self, job: Job, config: RecoverConfig) -> dict[str, nn.Parameter]:
        job.model = lora_model(job.model, config)
        return {name: p for name, p in job.model.named_parameters() if p.requires_grad}

    def finish(self, job: Job, config: RecoverConfig, staging: Path, label: str) -> dict | None:
        ppl_after = _quick_ppl(job.model, job.tokenizer, config, label)
        from quikft.integrations.peft import save_lora

        save_lora(job.model, staging / "adapter")
        return ppl_after


MODES: dict[str, RecoveryMode] = {mode.name: mode for mode in (PostMode(), SalientFtMode(), PreMode(), LoraMode())}


def lora_model(model: nn.Module, config: RecoverConfig) -> nn.Module:
    """The LoRA baseline: peft adapters on the packed QuikLinear layers (quikft.integrations.peft)."""
    try:
        from quikft.integrations.peft import add_lora
    except ImportError:
        raise ValueError('--mode lora needs peft: pip install -e ".[peft]"') from None
    return add_lora(model, config.lora_rank)


# ------------------------------------------------------------------------------------ the job

def recover(config: RecoverConfig, progress: bool = True) -> dict:
    """Run the whole recovery job for ``config``; returns the report (rank 0) that is also saved."""
    run = plan(config)
    accelerator = _accelerator(cpu=run.device == "cpu")
    # One writer per output: its state and output stay this run's until it ends (or dies).
    lock = OutputLock(run.out_dir, "recover") if accelerator.is_main_process else None
    try:
        return _recover(run, accelerator, progress)
    finally:
        if lock is not None:
            lock.release()


def _recover(run: Run, accelerator, progress: bool) -> dict:
    config = run.config
    main = accelerator.is_main_process
    began = time.perf_counter()
    _seed_everything(config.seed + accelerator.process_index)
    if progress and main:
        tqdm.write(f"recover {config.mode}: compute dtype {run.dtype.name} ({run.dtype.reason}), device {run.device}")
    # Data first: a bad --data should fail in seconds, not after loading and evaluating the model.
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    data = TrainingMixture(tokenizer, config.data, config.seqlen, config.seed)
    job = run.mode.prepare(config, run.device, evaluate=main and config.eval_before, progress=progress and main)
    trainable = run.mode.wrap(job, config)
    teacher = load_teacher(run, job) if config.loss == "kd" else None
    sharded = config.sharding == "fsdp2" and accelerator.num_processes > 1
    if sharded:
        sharding.shard_model(job.model, accelerator.device)
        trainable = {name: p for name, p in job.model.named_parameters() if name in trainable}
    curve = train(run, job, trainable, data, accelerator, teacher, progress and main, sharded)
    # Every process's peak memory during training (before the first one finishes alone).
    peaks = accelerator.gather(torch.tensor([peak_rss_mb()], device=accelerator.device))
    curve["peak_rss_mb_per_process"] = [round(float(v), 1) for v in peaks.cpu()]
    if sharded:  # whole trained tensors, then the first process finishes on a fresh unsharded model
        trained = sharding.full_state(trainable)
        if main:
            job, trainable = run.mode.rebuild(job, config, run.device, trained)
    report = None
    if main:
        report = finish(run, job, trainable, curve, began)
        shutil.rmtree(run.state_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return report


def plan(config: RecoverConfig) -> Run:
    """Every check that needs no model weights, and the run's one-time decisions (mode, device, dtype)."""
    config.validate()
    mode = MODES[config.mode]
    mode.noise_bits(config)  # a contradictory noise setting fails here
    for source in config.data:
        check_source(source)
    mode.check_input(config)
    if config.sharding == "fsdp2" and not mode.shardable:
        raise ConfigError(f"--sharding fsdp2 trains packed checkpoints (--mode post or salient-ft); run --mode "
                          f"{mode.name} with --sharding ddp", "sharding")
    check_seqlen(config.model, config.seqlen, trust_remote_code=config.trust_remote_code)
    out_dir = Path(config.out) if config.out else default_out_dir(config)
    state_dir = state_dir_for(out_dir)
    _check_state(config, state_dir)
    inputs = [resolve_model(config.model), config.teacher and resolve_model(config.teacher)]
    prepare_output(out_dir, REPORT_NAME, config.overwrite, inputs)
    device = resolve_device(config.device)
    return Run(config, mode, device, recover_dtype(config, device), out_dir, state_dir)


def recover_dtype(config: RecoverConfig, device: str) -> DtypeChoice:
    """The autocast dtype: --bf16/--fp32 when given, else --dtype (auto: what the device runs fast)."""
    if config.bf16 is None and config.dtype == "auto":
        return resolve_dtype(config.dtype, device)
    if config.bf16 is None:
        flag, dtype = f"--dtype {config.dtype}", resolve_dtype(config.dtype, device).dtype
    else:
        flag, dtype = ("--bf16", torch.bfloat16) if config.bf16 else ("--fp32", torch.float32)
    return DtypeChoice(dtype, f"{flag} requested; {native_bf16(device)[1]}")


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


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _quick_ppl(model, tokenizer, config: RecoverConfig, label: str) -> dict | None:
    return quick_ppl(model, tokenizer, config.eval_windows, config.eval_stride, config.eval_seqlen, label)


def _fp_ppl_of(config: RecoverConfig) -> dict | None:
    """The FP reference ppl the quantize run recorded, if it used the same evaluation setting."""
    report = Path(resolve_model(config.model)) / "quantize_report.json"
    if not report.is_file():
        return None
    fp = json.loads(report.read_text()).get("fp_ppl") or {}
    same = (fp.get("seqlen") == config.eval_seqlen and fp.get("windows") == config.eval_windows
            and fp.get("window_stride") == config.eval_stride)
    return fp if same else None


def teacher_name(run: Run, job: Job) -> str | None:
    """The KD teacher: --teacher, else the full-precision model the input derives from."""
    return run.config.teacher or job.source_model


def load_teacher(run: Run, job: Job) -> nn.Module:
    """The full-precision model for ``--loss kd`` (costs one more model in memory and a forward per step)."""
    name = teacher_name(run, job)
    if name is None:
        raise ValueError(f"--loss kd: {run.config.model} does not record the model it was quantized from; "
                         f"pass --teacher")
    teacher, _ = load_model(name, device=run.device, trust_remote_code=run.config.trust_remote_code,
                            for_training=True)
    return teacher.requires_grad_(False).eval()


def run_settings(run: Run, job: Job | None = None) -> dict:
    """The config as it ran: noise, noise bits and compute dtype resolved (what reports and resume compare)."""
    settings = run.config.to_dict()
    settings["noise_bits"] = run.mode.noise_bits(run.config)
    settings["noise"] = settings["noise_bits"] is not None
    settings["compute_dtype"] = run.dtype.name
    if job is not None and run.config.loss == "kd":
        settings["teacher"] = teacher_name(run, job)
    return settings


# ------------------------------------------------------------------------------------ training

def lr_schedule(optimizer, config: RecoverConfig):
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * config.steps), config.steps)


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


def gradient_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """The total gradient norm, clipping the gradients to ``max_norm`` when it is positive."""
    if max_norm > 0:  # over sharded parameters the norm is a DTensor: as_number gathers it
        return sharding.as_number(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return sharding.as_number(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))


def _diverged(step: int, run: Run, what: str) -> TrainingDivergedError:
    saved = train_state.committed_step(run.state_dir) if run.state_dir.is_dir() else None
    kept = f"; the last resumable state (step {saved}) stays in {run.state_dir}" if saved else ""
    return TrainingDivergedError(f"step {step} of {run.config.steps}: {what}; training stopped, no output "
                                 f"written. The learning rate (--lr {run.config.lr:g}) is the likely cause: "
                                 f"lower it{kept}")


def train(run: Run, job: Job, trainable: dict[str, nn.Parameter], data: TrainingMixture, accelerator, teacher,
          progress: bool, sharded: bool = False) -> dict:
    """The optimisation loop; returns the loss curve and timing. ``sharded``: the model is FSDP2-sharded
    (:mod:`quikft.sharding`) instead of a DDP replica."""
    config, model = run.config, job.model
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % world:
        raise ValueError(f"--batch-size {config.batch_size} must be a multiple of the {world} processes")
    params = list(trainable.values())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = lr_schedule(optimizer, config)
    settings = run_settings(run, job)
    curve = {"loss_curve": [], "eval_curve": [], "step_seconds": [], "processes": world}
    start = (_resume(run, settings, world, rank, trainable, optimizer, scheduler, curve, model if sharded else None)
             if config.resume else 0)
    if config.gradient_checkpointing:
        set_activation_checkpointing(model, True)
    # FSDP2 gathers the embedding and head only inside the whole model's forward: sharded runs take
    # the loss from the model's logits instead of splitting decoder and head.
    objective = TrainingObjective(model, run.dtype.dtype, data.batch([0])["input_ids"].to(accelerator.device),
                                  teacher, config.kd_temperature, split_head=not sharded)
    model.train()
    wrapped = objective if sharded else accelerator.prepare_model(objective)
    tokens_per_step = config.batch_size * config.grad_accum * config.seqlen
    bar = tqdm(range(start, config.steps), desc=f"recover {config.mode}", disable=not progress, unit="step",
               initial=start, total=config.steps)
    for step in bar:
        t0 = time.perf_counter()
        count = max(step_label_count(data, step, config), 1)
        loss_sum = torch.zeros((), device=accelerator.device)
        for micro in range(config.grad_accum):
            batch = data.batch(batch_rows(step, micro, config, rank, world))
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            sync = micro == config.grad_accum - 1
            with _gradient_sync(model if sharded else wrapped, sync, sharded, accelerator):
                summed = wrapped(input_ids=batch["input_ids"], labels=batch["labels"])
                # Data parallel averages gradients over processes: scale by their number to get the sum.
                accelerator.backward(summed * (world / count))
            loss_sum = loss_sum + summed.detach().float()
        loss_value = accelerator.reduce(loss_sum.reshape(1), reduction="sum").item() / count
        norm = gradient_norm(params, config.max_grad_norm)
        if not math.isfinite(loss_value):
            raise _diverged(step + 1, run, f"the training loss is {loss_value}")
        if not math.isfinite(norm):
            raise _diverged(step + 1, run, f"the gradient norm is {norm}")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        peak = sharding.max_abs(params)
        if not peak <= run.mode.value_limit:  # also NaN; checked before anything is saved
            raise _diverged(step + 1, run, f"the trained columns reach {peak:g}, beyond {run.mode.storage}")
        seconds = time.perf_counter() - t0
        curve["step_seconds"].append(seconds)
        curve["loss_curve"].append({"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": norm,
                                    "tokens_per_s": tokens_per_step / seconds})
        bar.set_postfix({"loss": f"{loss_value:.4f}", "lr": f"{lr:.2e}", "tok/s": f"{tokens_per_step / seconds:.0f}"})
        if accelerator.is_main_process:
            train_state.append_log(run.state_dir, curve["loss_curve"][-1], fresh=step == 0)
        # A sharded model's forward needs every process: then all of them evaluate.
        if config.eval_every and (step + 1) % config.eval_every == 0 and (accelerator.is_main_process or sharded):
            ppl = _quick_ppl(model, job.tokenizer, config, f"step {step + 1}")
            curve["eval_curve"].append({"step": step + 1, "ppl": ppl["ppl"] if ppl else None})
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
            _save_state(run, step + 1, settings, trainable, optimizer, scheduler, curve, accelerator,
                        model if sharded else None)
    if config.gradient_checkpointing:
        set_activation_checkpointing(model, False)
    model.eval()
    return curve


def _gradient_sync(wrapped, sync: bool, sharded: bool, accelerator):
    """No gradient exchange on micro-batches before the last (gradient accumulation)."""
    if sharded:
        return sharding.gradient_sync(wrapped, sync)
    return contextlib.nullcontext() if sync else accelerator.no_sync(wrapped)


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


# ------------------------------------------------------------------------------------ resume

def _check_state(config: RecoverConfig, state_dir: Path) -> None:
    saved = train_state.committed_step(state_dir) if state_dir.is_dir() else None
    if saved is not None and not config.resume:
        raise FileExistsError(f"{state_dir} holds the state of an interrupted run (step {saved}); pass --resume to "
                              f"continue it or delete that directory to start over")
    if config.resume and saved is None:
        raise FileNotFoundError(f"--resume: no training state at {state_dir} (it is written every --save-every "
                                f"steps); run without --resume to start")


def _save_state(run: Run, step: int, settings: dict, trainable: dict[str, nn.Parameter], optimizer, scheduler,
                curve: dict, accelerator, sharded_model: nn.Module | None = None) -> None:
    """Every rank's RNG into a fresh step directory, then rank 0's tensors, JSON and the commit.

    A sharded model's tensors and optimizer state are gathered whole first (every process takes
    part), so the state has the same layout whatever the sharding and number of processes."""
    if sharded_model is not None:
        tensors = sharding.full_state(trainable)
        optimizer_state = sharding.full_optimizer_state(sharded_model, optimizer, list(trainable))
    else:
        tensors, optimizer_state = trainable, optimizer.state_dict()
    directory = train_state.step_dir(run.state_dir, step)
    if accelerator.is_main_process:
        train_state.begin_save(run.state_dir, step)
    accelerator.wait_for_everyone()
    train_state.save_rng(directory, accelerator.process_index)
    accelerator.wait_for_everyone()  # every rank's RNG is on disk before the commit that points at them
    if accelerator.is_main_process:
        train_state.save_state(directory, step, settings, accelerator.num_processes, tensors, optimizer_state,
                               scheduler, curve)
    accelerator.wait_for_everyone()


def _resume(run: Run, settings: dict, world: int, rank: int, trainable: dict[str, nn.Parameter], optimizer,
            scheduler, curve: dict, sharded_model: nn.Module | None = None) -> int:
    state = train_state.load_state(run.state_dir)
    changed = [k for k in TRAJECTORY_KEYS if state.settings.get(k) != settings.get(k)]
    if changed:
        raise ValueError(f"--resume: the saved run used different {', '.join(changed)} "
                         f"({', '.join(f'{k}={state.settings.get(k)!r}' for k in changed)}); use the same settings")
    if state.world != world:
        raise ValueError(f"--resume: the saved run used {state.world} processes, this one {world}; use the same")
    if sharded_model is not None:
        train_state.check_trainable(state, trainable)
        sharding.load_full_state(trainable, state.trainable)
        sharding.load_full_optimizer_state(sharded_model, optimizer, list(trainable), state.optimizer)
        scheduler.load_state_dict(state.scheduler)
    else:
        train_state.restore(state, trainable, optimizer, scheduler)
    curve.update(state.curve)
    train_state.load_rng(run.state_dir, rank)
    if rank == 0:
        train_state.rewrite_log(run.state_dir, curve["loss_curve"])
    return state.step


# ------------------------------------------------------------------------------------ output

def finish(run: Run, job: Job, trainable: dict[str, nn.Parameter], curve: dict, began: float) -> dict:
    """Put the trained columns back, quantize (pre), evaluate, and write the output atomically."""
    config = run.config
    trainable_params = sum(p.numel() for p in trainable.values())
    with atomic_directory(run.out_dir, overwrite=config.overwrite, marker=REPORT_NAME) as staging:
        ppl_after = run.mode.finish(job, config, staging, str(run.out_dir))
        report = build_report(run, job, curve, ppl_after, trainable_params, time.perf_counter() - began,
                              bits_per_weight(staging))
        write_json(staging / REPORT_NAME, report)
    report["out"] = str(run.out_dir)
    return report


def bits_per_weight(output: Path) -> dict | None:
    """``{"linear", "model"}`` bits per weight of a packed output, counted from its files (quikft.bits);
    None for a LoRA baseline, whose fp32 adapter is stored apart from the packed base."""
    return stored_bits(output).to_dict() if is_packed_checkpoint(output) else None


def build_report(run: Run, job: Job, curve: dict, ppl_after: dict | None, trainable_params: int,
                 seconds: float, bits: dict | None = None) -> dict:
    config = run.config
    steps = curve["step_seconds"]
    # The first step includes one-off costs (allocations, caches): leave it out of the mean if we can.
    typical = steps[1:] or steps
    step_seconds = sum(typical) / len(typical) if typical else None
    return {
        "job": "recover",
        "config": run_settings(run, job),
        # What the output is quantized to (post modes: the input checkpoint's).
        "bits": job.quantization.get("bits"),
        "salient": job.quantization.get("salient"),
        "bits_per_weight": bits,
        "source_model": job.source_model,
        "device": run.device,
        "compute_dtype": run.dtype.to_dict(),
        "fp_ppl": job.fp_ppl,
        "ppl_before": job.ppl_before,
        "ppl_after": ppl_after,
        "trainable_params": trainable_params,
        "processes": curve["processes"],  # data-parallel processes; batch_size is their sum
        "step_seconds": step_seconds,
        "train_seconds": sum(steps),
        "tokens_per_s": config.batch_size * config.grad_accum * config.seqlen / step_seconds if step_seconds else None,
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_mb_per_process": curve.get("peak_rss_mb_per_process"),  # during training
        "sharding": config.sharding if curve["processes"] > 1 else None,
        "loss_curve": curve["loss_curve"],
        "eval_curve": curve["eval_curve"],
        "versions": library_versions(),
        "threads": torch.get_num_threads(),
    }
