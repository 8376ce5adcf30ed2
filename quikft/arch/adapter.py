"""The architecture adapter: the only module that knows how decoder families are laid out.

Every stage asks it the same questions instead of keeping its own name tables:

- **Where are the decoder blocks?** The ``nn.ModuleList`` whose elements are the model's
  ``_no_split_modules`` classes (the unit accelerate never splits across devices: one decoder
  layer), preferring the language-model decoder of a multimodal model; without that hint, the
  longest list of one repeated block class. :data:`FAMILY_OVERRIDES` may name the path for a
  family where this is wrong.
- **Which modules are quantizable projections?** Every ``nn.Linear`` and transformers ``Conv1D``
  inside a block, and every expert of a mixture-of-experts layer whose weights are 3-D
  parameters (unfused into per-expert linears by :mod:`quikft.arch.experts`). Routers stay in
  full precision: the linears of an MoE layer (outside its experts) whose output width is the
  number of experts or 1 (a shared-expert gate). ``--targets``/``--ignore`` glob patterns
  narrow the set; the output head is only added on request.
- **Which projections read the same input?** Not answered here by names: the quantize
  pipeline finds it at run time, by tensor identity (:func:`quikft.quant.statistics.find_input_groups`).
- **How is the head applied?** :func:`logits_from_hidden` applies the output layer plus the
  family's logit transform (soft-capping, scaling) and is checked once per model against the
  model's own forward; where it disagrees, callers fall back to the full forward.

A family that cannot work (no repeated block, expert weights outside transformers' experts
interface) is refused by :func:`check_supported` with one line naming what is missing, before
any work starts. Adding a family that generic discovery gets wrong means one entry in
:data:`FAMILY_OVERRIDES` (see the README).
"""

from __future__ import annotations

import fnmatch
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from quikft.arch.experts import (
    RoutedExperts,
    UnsupportedExpertsError,
    follows_experts_interface,
    fuse_experts,
    has_fused_experts,
    unfuse_experts,
)


class UnsupportedArchitectureError(ValueError):
    """A model whose layout the adapter cannot handle; the message is one line naming what is missing."""


@dataclass(frozen=True)
class FamilyOverride:
    """Where generic discovery is wrong for a family: the blocks' module path, or why it is refused."""

    blocks: str | None = None
    refuse: str | None = None


# model_type -> override. Empty entries are not needed: generic discovery handles every family
# the test-suite builds (LLaMA, Mistral, Qwen2/3, Gemma-2/3, Phi-3, OPT, GPT-NeoX, Falcon,
# Mixtral, Qwen2-MoE, GPT-2, OLMo, OLMoE, Qwen3-MoE, ...).
FAMILY_OVERRIDES: dict[str, FamilyOverride] = {
    # Llama-4's experts run every token through every expert with batched matmuls on
    # pre-weighted inputs; its per-expert inputs are not the routed tokens our experts module uses.
    "llama4_text": FamilyOverride(refuse="its experts (Llama4TextExperts) use a batched all-token layout "
                                         "outside transformers' experts interface"),
}

# Config attributes that change how the head's output becomes logits, applied in this order.
SOFTCAP_ATTRIBUTE = "final_logit_softcapping"  # Gemma-2/3: cap * tanh(logits / cap)
LOGIT_MULTIPLIER_ATTRIBUTE = "logit_scale"  # Cohere: logits * scale
LOGIT_DIVISOR_ATTRIBUTE = "logits_scaling"  # Granite: logits / scaling


