"""The ``quikft recover`` job: GIFT-SW recovery fine-tuning (SPEC §5).

``recover(config)`` is what the CLI calls; it is equally usable from Python.

- ``post``: a packed checkpoint in, its salient columns trained while step-scaled noise
  (4-bit Δ by default) perturbs the frozen quantized rest, the same checkpoint out with new
  salient columns; the integer codes are untouched.
- ``salient-ft``: ``post`` without noise (the paper's ablation).
- ``pre``: a full-precision model in; salient columns chosen on calibration data, trained
  with noise at the target bit-width, then the model is quantized keeping those columns.
- ``lora``: a LoRA baseline (peft) on the quantized model, for comparison only.

Only the salient slices (``GiftLinear.salient_weight``) are parameters with gradients and
optimizer state. Runs under ``accelerate launch`` as data parallel (each process takes
different rows of every batch); rank 0 evaluates and saves. ``save_every`` writes a
resumable state (trainable tensors, optimizer, scheduler, every rank's RNG; the data
position is the step, since rows are a function of their index), so a resumed run ends with
the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from quikft.atomic import atomic_directory, write_json
from quikft.checkpoint import is_packed_checkpoint, read_quantization_config, write_packed, write_quik_model
from quikft.config import QuantConfig, RecoverConfig, build_config
from quikft.data import calibration_windows
from quikft.eval.ppl import evaluate_ppl
from quikft.models import load_model, load_tokenizer, model_label, resolve_model
from quikft.nn.gift_linear import gift_layers, unwrap_after_training, wrap_for_training
from quikft.nn.quik_linear import QuikLinear
from quikft.quant.pipeline import linear_names, quantize_model, select_salient_model
from quikft.runinfo import library_versions, peak_rss_mb
from quikft.train_data import IGNORE, TrainingMixture

REPORT_NAME = "recover_report.json"
STATE_NAME = "training_state.pt"
LOG_NAME = "log.jsonl"
# Settings that change the training trajectory: a resumed run must match them.
TRAJECTORY_KEYS = ("model", "mode", "noise", "noise_bits", "bits", "salient", "data", "loss", "steps",
                   "batch_size", "grad_accum", "seqlen", "lr", "weight_decay", "warmup_ratio",
                   "max_grad_norm", "bf16", "lora_rank", "seed")


@dataclass
class Job:
    """What a mode prepared: the model to train and what finishing needs."""

    model: nn.Module
    tokenizer: object
    ppl_before: dict | None
    fp_ppl: dict | None
    quantization: dict = field(default_factory=dict)  # the output's quantize settings (bits, salient, ...)
    salient: dict[str, torch.Tensor] = field(default_factory=dict)  # pre mode
    calib: torch.Tensor | None = None  # pre mode: re-used to quantize after training
    quant_config: QuantConfig | None = None


def default_out_dir(config: RecoverConfig) -> Path:
    return Path("runs") / f"{model_label(config.model)}-{config.mode}"


def state_dir_for(out_dir: Path) -> Path:
    """Where the resumable training state lives: beside the output, which appears only at the end."""
    return out_dir.with_name(f"{out_dir.name}.train-state")


# ------------------------------------------------------------------------------------ the job

def recover(config: RecoverConfig, progress: bool = True) -> dict:
    """Run the whole recovery job for ``config``; returns the report (rank 0) that is also saved."""
    config.validate()
    accelerator = _accelerator(cpu=config.device == "cpu")
    main = accelerator.is_main_process
    out_dir = Path(config.out) if config.out else default_out_dir(config)
    state_dir = state_dir_for(out_dir)
    _check_state(config, state_dir)
    began = time.perf_counter()
    _seed_everything(config.seed + accelerator.process_index)
    # Data first: a bad --data should fail in seconds, not after loading and evaluating the model.
    data = TrainingMixture(load_tokenizer(config.model), config.data, config.seqlen, config.seed)
    job = prepare(config, evaluate=main and config.eval_before, progress=progress and main)
    trainable = attach_trainable(job, config)
    teacher = load_teacher(config) if config.loss == "kd" else None
    curve = train(job.model, job.tokenizer, trainable, data, config, accelerator, teacher, state_dir,
                  progress and main)
    report = None
    if main:
        report = finish(job, config, out_dir, curve, began)
        shutil.rmtree(state_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
    return report


def _accelerator(cpu: bool):
    from accelerate import Accelerator, DistributedDataParallelKwargs

    # cpu=True makes a multi-process launch (accelerate launch --multi_gpu, torchrun) use gloo on CPU.
    # Buffers (packed codes, frozen weights) never change: do not re-broadcast them every forward.
    return Accelerator(cpu=cpu, kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def quick_ppl(model, tokenizer, config: RecoverConfig, label: str) -> dict | None:
    if config.eval_windows == 0:
        return None
    was_training = model.training
    model.eval()  # no noise in evaluation
    result = evaluate_ppl(model, tokenizer, "wikitext2", config.eval_seqlen, config.eval_windows,
                          config.eval_stride, model_name=label).to_dict()
    model.train(was_training)
    return result


def prepare(config: RecoverConfig, evaluate: bool = True, progress: bool = True) -> Job:
    """Load the input for the mode and measure its ppl (before any training)."""
    packed = is_packed_checkpoint(resolve_model(config.model))
    if config.mode == "pre":
        if packed:
            raise ValueError(f"--mode pre trains a full-precision model, but {config.model} is a packed "
                             f"checkpoint; pass the FP model, or use --mode post")
        return _prepare_pre(config, evaluate, progress)
    if not packed:
        raise ValueError(f"--mode {config.mode} needs a packed checkpoint from `quikft quantize` as --model "
                         f"(got {config.model or 'the default FP model'}); or use --mode pre")
    model, tokenizer = load_model(config.model, device=config.device)
    ppl = quick_ppl(model, tokenizer, config, str(config.model)) if evaluate else None
    return Job(model, tokenizer, ppl, _fp_ppl_of(config), dict(model.config.quantization_config))


def _prepare_pre(config: RecoverConfig, evaluate: bool, progress: bool) -> Job:
    quant_config = build_config(QuantConfig, config.quant_config, model=config.model, bits=config.bits,
                                salient=config.salient, seed=config.seed, device=config.device,
                                eval_windows=config.eval_windows, eval_stride=config.eval_stride,
                                eval_seqlen=config.eval_seqlen)
    model, tokenizer = load_model(config.model, device=config.device)
    linear_names(model)  # refuse unsupported architectures before any work
    ppl = quick_ppl(model, tokenizer, config, model_label(config.model)) if evaluate else None
    calib = calibration_windows(tokenizer, quant_config.calib, quant_config.nsamples, quant_config.seqlen,
                                quant_config.seed)
    salient = select_salient_model(model, calib, quant_config, progress=progress)
    return Job(model, tokenizer, ppl, ppl, quant_config.to_dict(), salient, calib, quant_config)


def _fp_ppl_of(config: RecoverConfig) -> dict | None:
    """The FP reference ppl the quantize run recorded, if it used the same evaluation setting."""
    report = Path(resolve_model(config.model)) / "quantize_report.json"
    if not report.is_file():
        return None
    fp = json.loads(report.read_text()).get("fp_ppl") or {}
    same = (fp.get("seqlen") == config.eval_seqlen and fp.get("windows") == config.eval_windows
            and fp.get("window_stride") == config.eval_stride)
    return fp if same else None


def attach_trainable(job: Job, config: RecoverConfig) -> list[nn.Parameter]:
    """Make the mode's layers trainable; everything else is frozen. Returns the trainable parameters."""
    if config.mode == "lora":
        job.model = lora_model(job.model, config)
        return [p for p in job.model.parameters() if p.requires_grad]
    layers = wrap_for_training(job.model, config.effective_noise_bits, job.salient or None,
                               cache_base=config.cache_base)
    return [layer.salient_weight for layer in layers.values()]


