"""Run configurations as dataclasses: one set of names for the CLI flags, the YAML presets in
``configs/`` and the saved checkpoint/report.

Defaults follow the paper (GIFT-SW, 128 salient columns, ``gift`` metric) and GPTQ (asymmetric,
group 128, act-order, 1% damping). Calibration defaults (128 windows of 512 C4 tokens) are
chosen so the default run finishes in minutes on a laptop-class CPU; the paper's setting is
``nsamples=128, seqlen=2048``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from quikft.quant.grid import check_bits

METHODS = ("gptq", "rtn")
REST_DTYPES = ("bf16", "fp16", "fp32")
RECOVER_MODES = ("post", "pre", "salient-ft", "lora")
LOSSES = ("ce", "kd")


@dataclass
class QuantConfig:
    model: str | None = None  # alias, hub id or directory; None = the embedded default model
    bits: int = 3
    salient: int = 128  # k FP16 input columns per linear layer (capped at in_features - 1)
    metric: str = "gift"  # gift | quik | owq | wanda | custom (with tau/rho/gamma)
    tau: float | None = None
    rho: float | None = None
    gamma: float | None = None
    method: str = "gptq"  # gptq | rtn
    group_size: int = 128  # -1 = one scale per output row
    sym: bool = False
    act_order: bool = True
    clip_search: bool = True  # the 80-candidate clipping search of SPEC §3
    percdamp: float = 0.01
    block_size: int = 128
    calib: str = "c4"  # dataset name or file path
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8  # calibration sequences per block forward
    device: str = "cpu"
    out: str | None = None
    fake_quant: bool = False  # save dequantized float weights (debugging) instead of the packed checkpoint
    dtype_rest: str = "bf16"  # dtype of the unquantized tensors (embeddings, norms, an untied head) when saved
    eval_windows: int = 4  # quick ppl on the first N windows of the stride-8 WikiText-2 subset (0: none)
    eval_stride: int = 8
    eval_seqlen: int = 2048

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """One-line errors for settings that cannot work, raised before anything is written."""
        check_bits(self.bits)
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.group_size == 0 or self.group_size < -1:
            raise ValueError(f"group size {self.group_size} is invalid; use a positive size such as 128, "
                             f"or -1 for one scale per row")
        if self.salient < 0:
            raise ValueError(f"--salient must be >= 0 (got {self.salient})")
        for name in ("nsamples", "seqlen", "batch_size", "block_size", "eval_stride", "eval_seqlen"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive (got {getattr(self, name)})")
        if self.eval_windows < 0:
            raise ValueError(f"eval_windows must be >= 0 (got {self.eval_windows})")
        if self.dtype_rest not in REST_DTYPES:
            raise ValueError(f"dtype_rest {self.dtype_rest!r} is not one of {', '.join(REST_DTYPES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class RecoverConfig:
    """GIFT-SW recovery (SPEC §5). Optimiser defaults are the paper's (AdamW, weight decay 0, lr 1e-4,
    cosine with 3% warmup); the step budget is sized for a CPU (the paper: 500 steps of batch 128,
    see configs/gift-sw-paper.yaml)."""

    model: str | None = None  # post/salient-ft/lora: a packed checkpoint; pre: a full-precision model
    mode: str = "post"  # post | pre | salient-ft | lora (a LoRA baseline on the quantized model)
    noise: bool | None = None  # None: on for post/pre, off for salient-ft
    noise_bits: int | None = None  # None: 4 in post mode (paper §6.3), the target --bits in pre mode
    bits: int = 3  # pre mode: quantize to this many bits after training
    salient: int = 128  # pre mode: salient columns per linear
    quant_config: str | None = None  # pre mode: a quantize YAML preset (bits/salient above override it)
    data: tuple[str, ...] = ("alpaca", "c4")  # names or paths; several = a round-robin mixture
    loss: str = "ce"  # ce | kd (KL to the full-precision teacher's logits)
    teacher: str | None = None  # kd teacher; None = the model the checkpoint was quantized from
    kd_temperature: float = 1.0
    steps: int = 100
    batch_size: int = 4  # rows per optimizer step and micro-batch, summed over processes
    grad_accum: int = 1
    seqlen: int = 512
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    bf16: bool = True  # bf16 autocast for the frozen weights' GEMMs; trainable columns stay fp32 (SPEC §10.6)
    gradient_checkpointing: bool = False
    cache_base: bool = True  # post mode: keep the dequantized frozen weights (memory for speed)
    lora_rank: int = 64  # lora mode; 64 matches k=128's trainable parameters on SmolLM2-135M
    seed: int = 0
    eval_every: int = 0  # quick ppl every N steps (0: only before and after)
    save_every: int = 0  # resumable training state every N steps (0: never)
    resume: bool = False
    eval_windows: int = 4
    eval_stride: int = 8
    eval_seqlen: int = 2048
    eval_before: bool = True  # also measure the input's ppl (skip when it is already known)
    device: str = "cpu"
    out: str | None = None

    def __post_init__(self) -> None:
        self.data = tuple(self.data) if not isinstance(self.data, str) else (self.data,)
        self.validate()

    @property
    def noise_enabled(self) -> bool:
        return self.mode in ("post", "pre") if self.noise is None else (self.noise and self.mode != "lora")

    @property
    def effective_noise_bits(self) -> int | None:
        if not self.noise_enabled:
            return None
        return self.noise_bits or (self.bits if self.mode == "pre" else 4)

    def validate(self) -> None:
        if self.mode not in RECOVER_MODES:
            raise ValueError(f"unknown mode {self.mode!r}; use one of {', '.join(RECOVER_MODES)}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; use ce or kd")
        check_bits(self.bits)
        if self.noise_bits is not None:
            check_bits(self.noise_bits)
        for name in ("steps", "batch_size", "grad_accum", "seqlen", "lora_rank", "eval_stride", "eval_seqlen"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive (got {getattr(self, name)})")
        for name in ("lr", "weight_decay", "max_grad_norm", "eval_every", "save_every", "eval_windows", "salient"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (got {getattr(self, name)})")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must lie in [0, 1) (got {self.warmup_ratio})")
        if self.kd_temperature <= 0:
            raise ValueError(f"kd_temperature must be positive (got {self.kd_temperature})")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["data"] = list(self.data)
        out["noise"] = self.noise_enabled
        out["noise_bits"] = self.effective_noise_bits
        return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML preset into a plain dict (keys are config field names)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, found {type(data).__name__}")
    return {key.replace("-", "_"): value for key, value in data.items()}


def build_config(cls, yaml_path: str | Path | None = None, **overrides):
    """``cls`` from its defaults, then a YAML preset, then explicit (non-None) overrides."""
    known = {f.name for f in fields(cls)}
    values = load_yaml(yaml_path) if yaml_path else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**values)


def replace(config, **changes):
    """A validated copy of a config with some fields changed."""
    return dataclasses.replace(config, **changes)
