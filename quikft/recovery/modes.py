"""Recovery modes (``--mode``): each mode is one class here, holding its name, its labels and its behaviour.

- ``post``: a packed checkpoint in, its salient columns trained while step-scaled noise
  (4-bit Δ by default) perturbs the frozen quantized rest, the same checkpoint out with new
  salient columns; the integer codes are untouched.
- ``salient-ft``: ``post`` without noise (the paper's ablation).
- ``pre``: a full-precision model in; salient columns chosen on calibration data, trained
  with noise at the target bit-width, then the model is quantized keeping those columns.
- ``lora``: a LoRA baseline (peft adapters on the packed layers), for comparison.

A mode checks its input and its own settings, prepares the model, makes it trainable and writes
its output. :data:`MODES` is the registry everything else is built from: the CLI's ``--mode``
choices and help, the config's check (:mod:`quikft.recovery.config`) and the rows of ``quikft
report``. Adding a mode is one class here, added to :data:`MODES`, and its test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from quikft import arch
from quikft.config import ConfigError, QuantConfig, build_config
from quikft.data import calibration_windows, check_source
from quikft.format.reader import is_packed_checkpoint
from quikft.format.writer import write_packed, write_quik_model, write_salient_indices
from quikft.models import load_model, model_label, model_reference, resolve_model
from quikft.quant.model import quantize_model, select_salient_model
from quikft.recovery import sharding
from quikft.recovery.evaluation import fp_reference_ppl, quick_ppl
from quikft.recovery.gift_linear import unwrap_after_training, wrap_for_training

if TYPE_CHECKING:
    from quikft.recovery.config import RecoverConfig

FP16_MAX = 65504.0  # trained columns are stored as fp16


@dataclass
class Prepared:
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

    def teacher(self, config: RecoverConfig) -> str | None:
        """The KD teacher: --teacher, else the full-precision model the input derives from."""
        return config.teacher or self.source_model


class RecoveryMode:
    """How one mode checks its input, prepares the model, makes it trainable and writes its output.

    The base class is Post-GIFT-SW; the other modes change what differs."""

    name = ""  # the --mode value
    summary = ""  # the CLI's one-phrase description
    label = ""  # the method column of `quikft report`
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

    def check(self, config: RecoverConfig) -> None:
        """Refuse settings the mode cannot run and the wrong kind of input, before anything is loaded."""
        self.noise_bits(config)  # a contradictory noise setting fails here
        self.check_input(config)
        if sharding.Sharding(config.sharding).shards_parameters and not self.shardable:
            shardable = " or ".join(name for name, mode in MODES.items() if mode.shardable)
            raise ConfigError(f"--sharding fsdp2 trains packed checkpoints (--mode {shardable}); run --mode "
                              f"{self.name} with --sharding ddp", "sharding")

    def check_input(self, config: RecoverConfig) -> None:
        """Refuse the wrong kind of input: a packed checkpoint or a full-precision model."""
        packed = is_packed_checkpoint(resolve_model(config.model))
        if self.packed_input and not packed:
            raise ValueError(f"--mode {self.name} needs a packed checkpoint from `quikft quantize` as --model "
                             f"(got {config.model or 'the default FP model'}); or use --mode pre")
        if not self.packed_input and packed:
            raise ValueError(f"--mode {self.name} trains a full-precision model, but {config.model} is a packed "
                             f"checkpoint; pass the FP model, or use --mode post")

    def prepare(self, config: RecoverConfig, device: str, evaluate: bool, progress: bool) -> Prepared:
        """Load the packed input and measure its ppl (before any training)."""
        model, tokenizer = load_model(config.model, device=device, trust_remote_code=config.trust_remote_code,
                                      for_training=True)
        ppl = quick_ppl(model, tokenizer, config, str(config.model)) if evaluate else None
        qconfig = dict(model.config.quantization_config)
        # Checkpoints written before source_model existed kept the source in their settings.
        source = qconfig.get("source_model") or qconfig.get("settings", {}).get("model")
        return Prepared(model, tokenizer, ppl, fp_reference_ppl(config), qconfig, source_model=source)

    def wrap(self, prepared: Prepared, config: RecoverConfig) -> dict[str, nn.Parameter]:
        """Make the mode's layers trainable (everything else frozen); the trainable parameters by name."""
        layers = wrap_for_training(prepared.model, self.noise_bits(config), prepared.salient or None,
                                   cache_base=config.cache_base)
        return {f"{name}.salient_weight": layer.salient_weight for name, layer in layers.items()}

    def rebuild(self, prepared: Prepared, config: RecoverConfig, device: str, trained: dict[str, torch.Tensor]
                ) -> tuple[Prepared, dict[str, nn.Parameter]]:
        """After sharded training: the mode's model built afresh (not sharded) with the trained values,
        for the first process to finish alone. The ppl measured before training is kept."""
        fresh = self.prepare(config, device, evaluate=False, progress=False)
        fresh.ppl_before, fresh.fp_ppl = prepared.ppl_before, prepared.fp_ppl
        trainable = self.wrap(fresh, config)
        sharding.load_full_state(trainable, trained)
        return fresh, trainable

    def finish(self, prepared: Prepared, config: RecoverConfig, staging: Path, label: str) -> dict | None:
        """Write the output into ``staging``; returns the quick ppl after training."""
        unwrap_after_training(prepared.model)
        ppl_after = quick_ppl(prepared.model, prepared.tokenizer, config, label)
        write_quik_model(prepared.model, prepared.tokenizer, staging)
        return ppl_after