def lora_model(model: nn.Module, config: RecoverConfig) -> nn.Module:
    """The LoRA baseline: the quantized weights as frozen float linears plus peft adapters."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError('--mode lora needs peft: pip install -e ".[peft]"') from None
    model.requires_grad_(False)
    targets = set()
    for name, module in list(model.named_modules()):
        if isinstance(module, QuikLinear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight = nn.Parameter(module.effective_weight(), requires_grad=False)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.clone(), requires_grad=False)
            model.set_submodule(name, linear)
            targets.add(name.rsplit(".", 1)[-1])
    lora = LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, lora_dropout=0.0,
                      target_modules=sorted(targets), bias="none")
    return get_peft_model(model, lora)


def load_teacher(config: RecoverConfig) -> nn.Module:
    """The full-precision model for ``--loss kd`` (costs one more model in memory and a forward per step)."""
    name = config.teacher
    if name is None and config.mode != "pre":
        name = read_quantization_config(resolve_model(config.model)).get("settings", {}).get("model")
    elif name is None:
        name = config.model
    teacher, _ = load_model(name, device=config.device)
    return teacher.requires_grad_(False).eval()


# ------------------------------------------------------------------------------------ training

def lr_schedule(optimizer, config: RecoverConfig):
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * config.steps), config.steps)


def batch_rows(step: int, micro: int, config: RecoverConfig, rank: int, world: int) -> list[int]:
    """This process's row indices of one micro-batch (disjoint across processes)."""
    first = (step * config.grad_accum + micro) * config.batch_size
    return list(range(first + rank, first + config.batch_size, world))


