"""Run configurations as dataclasses: one set of names for the CLI flags, the YAML presets in
``configs/`` and the saved checkpoint/report.

Two kinds of settings are kept apart:

- :class:`QuantConfig` is the quantization *scheme*: every setting that determines the
  quantized weights (bits, salient columns, metric, grid, calibration recipe). It is what a
  packed checkpoint records.
- :class:`QuantizeJob` and :class:`quikft.recovery.config.RecoverConfig` are *jobs*: which model,
  where the output goes, which device, how much to evaluate. A checkpoint never records them. The
  recovery settings live with recovery, whose modes, losses and sharding choices name them; they
  are built and checked with this module's :func:`build_config` and :func:`check_settings`.

Defaults follow the paper (GIFT-SW, 128 salient columns, ``gift`` metric) and GPTQ (asymmetric,
group 128, act-order, 1% damping). Calibration defaults (128 windows of 512 C4 tokens) are
chosen so the default run finishes in minutes on a laptop-class CPU; the paper's setting is
``nsamples=128, seqlen=2048``.

Every value is type-checked when a config is built (``bits: 4.0`` or ``nsamples: "8"`` in a
YAML preset is a one-line error naming the setting), before any model is loaded. This module
imports nothing else from quikft: every other layer may use it.

Named choices (a setting that takes one of a few names) are :class:`Choice` enums, the one source
of their names: the scheme's and the job's live here, beside the fields they type (a field
annotated with a ``Choice`` accepts exactly its members, and the CLI builds the flag's choices and
``[default]`` from the field); the evaluation's (zero-shot task, scorer backend) live beside their
tables in :mod:`quikft.eval`. Implementations register against the members (the metric presets in
:mod:`quikft.quant.saliency`, the ``--target-bpw`` errors in :mod:`quikft.quant.budget`, the storage
dtypes in :mod:`quikft.format.layout`), and tests check that every member has one. Members are
``str`` subclasses, so YAML presets, reports and checkpoints keep plain strings: ``to_dict`` gives
``str`` values, and a member equals, hashes and formats as its name.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import reprlib
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

BITS = (2, 3, 4, 8)
SUPPORTED_RHO = (1.0, 2.0, math.inf)  # the input norms the streamed column statistics can give


class Choice(str, enum.Enum):
    """A named choice: each member is its name as a ``str`` (equal to it, hashed and formatted as it).

    ``str`` + ``Enum`` with ``str``'s own ``__str__``/``__format__`` rather than ``enum.StrEnum``: the
    package supports Python 3.10, which has no ``StrEnum``."""

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The accepted names, in declaration order (CLI choices, error messages)."""
        return tuple(member.value for member in cls)


class QuantMethod(Choice):
    """How the non-salient columns are rounded (quikft.quant.gptq)."""

    GPTQ = "gptq"
    RTN = "rtn"  # round to nearest, no error feedback: the baseline


class SaliencyMetric(Choice):
    """The sensitivity metric choosing salient columns; each member's parameters in :data:`PRESETS` below."""

    GIFT = "gift"
    QUIK = "quik"
    OWQ = "owq"
    WANDA = "wanda"
    CUSTOM = "custom"  # free tau/rho/gamma



class RestDtype(Choice):
    """Storage dtype of a checkpoint's unquantized tensors; torch dtypes in quikft.format.layout.DTYPE_REST."""

    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


class BpwError(Choice):
    """What --target-bpw minimises; each member's measure in quikft.quant.budget.ERRORS."""

    FISHER = "fisher"
    RELATIVE = "relative"
    OUTPUT = "output"


class OffloadMode(Choice):
    """Where calibration activations wait between blocks (quikft.quant.activations)."""

    NONE = "none"  # on the compute device
    CPU = "cpu"
    DISK = "disk"


def plain(value: Any) -> Any:
    """A member as its plain ``str`` name (anything else as it is): what reports and checkpoints store,
    so their bytes, and every repr of a stored value, do not depend on the enum classes."""
    return value.value if isinstance(value, Choice) else value


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxtuple, _BRIEF.maxdict, _BRIEF.maxset = 2, 4, 4, 4, 4
_BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlong = 60, 60, 40


