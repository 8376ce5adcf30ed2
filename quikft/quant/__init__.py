"""Quantization core: storage/paper grids (``grid``), the scheme a layer is quantized with (``scheme``),
salient-last GPTQ / RTN (``gptq``) and the block loop that runs them over a model (``loop``)."""

from quikft.quant.gptq import HessianAccumulator, QuantResult, gptq_quantize, rtn_quantize
from quikft.quant.scheme import QuantScheme

__all__ = ["HessianAccumulator", "QuantResult", "QuantScheme", "gptq_quantize", "rtn_quantize"]