def training_loss(model, batch: dict, config: RecoverConfig, teacher: nn.Module | None) -> torch.Tensor:
    """Mean cross-entropy over labelled tokens, or the KL divergence to the teacher on them."""
    autocast = torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=config.bf16)
    with autocast:
        if teacher is None:
            return model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
    return kd_loss(logits, teacher, batch, config.kd_temperature)


def kd_loss(logits: torch.Tensor, teacher: nn.Module, batch: dict, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per labelled position, at ``temperature`` (scaled by T² as usual)."""
    keep = batch["labels"][:, 1:] != IGNORE
    with torch.no_grad():
        target = teacher(input_ids=batch["input_ids"], use_cache=False).logits[:, :-1][keep].float()
    student = logits[:, :-1][keep].float()
    return F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(target / temperature, -1),
                    log_target=True, reduction="batchmean") * temperature ** 2


def train(model, tokenizer, trainable: list[nn.Parameter], data: TrainingMixture, config: RecoverConfig,
          accelerator, teacher, state_dir: Path, progress: bool) -> dict:
    """The optimisation loop; returns the loss curve and timing."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if config.batch_size % world:
        raise ValueError(f"--batch-size {config.batch_size} must be a multiple of the {world} processes")
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = lr_schedule(optimizer, config)
    names = _trainable_names(model, trainable)
    curve = {"loss_curve": [], "eval_curve": [], "step_seconds": [], "processes": world}
    start = _resume(config, state_dir, trainable, names, optimizer, scheduler, curve, rank) if config.resume else 0
    if config.gradient_checkpointing:
        set_activation_checkpointing(model, True)
    model.train()
    wrapped = accelerator.prepare_model(model)
    tokens_per_step = config.batch_size * config.grad_accum * config.seqlen
    bar = tqdm(range(start, config.steps), desc=f"recover {config.mode}", disable=not progress, unit="step",
               initial=start, total=config.steps)
    for step in bar:
        t0 = time.perf_counter()
        loss_sum = 0.0
        for micro in range(config.grad_accum):
            batch = data.batch(batch_rows(step, micro, config, rank, world))
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            sync = micro == config.grad_accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(wrapped):
                loss = training_loss(wrapped, batch, config, teacher) / config.grad_accum
                accelerator.backward(loss)
            loss_sum += loss.detach().float()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = accelerator.reduce(loss_sum.reshape(1), reduction="mean").item()
        seconds = time.perf_counter() - t0
        curve["step_seconds"].append(seconds)
        curve["loss_curve"].append({"step": step + 1, "loss": loss_value, "lr": lr,
                                    "tokens_per_s": tokens_per_step / seconds})
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / seconds:.0f}")
        if accelerator.is_main_process:
            _log_step(state_dir, curve["loss_curve"][-1], fresh=step == 0)
        if config.eval_every and (step + 1) % config.eval_every == 0 and accelerator.is_main_process:
            ppl = quick_ppl(model, tokenizer, config, f"step {step + 1}")
            curve["eval_curve"].append({"step": step + 1, "ppl": ppl["ppl"] if ppl else None})
        if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < config.steps:
            _save_state(config, state_dir, step + 1, trainable, names, optimizer, scheduler, curve, accelerator)
    if config.gradient_checkpointing:
        set_activation_checkpointing(model, False)
    model.eval()
    return curve


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


def _trainable_names(model, trainable: list[nn.Parameter]) -> list[str]:
    ids = {id(p): name for name, p in model.named_parameters()}
    return [ids[id(p)] for p in trainable]


# ------------------------------------------------------------------------------------ resume