@dataclass
class ModelLayout:
    """Where things are in one model (see the module docstring)."""

    model: nn.Module
    blocks: nn.ModuleList
    prefix: str  # module path of the blocks, e.g. "model.layers"
    block_class: str
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    _layers: dict[int, dict[str, nn.Module]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.blocks)

    def block_name(self, index: int) -> str:
        return f"{self.prefix}.{index}"

    def layers(self, index: int) -> dict[str, nn.Module]:
        """The quantizable projections of block ``index`` by name relative to the block, after the
        ``targets``/``ignore`` patterns (matched against the full module name)."""
        found = block_projections(self.blocks[index])
        prefix = self.block_name(index)
        return {name: module for name, module in found.items()
                if selected(f"{prefix}.{name}", self.targets, self.ignore)}

    def experts(self, index: int) -> dict[str, RoutedExperts]:
        """Unfused experts modules of block ``index`` by relative name."""
        return {name: m for name, m in self.blocks[index].named_modules() if isinstance(m, RoutedExperts)}

    def all_layer_names(self) -> list[str]:
        return [f"{self.block_name(i)}.{name}" for i in range(len(self)) for name in self.layers(i)]


def selected(name: str, targets: Iterable[str] = (), ignore: Iterable[str] = ()) -> bool:
    """Whether a full module name passes the user's glob patterns (targets: any must match)."""
    targets = tuple(targets)
    if targets and not any(fnmatch.fnmatchcase(name, pattern) for pattern in targets):
        return False
    return not any(fnmatch.fnmatchcase(name, pattern) for pattern in ignore)


# ------------------------------------------------------------------------------------ blocks

def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Module path and list of the decoder blocks (see the module docstring for the rule)."""
    override = FAMILY_OVERRIDES.get(model_type(model))
    if override and override.refuse:
        raise UnsupportedArchitectureError(f"architecture {model_type(model)!r} is not supported: {override.refuse}")
    if override and override.blocks:
        return override.blocks, model.get_submodule(override.blocks)
    lists = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) > 0]
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    hinted = [(n, m) for n, m in lists if all(type(block).__name__ in no_split for block in m)]
    repeated = [(n, m) for n, m in lists if len(m) > 1 and len({type(b) for b in m}) == 1
                and not isinstance(m[0], (nn.Linear, nn.ModuleList)) and _has_projection(m[0])]
    candidates = hinted or repeated
    if not candidates:
        raise UnsupportedArchitectureError(
            f"cannot find the decoder blocks of {type(model).__name__}: no module list of its _no_split_modules "
            f"classes or of one repeated block class; add a FamilyOverride in quikft/arch/adapter.py")
    decoder = _decoder(model)
    inside = [(n, m) for n, m in candidates if decoder is not None and _contains(decoder, m)]
    # The most blocks wins; among equals the first (shallowest) list.
    return max(inside or candidates, key=lambda item: len(item[1]))


def _decoder(model: nn.Module) -> nn.Module | None:
    get_decoder = getattr(model, "get_decoder", None)
    try:
        return get_decoder() if get_decoder else None
    except (AttributeError, NotImplementedError, ValueError):
        return None


def _contains(root: nn.Module, target: nn.Module) -> bool:
    return any(module is target for module in root.modules())


def _has_projection(module: nn.Module) -> bool:
    return any(is_projection(m) for m in module.modules())


def layout(model: nn.Module, targets: Iterable[str] = (), ignore: Iterable[str] = ()) -> ModelLayout:
    """The model's :class:`ModelLayout` (discovery only; the model is not changed)."""
    prefix, blocks = find_blocks(model)
    classes = sorted({type(block).__name__ for block in blocks})
    return ModelLayout(model, blocks, prefix, "/".join(classes), tuple(targets), tuple(ignore))


def check_supported(model: nn.Module, targets: Iterable[str] = (), ignore: Iterable[str] = (),
                    with_head: bool = False) -> ModelLayout:
    """Refuse, in one line, a model the pipeline cannot process; cheap (no forward pass)."""
    found = layout(model, targets, ignore)
    for index, block in enumerate(found.blocks):
        for name, module in block.named_modules():
            if has_fused_experts(module) and not follows_experts_interface(module):
                raise UnsupportedArchitectureError(
                    f"architecture {model_type(model)!r} is not supported: {found.block_name(index)}.{name} "
                    f"({type(module).__name__}) stores expert weights as 3-D parameters without transformers' "
                    f"experts interface; add an experts layout in quikft/arch/")
    if not any(block_projections(block) for block in found.blocks):
        raise UnsupportedArchitectureError(f"architecture {model_type(model)!r}: its decoder blocks "
                                           f"({found.block_class}) contain no linear projection to quantize")
    if not found.all_layer_names() and not with_head:
        raise UnsupportedArchitectureError(f"--targets/--ignore leave no layer of {type(model).__name__} to quantize")
    return found