class PostMode(RecoveryMode):
    name = "post"
    summary = "Post-GIFT-SW"
    label = "GIFT-SW (post)"


class SalientFtMode(RecoveryMode):
    name = "salient-ft"
    summary = "post without noise"
    label = "salient FT"
    noise_default = False


class PreMode(RecoveryMode):
    name = "pre"
    summary = "Pre-GIFT-SW"
    label = "GIFT-SW (pre)"
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

    def prepare(self, config: RecoverConfig, device: str, evaluate: bool, progress: bool) -> Prepared:
        scheme = self.quant_config(config)
        model, tokenizer = load_model(config.model, device=device, trust_remote_code=config.trust_remote_code)
        # Refuse unsupported architectures before any work.
        arch.check_supported(model, scheme.targets, scheme.ignore, scheme.quantize_lm_head)
        ppl = quick_ppl(model, tokenizer, config, model_label(config.model)) if evaluate else None
        calib = calibration_windows(tokenizer, scheme.calib, scheme.nsamples, scheme.seqlen, scheme.seed)
        salient = select_salient_model(model, calib, scheme, progress=progress, device=device)
        return Prepared(model, tokenizer, ppl, ppl, scheme.to_dict(), source_model=model_reference(config.model),
                        salient=salient, calib=calib, quant_config=scheme)

    def finish(self, prepared: Prepared, config: RecoverConfig, staging: Path, label: str) -> dict | None:
        unwrap_after_training(prepared.model)
        device = str(next(prepared.model.parameters()).device)
        quantized = quantize_model(prepared.model, prepared.calib, prepared.quant_config, progress=False,
                                   device=device)
        ppl_after = quick_ppl(prepared.model, prepared.tokenizer, config, label)
        write_packed(prepared.model, prepared.tokenizer, quantized, staging, prepared.quant_config,
                     source_model=prepared.source_model)
        write_salient_indices(staging, quantized.salient_indices())
        return ppl_after


class LoraMode(RecoveryMode):
    name = "lora"
    summary = "baseline"
    label = "LoRA"
    noise_default = False
    value_limit = math.inf  # adapters are saved in fp32: only finiteness is required
    storage = "finite values"
    shardable = False  # a baseline: peft adapters under ddp

    def noise_bits(self, config: RecoverConfig) -> int | None:
        if config.noise:
            raise ConfigError("--mode lora trains adapters without noise; drop --noise", "noise")
        return None

    def wrap(self, prepared: Prepared, config: RecoverConfig) -> dict[str, nn.Parameter]:
        prepared.model = lora_model(prepared.model, config)
        return {name: p for name, p in prepared.model.named_parameters() if p.requires_grad}

    def finish(self, prepared: Prepared, config: RecoverConfig, staging: Path, label: str) -> dict | None:
        ppl_after = quick_ppl(prepared.model, prepared.tokenizer, config, label)
        from quikft.integrations.peft import save_lora

        save_lora(prepared.model, staging / "adapter")
        return ppl_after


def lora_model(model: nn.Module, config: RecoverConfig) -> nn.Module:
    """The LoRA baseline: peft adapters on the packed QuikLinear layers (quikft.integrations.peft)."""
    try:
        from quikft.integrations.peft import add_lora
    except ImportError:
        raise ValueError('--mode lora needs peft: pip install -e ".[peft]"') from None
    return add_lora(model, config.lora_rank)


# The registry, in the order the CLI lists the modes.
MODES: dict[str, RecoveryMode] = {mode.name: mode for mode in (PostMode(), PreMode(), SalientFtMode(), LoraMode())}


def mode_label(name: object) -> str:
    """How ``quikft report`` names a recover run of mode ``name`` (read from a report: any value)."""
    if isinstance(name, str) and name in MODES:
        return MODES[name].label
    return f"GIFT-SW ({name})" if name else "GIFT-SW"
