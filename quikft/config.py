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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