def brief(value: Any) -> str:
    """A short repr of a user's value for an error message: bounded in length and in the work it takes
    (a YAML preset's aliases can make a value whose full repr is gigabytes)."""
    return _BRIEF.repr(value)


class ConfigError(ValueError):
    """A setting that cannot work; the message is one line naming the setting (``setting``, when one)."""

    def __init__(self, message: str, setting: str | None = None) -> None:
        super().__init__(message)
        self.setting = setting


def check_bits(bits: int, name: str = "bits") -> None:
    """Raise unless ``bits`` is one of the supported widths (an int: ``4.0`` is refused)."""
    if type(bits) is not int or bits not in BITS:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, BITS))}; got {brief(bits)}", name)


SALIENT_HINT = "use a count such as 128 (0: none), or a fraction of each layer's input columns such as 0.03 or 3%"


def parse_salient(value: Any, name: str = "salient") -> int | float:
    """A salient-column setting: a count (an int >= 0, the same k for every layer) or a fraction of
    each layer's input columns (a float in (0, 1)); strings such as "128", "0.03" or "3%" are read
    too, since CLI flags arrive as text. The fraction is kept as given and resolved per layer by
    :func:`resolve_salient`, so a checkpoint records the scheme, not one model's counts."""
    parsed = value
    if isinstance(value, str):
        text = value.strip()
        try:
            if text.endswith("%"):
                parsed = float(text[:-1]) / 100
            else:
                parsed = int(text) if text.isdigit() else float(text)
        except ValueError:
            parsed = None
    if isinstance(parsed, int) and not isinstance(parsed, bool) and parsed >= 0:
        return parsed
    if isinstance(parsed, float) and 0 < parsed < 1:
        return parsed
    raise ConfigError(f"{name} {brief(value)} is neither a count (an integer >= 0) nor a fraction in (0, 1); "
                      f"{SALIENT_HINT}", name)


def salient_text(salient: int | float) -> str:
    """A salient setting as a user writes it: ``128`` or ``3%``."""
    return f"{100 * salient:g}%" if isinstance(salient, float) else str(salient)


def salient_request(salient: int | float, in_features: int) -> int:
    """The k a setting asks of a layer with ``in_features`` inputs, before :func:`resolve_salient` caps it."""
    if isinstance(salient, float):
        # Nearest, not floor: a decimal fraction times a width often lands just below the integer it
        # means (0.29 * 100 == 28.999999999999996), and the nearest count is the closest to the fraction.
        return round(salient * in_features)
    return salient


def resolve_salient(salient: int | float, in_features: int) -> int:
    """The number of FP16 salient columns of one layer: the count, or round(fraction * in_features);
    capped at in_features - 1 so at least one column is quantized (GPTQ needs one)."""
    return max(0, min(salient_request(salient, in_features), in_features - 1))


def check_metric_norms(tau: float | None, rho: float | None) -> None:
    """The metric's norms: tau positive (or None: weight term ignored), rho one the statistics stream."""
    if rho is not None and float(rho) not in SUPPORTED_RHO:
        raise ConfigError(f"rho must be one of 1, 2, inf (streamed statistics); got {rho}", "rho")
    if tau is not None and not float(tau) > 0:
        raise ConfigError(f"tau must be positive, inf or None; got {tau}", "tau")


@dataclass(frozen=True)
class MetricSpec:
    """Parameters of the sensitivity metric.

    ``tau``: norm over the output rows of ``D_j`` (``None``: ``D`` ignored, as QUIK does).
    ``rho``: norm of ``X_j`` over tokens; one of 1, 2 or ``math.inf`` (the streamed statistics).
    ``gamma``: exponent on ``||X_j||_rho``. ``d_power``: exponent on ``||D_j||_tau``
    (OWQ's ``lambda_j ||D_j||_2^2`` uses 2).
    """

    tau: float | None
    rho: float
    gamma: float
    d_power: float = 1.0

    def __post_init__(self) -> None:
        check_metric_norms(self.tau, self.rho)


