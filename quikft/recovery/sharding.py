"""How several recovery processes split the model (``--sharding``), and FSDP2 for GIFT-SW recovery.

:class:`Sharding` names the choices (the CLI's ``--sharding`` and the config's check come from
it). Under ``--sharding ddp`` each process holds a replica (accelerate's DDP). Under ``--sharding
fsdp2`` every decoder block (found by :mod:`quikft.arch`) and then the whole model become FSDP2
units: each parameter is a ``DTensor`` sharded along its first dimension across the processes,
gathered for its unit's forward and backward and freed after, and its gradient is reduce-scattered
(averaged over processes, as DDP's all-reduce averages). The trainable salient slices
(``GiftLinear.salient_weight``, fp32, out x k) and so their AdamW state are sharded; so are the
frozen float parameters (embeddings, norms, an unquantized head).

The packed frozen weights are buffers (int32 codes, fp16 scales) and stay replicated: FSDP2
shards parameters only, and keeping the codes as buffers needs no float re-typing of integer
codes (the FSDP-QLoRA trick) and no all-gather of the frozen weights in every forward and
backward. A packed layer holds b bits per non-salient weight and 16 per salient one: at 3 bits
with k = 128, about 3.4 bits per weight for 4096-wide layers (21% of their bf16 bytes; 6 bits
and 38% for the default model's 576-wide ones), so a replica costs a fraction of the bf16
model, and every step exchanges only the float parameters' bytes between processes.

Everything that must see whole tensors -- the resumable state, the output checkpoint -- goes
through :func:`full_state` / :func:`load_full_state`, which gather or re-shard collectively,
so a state saved by N processes resumes under any number, and the saved checkpoint has the
same format as a one-process run's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from quikft import arch
from quikft.config import Choice


class Sharding(Choice):
    """How several processes (``accelerate launch``) split the model; the values are the ``--sharding`` names."""

    DDP = "ddp"
    FSDP2 = "fsdp2"

    @property
    def help(self) -> str:
        """What the choice does, for the CLI's help."""
        return {Sharding.DDP: "keeps a replica per process",
                Sharding.FSDP2: "shards the trainable columns, their optimizer state and the float weights"}[self]

    @property
    def shards_parameters(self) -> bool:
        """Whether parameters and optimizer state are split across the processes (else replicated)."""
        return self is Sharding.FSDP2


def is_sharded(param: torch.Tensor) -> bool:
    return type(param).__name__ == "DTensor" or hasattr(param, "full_tensor")


def shard_model(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Make every decoder block, then the model, an FSDP2 unit over all processes (in place)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(torch.device(device).type, (dist.get_world_size(),))
    for block in arch.layout(model).blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def full_state(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """Whole CPU copies of the parameters; collective when they are sharded (every process calls it)."""
    return {name: (param.full_tensor() if is_sharded(param) else param).detach().cpu().clone()
            for name, param in params.items()}


def load_full_state(params: dict[str, nn.Parameter], tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into (possibly sharded) parameters: each process keeps its own shard."""
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for name, param in params.items():
            value = tensors[name].to(param.dtype)
            if is_sharded(param):
                value = distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh,
                                          param.placements)
                param.to_local().copy_(value.to_local())
            else:
                param.copy_(value.to(param.device))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, names: list[str]) -> dict:
    """The optimizer's state with whole tensors, in ``optimizer.state_dict()``'s layout (parameters by
    their index in ``names``, the order the optimizer was built with). Collective; only the first
    process receives the values (the one that saves them)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))
    if not full:
        return {}
    index = {name: i for i, name in enumerate(names)}
    return {"state": {index[name]: values for name, values in full["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in full["param_groups"]]}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, names: list[str],
                              state: dict) -> None:
    """Load a state in :func:`full_optimizer_state`'s layout into a sharded optimizer (every process)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    by_name = {"state": {names[int(i)]: values for i, values in state["state"].items()},
               "param_groups": [{**group, "params": [names[int(i)] for i in group["params"]]}
                                for group in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def as_number(value: torch.Tensor) -> float:
    """A scalar that may be a ``DTensor`` (e.g. a gradient norm over sharded parameters) as a float."""
    return float(value.full_tensor() if is_sharded(value) else value)


def max_abs(params: list[torch.Tensor]) -> float:
    """The largest magnitude over all parameters' values; collective when they are sharded."""
    import torch.distributed as dist

    local = [(p.to_local() if is_sharded(p) else p).detach() for p in params]
    peak = torch.stack([t.abs().amax() if t.numel() else t.new_zeros(()) for t in local]).amax().float()
    if any(is_sharded(p) for p in params):
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return float(peak)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient reduce-scatter on micro-batches before the last (gradient accumulation)."""
    setter = getattr(model, "set_requires_gradient_sync", None)
    if setter is None or enabled:
        yield
        return
    setter(False)
    try:
        yield
    finally:
        setter(True)
