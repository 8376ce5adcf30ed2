"""quikft: salient-column mixed-precision quantization and GIFT-SW recovery for LLMs."""

import os

# torch's OpenMP workers spin between parallel regions by default; GPTQ and the clip search
# run thousands of small ops, and on a 2-core machine the spinning threads starve the main
# one (tests/test_gptq.py: 36 s spinning, 4 s passive). Only effective before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from quikft.models import DEFAULT_MODEL, load_model

__version__ = "0.1.0"
__all__ = ["DEFAULT_MODEL", "__version__", "load_model"]