# Every SaliencyMetric but CUSTOM (the free tau/rho/gamma) names one of these (tests check it): a metric
# is added here, its member and its parameters side by side (quikft.quant.saliency computes any of them).
PRESETS: dict[SaliencyMetric, MetricSpec] = {
    SaliencyMetric.GIFT: MetricSpec(tau=math.inf, rho=math.inf, gamma=1.0),
    SaliencyMetric.QUIK: MetricSpec(tau=None, rho=math.inf, gamma=1.0),
    SaliencyMetric.OWQ: MetricSpec(tau=2.0, rho=2.0, gamma=2.0, d_power=2.0),
    SaliencyMetric.WANDA: MetricSpec(tau=1.0, rho=2.0, gamma=1.0),
}


# ------------------------------------------------------------------------------------ type checks

def _type_name(kind: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(kind, str(kind))


def _coerce(name: str, value: Any, kind: Any) -> Any:
    """``value`` checked against the annotation ``kind`` (returned, floats normalised)."""
    options = typing.get_args(kind) if isinstance(kind, types.UnionType) else ()
    if options:
        if value is None and type(None) in options:
            return None
        kind = next(option for option in options if option is not type(None))
    if isinstance(kind, type) and issubclass(kind, Choice):
        kind = str  # a name; validate() checks it is a member (after the type checks, as for every value)
    if typing.get_origin(kind) is tuple:
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, list | tuple) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"setting {name} must be a list of strings; got {brief(value)}", name)
        return tuple(value)
    if kind is float:
        # YAML 1.1 reads 1e-4 and inf (without a dot) as strings: accept numbers spelled so.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif kind is int and type(value) is int or kind in (bool, str) and isinstance(value, kind):
        return value
    raise ConfigError(f"setting {name} must be {_type_name(kind)}; got {brief(value)} ({type(value).__name__})", name)


def _check_types(config: Any) -> None:
    """Check (and normalise) every field of a config dataclass against its annotation."""
    hints = typing.get_type_hints(type(config))
    for item in fields(config):
        if dataclasses.is_dataclass(hints[item.name]):
            continue
        parse = item.metadata.get("parse")  # a setting with a syntax of its own (e.g. salient: 128 or 3%)
        if parse is not None:
            value = getattr(config, item.name)
            if not (value is None and type(None) in typing.get_args(hints[item.name])):
                setattr(config, item.name, parse(value, item.name))
            continue
        setattr(config, item.name, _coerce(item.name, getattr(config, item.name), hints[item.name]))