def prepare(model: nn.Module, targets: Iterable[str] = (), ignore: Iterable[str] = (),
            with_head: bool = False) -> ModelLayout:
    """:func:`check_supported`, then mark the model quantized (see :func:`mark_quantized`).

    Experts are unfused block by block (:func:`unfuse_all_experts`), when each block's weights are
    present: a block streamed from a checkpoint is loaded in its stored (fused) layout first.
    """
    found = check_supported(model, targets, ignore, with_head)
    mark_quantized(model)
    return found


def mark_quantized(model: nn.Module) -> None:
    """Set ``config._is_quantized`` as transformers does for every quantized model it loads.

    Some families (the Mamba-style mixers) read a projection's ``.weight`` directly unless the
    flag is set, and call the module otherwise: calibration must see the calls (so the
    projection gets statistics), and a packed layer has no ``.weight``. The flag is never saved.
    """
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            module.config._is_quantized = True


def unfuse_all_experts(root: nn.Module) -> list[str]:
    """Unfuse every experts module below ``root``; returns their names relative to ``root``."""
    names = []
    for name, module in list(root.named_modules()):
        if has_fused_experts(module) or isinstance(module, RoutedExperts):
            try:
                unfuse_experts(module)
            except UnsupportedExpertsError as err:
                raise UnsupportedArchitectureError(str(err)) from None
            names.append(name)
    return names


def fuse_all_experts(model: nn.Module) -> None:
    """Undo :func:`unfuse_all_experts` (a plain transformers layout, e.g. for ``save_pretrained``)."""
    for module in list(model.modules()):
        if isinstance(module, RoutedExperts):
            fuse_experts(module)


def unfuse_listed_experts(model: nn.Module, names: Iterable[str]) -> None:
    """Unfuse the experts modules at the given full names (a checkpoint's record of them)."""
    for name in names:
        try:
            unfuse_experts(model.get_submodule(name))
        except (AttributeError, UnsupportedExpertsError) as err:
            raise UnsupportedArchitectureError(f"cannot unfuse experts module {name}: {err}") from None


def experts_names(model: nn.Module) -> list[str]:
    """Full names of the unfused experts modules of ``model``."""
    return [name for name, module in model.named_modules() if isinstance(module, RoutedExperts)]


# ------------------------------------------------------------------------------------ projections