def _check_state(config: RecoverConfig, state_dir: Path) -> None:
    if (state_dir / STATE_NAME).exists() and not config.resume:
        raise FileExistsError(f"{state_dir} holds the state of an interrupted run; pass --resume to continue it "
                              f"or delete that directory to start over")
    if config.resume and not (state_dir / STATE_NAME).exists():
        raise FileNotFoundError(f"--resume: no training state at {state_dir} (it is written every --save-every steps)")


def _log_step(state_dir: Path, entry: dict, fresh: bool) -> None:
    """Append one step to ``log.jsonl`` beside the training state, so a crash keeps the curve so far."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / LOG_NAME, "w" if fresh else "a") as log:
        log.write(json.dumps(entry) + "\n")


def _atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _save_state(config, state_dir: Path, step: int, trainable, names, optimizer, scheduler, curve,
                accelerator) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    _atomic_torch_save(rng, state_dir / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()  # every rank's RNG is on disk before the state that points at them
    if accelerator.is_main_process:
        _atomic_torch_save({"step": step, "config": config.to_dict(), "world": accelerator.num_processes,
                            "trainable": {n: p.detach().cpu().clone() for n, p in zip(names, trainable, strict=True)},
                            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "curve": curve}, state_dir / STATE_NAME)
    accelerator.wait_for_everyone()


def _resume(config, state_dir: Path, trainable, names, optimizer, scheduler, curve, rank: int) -> int:
    state = torch.load(state_dir / STATE_NAME, weights_only=False)
    saved, now = state["config"], config.to_dict()
    changed = [k for k in TRAJECTORY_KEYS if saved.get(k) != now.get(k)]
    if changed:
        raise ValueError(f"--resume: the saved run used different {', '.join(changed)} "
                         f"({', '.join(f'{k}={saved.get(k)!r}' for k in changed)}); use the same settings")
    with torch.no_grad():
        for name, param in zip(names, trainable, strict=True):
            param.copy_(state["trainable"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    curve.update(state["curve"])
    rng = torch.load(state_dir / f"rng-{rank}.pt", weights_only=False)
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state["step"]


# ------------------------------------------------------------------------------------ output

def finish(job: Job, config: RecoverConfig, out_dir: Path, curve: dict, began: float) -> dict:
    """Put the trained columns back, quantize (pre), evaluate, and write the output atomically."""
    model = job.model
    trainable_params = _count_trainable(model, config)
    with atomic_directory(out_dir, overwrite=True) as staging:
        if config.mode == "lora":
            ppl_after = quick_ppl(model, job.tokenizer, config, str(out_dir))
            model.save_pretrained(staging / "adapter")
        elif config.mode == "pre":
            unwrap_after_training(model)
            quantized = quantize_model(model, job.calib, job.quant_config)
            ppl_after = quick_ppl(model, job.tokenizer, config, str(out_dir))
            write_packed(model, job.tokenizer, quantized, staging, job.quant_config)
            save_file({n: t.contiguous() for n, t in quantized.salient_indices().items()},
                      staging / "salient_indices.safetensors")
        else:
            unwrap_after_training(model)
            ppl_after = quick_ppl(model, job.tokenizer, config, str(out_dir))
            write_quik_model(model, job.tokenizer, staging)
        report = build_report(config, job, curve, ppl_after, trainable_params, time.perf_counter() - began)
        write_json(staging / REPORT_NAME, report)
    report["out"] = str(out_dir)
    return report


def _count_trainable(model, config: RecoverConfig) -> int:
    if config.mode == "lora":
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    return sum(layer.salient_weight.numel() for layer in gift_layers(model).values())


def build_report(config: RecoverConfig, job: Job, curve: dict, ppl_after: dict | None, trainable_params: int,
                 seconds: float) -> dict:
    steps = curve["step_seconds"]
    # The first step includes one-off costs (allocations, caches): leave it out of the mean if we can.
    typical = steps[1:] or steps
    step_seconds = sum(typical) / len(typical) if typical else None
    return {
        "job": "recover",
        "config": config.to_dict(),
        # What the output is quantized to (post modes: the input checkpoint's; config.bits is pre-only).
        "bits": job.quantization.get("bits"),
        "salient": job.quantization.get("salient"),
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
        "loss_curve": curve["loss_curve"],
        "eval_curve": curve["eval_curve"],
        "versions": library_versions(),
    }
