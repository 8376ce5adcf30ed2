"""quikft: salient-column mixed-precision quantization and GIFT-SW recovery for LLMs."""

from quikft.models import DEFAULT_MODEL, load_model

__version__ = "0.1.0"
__all__ = ["DEFAULT_MODEL", "__version__", "load_model"]
