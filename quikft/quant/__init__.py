"""Quantization core: storage/paper grids (``grid``) and salient-last GPTQ / RTN (``gptq``)."""

from quikft.quant.gptq import HessianAccumulator, QuantResult, gptq_quantize, rtn_quantize

__all__ = ["HessianAccumulator", "QuantResult", "gptq_quantize", "rtn_quantize"]