def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def is_projection(module: nn.Module) -> bool:
    """An ``nn.Linear`` or a transformers ``Conv1D`` (a linear with its weight stored transposed)."""
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def _is_conv1d(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return conv1d is not None and isinstance(module, conv1d)


def weight_of(module: nn.Module) -> Tensor:
    """The (out, in) weight of a projection; a view, so writing into it updates the layer."""
    return module.weight.data.t() if _is_conv1d(module) else module.weight.data


def dims_of(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a projection."""
    out_features, in_features = weight_of(module).shape
    return in_features, out_features


def as_linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing the same function, sharing the projection's storage."""
    if isinstance(module, nn.Linear):
        return module
    in_features, out_features = dims_of(module)
    weight = weight_of(module)
    linear = nn.Linear(in_features, out_features, bias=module.bias is not None, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.data, requires_grad=False)
    return linear


def block_projections(block: nn.Module) -> dict[str, nn.Module]:
    """Quantizable projections of one block by relative name (routers and gates excluded)."""
    routers = router_names(block)
    return {name: module for name, module in block.named_modules()
            if is_projection(module) and name not in routers}


def router_names(block: nn.Module) -> set[str]:
    """Linears that route tokens in an MoE layer: direct children of a module holding experts,
    with one output per expert or a single output (a shared-expert gate)."""
    routers = set()
    for name, module in block.named_modules():
        n_experts = _expert_count(module)
        if not n_experts:
            continue
        for child_name, child in module.named_children():
            if is_projection(child) and dims_of(child)[1] in (1, n_experts):
                routers.add(f"{name}.{child_name}" if name else child_name)
    return routers


def _expert_count(module: nn.Module) -> int:
    """Number of experts ``module`` holds directly (through a child), or 0."""
    for child in module.children():
        if isinstance(child, RoutedExperts):
            return child.n_experts
        if has_fused_experts(child):
            return next(p.shape[0] for p in child.parameters(recurse=False) if p.dim() == 3)
        if (isinstance(child, nn.ModuleList) and len(child) > 1 and len({type(m) for m in child}) == 1
                and not is_projection(child[0]) and _has_projection(child[0])):
            return len(child)
    return 0


# ------------------------------------------------------------------------------------ head

def head_name(model: nn.Module) -> str | None:
    """Module path of the output layer (``lm_head``, ``embed_out``, ...), if the model has one."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        return None
    return next((name for name, module in model.named_modules() if module is head), None)


def head_is_tied(model: nn.Module) -> bool:
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


def untie_head(model: nn.Module) -> None:
    """Give the output layer its own copy of the embedding matrix, so it can be quantized while the
    embedding stays in full precision; the config then says the weights are not tied."""
    if not head_is_tied(model):
        return
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    for config in _configs(model):
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False
    model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)


def _configs(model: nn.Module) -> list:
    """The model's config and its text sub-config (multimodal models keep tying there)."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else None
    return [config] + ([text] if text is not None and text is not config else [])


_HEAD_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def logit_transform(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """What the family does to the head's output (soft-capping, scaling); identity for most."""
    config = model.config
    cap = getattr(config, SOFTCAP_ATTRIBUTE, None)
    multiplier = getattr(model, LOGIT_MULTIPLIER_ATTRIBUTE, None)
    divisor = getattr(config, LOGIT_DIVISOR_ATTRIBUTE, None)

    def transform(logits: Tensor) -> Tensor:
        if isinstance(multiplier, (int, float)):
            logits = logits * multiplier
        if isinstance(divisor, (int, float)):
            logits = logits / divisor
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


def logits_from_hidden(model: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """``hidden -> logits`` through the model's own head and logit transform, or None when it cannot
    reproduce the model's forward (callers then run the whole model)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or _decoder(model) is None or _decoder(model) is model:
        return None
    transform = logit_transform(model)
    return lambda hidden: transform(head(hidden))


@torch.inference_mode()
def head_path_matches(model: nn.Module, ids: Tensor) -> bool:
    """Whether decoder + :func:`logits_from_hidden` gives the model's logits on ``ids`` (checked once
    per model object, on a short prefix)."""
    if model in _HEAD_CHECKED:
        return _HEAD_CHECKED[model]
    apply_head = logits_from_hidden(model)
    ok = False
    if apply_head is not None:
        prefix = ids[:, : min(ids.shape[1], 16)]
        try:
            hidden = _decoder(model)(input_ids=prefix, use_cache=False).last_hidden_state
            ours = apply_head(hidden).float()
            theirs = model(input_ids=prefix, use_cache=False).logits.float()
            ok = ours.shape == theirs.shape and torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4)
        except (AttributeError, TypeError, ValueError):
            ok = False
    _HEAD_CHECKED[model] = ok
    return ok


def decoder_hidden(model: nn.Module, ids: Tensor, **kwargs) -> Tensor:
    """The decoder's last hidden state (the head's input) for ``ids`` (``kwargs``: e.g. an attention mask)."""
    return _decoder(model)(input_ids=ids, use_cache=False, **kwargs).last_hidden_state
