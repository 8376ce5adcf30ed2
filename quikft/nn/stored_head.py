"""A tied embedding and output head kept in bf16 when that is what the checkpoint stored.

A packed checkpoint stores the unquantized tensors in bf16 by default (``dtype_rest``), and on a
CPU without native bf16 the model computes in fp32, so a plain load widens the tied embedding to
fp32: in a small model the largest tensor (SmolLM2-135M: 49152 x 576, 113 MB in fp32, a fifth of
the fp32 model) doubles for nothing, and the head reads all of it for every generated token.

:func:`keep_tied_head_in_bf16` holds the table once in bf16 when every value is exactly a bf16
number (checked, so nothing is rounded) and runs

- the embedding as a bf16 lookup widened to the model dtype: exact;
- the head on a one-row input (decode) as a bf16 GEMV with fp32 accumulation (PyTorch vectorises
  it on AVX2; measured 6.6 ms against 10.1 ms for the fp32 GEMV at 49152 x 576, one thread): the
  input is rounded to bf16 there, the one precision change (relative 2^-9, what a bf16 model has);
- the head on longer inputs (prefill, perplexity) in fp32 over slices of the table widened one at
  a time: exact, because bf16 GEMMs are scalar loops on such CPUs.

``state_dict`` returns the table under the original names (in bf16, exactly as stored).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PREFILL_SLICE_ROWS = 8192  # table rows widened to fp32 at a time for a multi-row head product
DECODE_MAX_ROWS = 1


class Bf16Table(nn.Module):
    """The shared table (one buffer, counted once however many modules use it)."""

    def __init__(self, weight: Tensor, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).contiguous(), persistent=False)
        self.dtype = dtype


class _OverTable(nn.Module):
    """A module reading the shared table: ``.weight`` and its ``state_dict`` entry are the table."""

    def __init__(self, table: Bf16Table) -> None:
        super().__init__()
        self.table = table

    @property
    def weight(self) -> Tensor:
        return self.table.weight

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        destination[prefix + "weight"] = self.table.weight


class Bf16Embedding(_OverTable):
    """``nn.Embedding`` over a :class:`Bf16Table`, returning the model dtype."""

    def __init__(self, table: Bf16Table, padding_idx: int | None) -> None:
        super().__init__(table)
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = table.weight.shape

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.table.weight, self.padding_idx).to(self.table.dtype)


class Bf16Head(_OverTable):
    """The output projection ``x · Wᵀ`` over a :class:`Bf16Table` (see the module docstring)."""

    def __init__(self, table: Bf16Table) -> None:
        super().__init__(table)
        self.out_features, self.in_features = table.weight.shape

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        weight = self.table.weight
        if flat.shape[0] <= DECODE_MAX_ROWS:
            y = F.linear(flat.to(torch.bfloat16), weight).to(x.dtype)
        else:
            flat = flat.to(self.table.dtype)
            y = torch.empty(flat.shape[0], self.out_features, dtype=flat.dtype, device=flat.device)
            for start in range(0, self.out_features, PREFILL_SLICE_ROWS):
                part = weight[start:start + PREFILL_SLICE_ROWS].to(flat.dtype)
                torch.mm(flat, part.t(), out=y[:, start:start + part.shape[0]])
        return y.view(*x.shape[:-1], self.out_features)


def keep_tied_head_in_bf16(model: nn.Module) -> bool:
    """Hold ``model``'s tied fp32 embedding and head as one bf16 table when that loses nothing.

    Returns False (and changes nothing) unless the two are tied, on the CPU, in fp32, and every
    value is exactly representable in bf16 (a checkpoint stored with ``dtype_rest: bf16``).
    """
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(embedding) is not nn.Embedding or type(head) is not nn.Linear or head.bias is not None:
        return False
    weight = embedding.weight
    if (head.weight.data_ptr() != weight.data_ptr() or weight.device.type != "cpu"
            or weight.dtype != torch.float32):
        return False
    with torch.no_grad():
        if not torch.equal(weight.to(torch.bfloat16).float(), weight):
            return False
    table = Bf16Table(weight, weight.dtype)
    model.set_input_embeddings(Bf16Embedding(table, embedding.padding_idx))
    model.set_output_embeddings(Bf16Head(table))
    return True
