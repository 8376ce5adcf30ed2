"""LoRA adapters on packed quikft models, through peft's custom-module dispatch.

peft builds a LoRA layer for every targeted module from a dispatcher list; a ``LoraConfig`` can
carry its own entries (``_register_custom_module``: base layer type -> LoRA layer type), which
peft consults first. :class:`QuikLoraLinear` is ours for :class:`~quikft.nn.QuikLinear`: its
output is the packed layer's own output plus the adapter's,

    y = quik(x) + scaling · B · A · dropout(x),     scaling = lora_alpha / r

so the frozen base stays packed (its forward runs through the kernel registry; with autograd
that is the differentiable reference kernel, which dequantizes inside the forward and keeps no
full weight between calls) and nothing replaces it by an ``nn.Linear`` holding a dequantized
copy. Merging an adapter into packed codes is not possible and is refused.

An adapter saved with ``save_pretrained`` is a plain peft adapter directory; :func:`load_lora`
puts it back on top of the packed model (peft does not save the custom mapping, so the config
is re-registered on load).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from quikft.nn.quik_linear import QuikLinear, quik_layers


class QuikLoraLinear(nn.Module, LoraLayer):
    """A LoRA adapter around a frozen :class:`QuikLinear` (built by peft's custom dispatch)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs) -> None:
        super().__init__()
        with warnings.catch_warnings():  # peft warns about every layer type it does not know; it reads our sizes
            warnings.filterwarnings("ignore", message="Unsupported layer type", category=UserWarning)
            LoraLayer.__init__(self, base_layer)
        if config.use_dora:
            raise ValueError("QuikLoraLinear does not support DoRA (it needs the dense base weight); set use_dora=False")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        result = self.base_layer(x)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            update = lora_b(lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype))))
            result = result + (update * self.scaling[name]).to(result.dtype)
        return result

    def merge(self, *args, **kwargs) -> None:
        # B·A is a dense update: folding it into b-bit codes would requantize the layer and lose it.
        raise ValueError("a LoRA adapter cannot be merged into packed low-bit codes (merge_and_unload); "
                         "keep it as an adapter (quikft.integrations.peft.load_lora)")

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def lora_config(targets: list[str], rank: int, alpha: float | None = None, dropout: float = 0.0) -> LoraConfig:
    """A LoRA config for the named modules with the QuikLinear dispatcher registered (alpha = 2·rank by default)."""
    config = LoraConfig(r=rank, lora_alpha=2 * rank if alpha is None else alpha, lora_dropout=dropout,
                        target_modules=targets, bias="none")
    register(config)
    return config


def register(config: LoraConfig) -> LoraConfig:
    """Let ``config`` build :class:`QuikLoraLinear` around QuikLinear layers (peft's custom-module dispatch)."""
    config._register_custom_module({QuikLinear: QuikLoraLinear})
    return config


def add_lora(model: nn.Module, rank: int = 64, alpha: float | None = None, dropout: float = 0.0) -> PeftModel:
    """Freeze ``model`` and put a trainable LoRA adapter on every QuikLinear (targets named in full)."""
    targets = sorted(quik_layers(model))
    if not targets:
        raise ValueError("the model has no QuikLinear layer: load a packed checkpoint (quikft.load) first")
    model.requires_grad_(False)
    _keep_codes(model)
    return get_peft_model(model, lora_config(targets, rank, alpha, dropout))


def _keep_codes(model: nn.Module) -> None:
    """Put back codes an inference loader dropped (peft reads the device from ``qweight``)."""
    for layer in quik_layers(model).values():
        layer.restore_codes()


BASE_FILE = "quikft_base.json"  # beside adapter_config.json: which packed base the adapter was trained on


def base_identity(model: nn.Module) -> str:
    """A hash of the packed layers an adapter sits on (every stored tensor, in module order): another
    quantization of the same model (a seed, ``--overwrite``) or another model of the same shapes differs."""
    digest = hashlib.sha256()
    for layer in quik_layers(model).values():
        for name, tensor in sorted(layer.state_dict().items()):
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_lora(model: PeftModel, directory: str | Path) -> None:
    """``save_pretrained`` plus the identity of the packed base, which :func:`load_lora` checks."""
    directory = Path(directory)
    model.save_pretrained(str(directory))
    (directory / BASE_FILE).write_text(json.dumps({"base_identity": base_identity(model),
                                                   "layers": len(quik_layers(model))}) + "\n")


def _check_base(adapter: Path, model: nn.Module) -> None:
    recorded = adapter / BASE_FILE
    if not recorded.is_file():
        return  # saved by plain save_pretrained (or before the check existed): nothing to compare
    try:
        saved = json.loads(recorded.read_text())
        identity, layers = str(saved["base_identity"]), int(saved["layers"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{recorded}: unreadable; save the adapter again (quikft.integrations.peft.save_lora)") \
            from None
    found = len(quik_layers(model))
    if found != layers:
        raise ValueError(f"{adapter} was trained on a base with {layers} packed layers; this model has {found}")
    if base_identity(model) != identity:
        raise ValueError(f"{adapter} was trained on another packed base (its layers differ from this model's: "
                         f"another quantization or model); load the checkpoint it was trained on")


def load_lora(adapter: str | Path, model: nn.Module | None = None, trainable: bool = False, **load_kwargs) -> PeftModel:
    """The packed model with the adapter saved in ``adapter`` on top.

    ``model`` defaults to the packed checkpoint the adapter was trained on (its
    ``base_model_name_or_path``), loaded with :func:`quikft.load` and ``load_kwargs``. An adapter
    saved by :func:`save_lora` (as ``recover --mode lora`` does) refuses, in one line, a base whose
    packed layers are not the ones it was trained on.
    """
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{adapter} holds no adapter_config.json: pass the adapter directory "
                                f"(`quikft recover --mode lora` writes it as <out>/adapter)")
    if model is None:
        from quikft.format.loader import load

        base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ValueError(f"{adapter}/adapter_config.json does not name its base model; pass model=")
        model = load(base, **{"dtype": torch.float32, **load_kwargs})
    _check_base(adapter, model)
    # An edited adapter_config.json (rank, targets, types) fails deep inside peft with a long message.
    with _as_one_line(adapter):
        config = register(LoraConfig.from_pretrained(str(adapter)))
        _keep_codes(model)
        return PeftModel.from_pretrained(model, str(adapter), config=config, is_trainable=trainable)


@contextlib.contextmanager
def _as_one_line(adapter: Path):
    try:
        yield
    except (RuntimeError, ValueError, TypeError, KeyError) as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        # torch's load_state_dict puts the first mismatch on the second line
        reason = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else (lines or [""])[0]
        raise ValueError(f"{adapter}/adapter_config.json does not match the adapter's weights or this model "
                         f"({err.__class__.__name__}: {reason[:300]}); save the adapter again") from None
