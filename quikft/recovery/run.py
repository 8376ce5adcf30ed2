"""The decisions a recovery run makes once, before any model weights are read: its mode, device,
compute dtype and directories, after every check that needs no weights (:func:`plan`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from quikft.atomic import prepare_output
from quikft.data import check_source
from quikft.hardware import DtypeChoice, native_bf16, resolve_device, resolve_dtype
from quikft.models import check_seqlen, model_label, resolve_model
from quikft.recovery import state
from quikft.recovery.config import RecoverConfig
from quikft.recovery.modes import MODES, RecoveryMode

REPORT_NAME = "recover_report.json"


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


def plan(config: RecoverConfig) -> Run:
    """Every check that needs no model weights, and the run's one-time decisions (mode, device, dtype)."""
    config.validate()
    mode = MODES[config.mode]
    for source in config.data:
        check_source(source)
    mode.check(config)
    check_seqlen(config.model, config.seqlen, trust_remote_code=config.trust_remote_code)
    out_dir = Path(config.out) if config.out else default_out_dir(config)
    state_dir = state_dir_for(out_dir)
    check_state_dir(config, state_dir)
    inputs = [resolve_model(config.model), config.teacher and resolve_model(config.teacher)]
    prepare_output(out_dir, REPORT_NAME, config.overwrite, inputs)
    device = resolve_device(config.device)
    return Run(config, mode, device, recover_dtype(config, device), out_dir, state_dir)


def check_state_dir(config: RecoverConfig, state_dir: Path) -> None:
    """A saved state is resumed only on --resume, and --resume needs one."""
    saved = state.committed_step(state_dir) if state_dir.is_dir() else None
    if saved is not None and not config.resume:
        raise FileExistsError(f"{state_dir} holds the state of an interrupted run (step {saved}); pass --resume to "
                              f"continue it or delete that directory to start over")
    if config.resume and saved is None:
        raise FileNotFoundError(f"--resume: no training state at {state_dir} (it is written every --save-every "
                                f"steps); run without --resume to start")


def recover_dtype(config: RecoverConfig, device: str) -> DtypeChoice:
    """The autocast dtype: --bf16/--fp32 when given, else --dtype (auto: what the device runs fast)."""
    if config.bf16 is None and config.dtype == "auto":
        return resolve_dtype(config.dtype, device)
    if config.bf16 is None:
        flag, dtype = f"--dtype {config.dtype}", resolve_dtype(config.dtype, device).dtype
    else:
        flag, dtype = ("--bf16", torch.bfloat16) if config.bf16 else ("--fp32", torch.float32)
    return DtypeChoice(dtype, f"{flag} requested; {native_bf16(device)[1]}")
