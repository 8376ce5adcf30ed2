"""``RecoverConfig``: the settings of one ``quikft recover`` run.

The settings are flat, with one set of names for the CLI flags, the YAML presets
(``configs/gift-sw*.yaml``), the resumable state and ``recover_report.json``. The names of the
choices come from the code that implements them: ``mode`` from the registry of
:mod:`quikft.recovery.modes`, ``loss`` from :class:`~quikft.recovery.loss.Loss`, ``sharding`` from
:class:`~quikft.recovery.sharding.Sharding`. Settings that only some modes read are marked below;
the checks that need the mode (its noise, its kind of input, its scheme, whether it shards) are the
mode's own (:meth:`~quikft.recovery.modes.RecoveryMode.check`), run by :func:`quikft.recovery.run.plan`
before anything is loaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from quikft.config import ConfigError, check_bits, check_settings, parse_salient
from quikft.recovery.loss import Loss
from quikft.recovery.modes import MODES
from quikft.recovery.sharding import Sharding

RECOVER_DTYPES = ("auto", "bf16", "fp32")  # the autocast dtype of the frozen weights' GEMMs (--dtype)


@dataclass
class RecoverConfig:
    """GIFT-SW recovery (the README's "Recover (GIFT-SW)"). Optimiser defaults are the paper's
    (AdamW, weight decay 0, lr 1e-4, cosine with 3% warmup); the step budget is sized for a CPU (the
    paper: 500 steps of batch 128, see configs/gift-sw-paper.yaml). ``None`` means "decided by the
    mode or the preset"."""

    model: str | None = None  # post/salient-ft/lora: a packed checkpoint; pre: a full-precision model
    mode: str = "post"  # a name in quikft.recovery.modes.MODES
    # GIFT-SW modes: the noise on the frozen weights
    noise: bool | None = None  # None: on for post/pre, off for salient-ft
    noise_bits: int | None = None  # None: 4 in post mode (paper §6.3), the target bits in pre mode
    # pre mode: the scheme it quantizes to after training
    bits: int | None = None  # quantize to this many bits after training [quant_config's, else 3]
    # salient columns per linear, a count or a fraction [quant_config's, else 128]
    salient: int | float | None = field(default=None, metadata={"parse": parse_salient})
    quant_config: str | None = None  # a quantize YAML preset (bits/salient above override it)
    # data and loss
    data: tuple[str, ...] = ("alpaca", "c4")  # names or paths; several = a round-robin mixture
    loss: str = "ce"  # ce | kd (KL to the full-precision teacher's logits): quikft.recovery.loss.Loss
    teacher: str | None = None  # kd teacher; None = the model the checkpoint was quantized from
    kd_temperature: float = 1.0
    # optimisation
    steps: int = 100
    batch_size: int = 4  # rows per optimizer step and micro-batch, summed over processes
    grad_accum: int = 1
    seqlen: int = 512
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    dtype: str = "auto"  # autocast dtype of the frozen weights' GEMMs: auto (quikft.hardware) | bf16 | fp32
    bf16: bool | None = None  # --bf16/--fp32: an explicit choice that wins over dtype
    gradient_checkpointing: bool = False
    cache_base: bool = True  # post modes: keep the dequantized frozen weights (memory for speed)
    lora_rank: int = 64  # lora mode; 64 matches k=128's trainable parameters on SmolLM2-135M
    seed: int = 0
    # evaluation and resumable state
    eval_every: int = 0  # quick ppl every N steps (0: only before and after)
    save_every: int = 0  # resumable training state every N steps (0: never)
    resume: bool = False
    eval_windows: int = 4
    eval_stride: int = 8
    eval_seqlen: int = 2048
    eval_before: bool = True  # also measure the input's ppl (skip when it is already known)
    # where it runs and writes
    device: str = "auto"  # auto: cuda when present, else cpu
    sharding: str = "ddp"  # several processes: quikft.recovery.sharding.Sharding
    out: str | None = None
    overwrite: bool = False  # replace a previous recover output at --out
    trust_remote_code: bool = False  # run a hub model's own Python code (only for models you trust)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        choices = {"mode": tuple(MODES), "loss": tuple(loss.value for loss in Loss), "dtype": RECOVER_DTYPES,
                   "sharding": tuple(choice.value for choice in Sharding)}
        check_settings(self, choices,
                       positive=("steps", "batch_size", "grad_accum", "seqlen", "lora_rank", "eval_stride",
                                 "eval_seqlen", "kd_temperature"),
                       non_negative=("lr", "weight_decay", "max_grad_norm", "eval_every", "save_every",
                                     "eval_windows"))
        for name in ("bits", "noise_bits"):
            if getattr(self, name) is not None:
                check_bits(getattr(self, name), name)
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio must lie in [0, 1) (got {self.warmup_ratio})", "warmup_ratio")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["data"] = list(self.data)
        return out
