"""The grid and GPTQ settings a layer is quantized with, as one frozen object passed whole.

In the manner of the GPTQ reference's configured ``Quantizer``: the storage grid's width, grouping,
symmetry and clipping search, and GPTQ's column order, lazy-batch size and damping, travel together
from the scheme a checkpoint records (:class:`~quikft.config.QuantConfig`) to
:func:`~quikft.quant.gptq.gptq_quantize` and :func:`~quikft.quant.gptq.rtn_quantize`, instead of
as seven loose arguments each function re-checks. The salient columns are not part of it: they are
chosen per layer (:mod:`quikft.quant.saliency`) and given beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from quikft.config import QuantConfig
from quikft.quant.grid import Bits, fit_scale_zero, quantize_codes


@dataclass(frozen=True)
class QuantScheme:
    """Storage grid (GPTQ convention, :mod:`quikft.quant.grid`) plus GPTQ's settings.

    ``bits`` is an int, or a ``(rows, 1)`` float tensor of one width per row (--target-bpw measures
    several widths of a layer in one pass: :func:`quikft.quant.gptq.gptq_row_losses`).
    ``clip_search`` is on/off or the shrink factors to try (starting at 1.0).
    """

    bits: Bits
    group_size: int = 128  # columns per scale and zero-point; -1: one group per row
    sym: bool = False
    clip_search: bool | tuple[float, ...] = True
    act_order: bool = True  # GPTQ: non-salient columns by descending Hessian diagonal
    block_size: int = 128  # GPTQ: columns per lazy-batch update
    percdamp: float = 0.01  # GPTQ: damping as a fraction of the Hessian's mean diagonal

    @classmethod
    def of(cls, config: QuantConfig) -> QuantScheme:
        """The grid and GPTQ part of a checkpoint's scheme (its bits as given for this layer)."""
        return cls(config.bits, config.group_size, config.sym, config.clip_search, config.act_order,
                   config.block_size, config.percdamp)

    def fit(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Per-row scale and zero-point of this grid for the columns of ``w`` (one group)."""
        return fit_scale_zero(w, self.bits, self.sym, self.clip_search)

    def codes(self, w: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
        """``w``'s codes on this grid given a group's scale and zero-point."""
        return quantize_codes(w, scale, zero, self.bits)