def _positive(config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be positive (got {getattr(config, name)})", name)


def _non_negative(config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must be >= 0 (got {getattr(config, name)})", name)


def _one_of(name: str, value: str, allowed: type[Choice] | tuple[str, ...], what: str | None = None) -> Any:
    """``value`` if it is one of ``allowed`` (as the member, for a :class:`Choice`), else a one-line error."""
    names = allowed.names() if isinstance(allowed, type) else allowed
    if value not in names:
        raise ConfigError(f"unknown {what or name} {brief(value)}; use one of {', '.join(names)}", name)
    return allowed(value) if isinstance(allowed, type) else value


def check_settings(config: Any, choices: dict[str, tuple[str, ...]] | None = None, positive: tuple[str, ...] = (),
                   non_negative: tuple[str, ...] = ()) -> None:
    """The checks of a settings dataclass defined outside this module (:mod:`quikft.recovery.config`):
    every field against its annotation, then each named choice, the positive and the non-negative
    settings; the first failure is a one-line :class:`ConfigError` naming the setting."""
    _check_types(config)
    for name, allowed in (choices or {}).items():
        _one_of(name, getattr(config, name), allowed)
    _positive(config, positive)
    _non_negative(config, non_negative)


# ------------------------------------------------------------------------------------ quantize

@dataclass
class QuantConfig:
    """The quantization scheme (the README's "Quantize"): what determines the quantized weights; saved in the checkpoint."""

    bits: int = 3
    # FP16 input columns per linear layer: a count k (capped at in_features - 1) or a fraction of each
    # layer's input columns (0.03, "3%"); see resolve_salient.
    salient: int | float = field(default=128, metadata={"parse": parse_salient})
    metric: SaliencyMetric = SaliencyMetric.GIFT  # custom: with tau/rho/gamma
    tau: float | None = None
    rho: float | None = None
    gamma: float | None = None
    method: QuantMethod = QuantMethod.GPTQ
    group_size: int = 128  # -1 = one scale per output row
    sym: bool = False
    act_order: bool = True
    clip_search: bool = True  # per-row clipping search over 80 shrink factors (quikft.quant.grid)
    percdamp: float = 0.01
    block_size: int = 128
    calib: str = "c4"  # dataset name or file path
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    targets: tuple[str, ...] = ()  # glob patterns of module names to quantize (empty: every projection)
    ignore: tuple[str, ...] = ()  # glob patterns of module names to leave in full precision
    quantize_lm_head: bool = False  # also quantize the output layer (untied from the embedding if tied)
    expert_min_tokens: int = 128  # an MoE expert routed fewer calibration tokens uses all of its layer's tokens
    dtype_rest: RestDtype = RestDtype.BF16  # of the unquantized tensors (embeddings, norms, an untied head) when saved
    # A bits-per-weight budget for the quantized linear layers: bits and salient columns are then chosen
    # per layer from measured errors (quikft.quant.budget), and bits/salient above are not used.
    target_bpw: float | None = None
    # The error --target-bpw minimises (quikft.quant.budget); fisher (output error weighed by the loss's
    # sensitivity to it) gave the lowest ppl at every budget measured on the default model (README,
    # accuracy per bit).
    bpw_error: BpwError = BpwError.FISHER

    def __post_init__(self) -> None:
        self.targets = _patterns(self.targets)
        self.ignore = _patterns(self.ignore)
        self.validate()

    def validate(self) -> None:
        """One-line errors for settings that cannot work, raised before anything is loaded."""
        _check_types(self)
        check_bits(self.bits)
        self.method = _one_of("method", self.method, QuantMethod)
        self.metric = _one_of("metric", self.metric, SaliencyMetric, "saliency metric")
        if self.metric is SaliencyMetric.CUSTOM and (self.rho is None or self.gamma is None):
            raise ConfigError("metric custom needs rho and gamma (and tau, or none to ignore the weight term)",
                              "metric")
        check_metric_norms(self.tau, self.rho)
        if self.group_size == 0 or self.group_size < -1:
            raise ConfigError(f"group size {self.group_size} is invalid; use a positive size such as 128, "
                              f"or -1 for one scale per row", "group_size")
        _non_negative(self, ("percdamp", "expert_min_tokens"))
        _positive(self, ("nsamples", "seqlen", "block_size"))
        self.dtype_rest = _one_of("dtype_rest", self.dtype_rest, RestDtype)
        self.bpw_error = _one_of("bpw_error", self.bpw_error, BpwError, "--target-bpw error")
        if self.target_bpw is not None and not 0 < self.target_bpw < 64:
            raise ConfigError(f"target_bpw {self.target_bpw:g} is not a bits-per-weight budget; use e.g. 3.5",
                              "target_bpw")

    def to_dict(self) -> dict[str, Any]:
        out = {name: plain(value) for name, value in asdict(self).items()}
        out["targets"], out["ignore"] = list(self.targets), list(self.ignore)
        return out


def _patterns(value: Any) -> Any:
    """Module-name glob patterns from one comma-separated string; lists pass on to the type check."""
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    return value or ()


@dataclass
class QuantizeJob:
    """One ``quikft quantize`` run: the scheme plus where and how it runs (not saved in the checkpoint)."""

    quant: QuantConfig = field(default_factory=QuantConfig)
    model: str | None = None  # alias, hub id or directory; None = the embedded default model
    device: str = "auto"  # where each block is quantized: auto (cuda when present), cpu, cuda, cuda:1, ...
    batch_size: int = 8  # calibration sequences per block forward
    out: str | None = None
    overwrite: bool = False  # replace a previous quantize output at --out
    resume: bool = False  # continue an interrupted quantize from its state beside --out
    offload_activations: OffloadMode = OffloadMode.NONE  # where calibration activations wait between blocks
    fake_quant: bool = False  # save dequantized float weights (debugging) instead of the packed checkpoint
    eval_windows: int = 4  # quick ppl on the first N windows of the stride-8 WikiText-2 subset (0: none)
    eval_stride: int = 8
    eval_seqlen: int = 2048
    trust_remote_code: bool = False  # run a hub model's own Python code (only for models you trust)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        _check_types(self)
        self.quant.validate()
        _positive(self, ("batch_size", "eval_stride", "eval_seqlen"))
        _non_negative(self, ("eval_windows",))
        self.offload_activations = _one_of("offload_activations", self.offload_activations, OffloadMode,
                                           "--offload-activations mode")

    def to_dict(self) -> dict[str, Any]:
        """Flat, with the names of the CLI flags (as reports record it)."""
        out = {item.name: plain(getattr(self, item.name)) for item in fields(self) if item.name != "quant"}
        return {**out, **self.quant.to_dict()}


# ------------------------------------------------------------------------------------ building

def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML preset into a plain dict (keys are config field names); one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML ({problem})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings, found {type(data).__name__}")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def _nested(cls) -> dict[str, type]:
    """Fields of ``cls`` that are themselves config dataclasses (their settings are given flat)."""
    hints = typing.get_type_hints(cls)
    return {item.name: hints[item.name] for item in fields(cls) if dataclasses.is_dataclass(hints[item.name])}


def setting_field(cls, name: str) -> tuple[dataclasses.Field, Any]:
    """The field of the flat setting ``name`` of ``cls`` (nested configs searched) and its type."""
    hints = typing.get_type_hints(cls)
    nested = _nested(cls)
    for item in fields(cls):
        if item.name == name and item.name not in nested:
            return item, hints[name]
    for sub in nested.values():
        if name in setting_names(sub):
            return setting_field(sub, name)
    raise KeyError(f"{cls.__name__} has no setting {name!r}")


def setting_names(cls) -> set[str]:
    """Every flat setting name of ``cls`` (those of nested configs included)."""
    nested = _nested(cls)
    names = {item.name for item in fields(cls) if item.name not in nested}
    for sub in nested.values():
        names |= setting_names(sub)
    return names


def from_settings(cls, values: dict[str, Any]):
    """``cls`` from flat settings, routing the names of nested configs to them."""
    values = dict(values)
    known = setting_names(cls)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}", unknown[0])
    for name, sub in _nested(cls).items():
        values[name] = from_settings(sub, {key: values.pop(key) for key in setting_names(sub) if key in values})
    return cls(**values)


def build_config(cls, yaml_path: str | Path | None = None, **overrides):
    """``cls`` from its defaults, then a YAML preset, then explicit (non-None) overrides."""
    values = load_yaml(yaml_path) if yaml_path else {}
    from_yaml = set(values)
    given = {k: v for k, v in overrides.items() if v is not None}
    values.update(given)
    chosen_per_layer = sorted(set(values) & {"bits", "salient"})
    if values.get("target_bpw") is not None and chosen_per_layer:
        raise ConfigError(f"--target-bpw chooses bits and salient columns per layer; drop --{chosen_per_layer[0]} "
                          f"(or drop --target-bpw to set them for every layer)", "target_bpw")
    try:
        return from_settings(cls, values)
    except ConfigError as err:
        if err.setting in from_yaml and err.setting not in given:  # name the preset the bad value came from
            raise ConfigError(f"{yaml_path}: {err}", err.setting) from None
        raise
