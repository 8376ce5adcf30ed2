"""quikft: salient-column mixed-precision quantization and GIFT-SW recovery for LLMs."""

import os

# torch's OpenMP workers spin between parallel regions by default; GPTQ and the clip search
# run thousands of small ops, and on a 2-core machine the spinning threads starve the main
# one (tests/test_gptq.py: 36 s spinning, 4 s passive). Only effective before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import importlib.abc  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

from quikft.checkpoint import load, save_packed  # noqa: E402
from quikft.models import DEFAULT_MODEL, load_model  # noqa: E402

__version__ = "0.1.0"
__all__ = ["DEFAULT_MODEL", "__version__", "load", "load_model", "save_packed"]

_HF_REGISTRY = "transformers.quantizers.auto"


def _register_with_transformers() -> None:
    """Import quikft.hf, which registers the ``quikft`` quantizer; never break the caller's import."""
    try:
        import quikft.hf  # noqa: F401
    except Exception as err:  # a transformers API change must not make transformers unimportable
        warnings.warn(f"quikft could not register its transformers quantizer ({err}); "
                      f"use quikft.load() to load packed checkpoints", stacklevel=2)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Runs the registration right after transformers executes its quantizer registry.

    Importing that registry costs about 2 s (it pulls in every built-in quantizer), so
    ``import quikft`` does not do it; ``from_pretrained`` always imports it, and this hook
    then adds ``quikft`` to it before any checkpoint is resolved.
    """

    def find_spec(self, fullname, path, target=None):
        if fullname != _HF_REGISTRY:
            return None
        sys.meta_path.remove(self)  # one-shot, and keeps the search below from finding us again
        spec = next(filter(None, (finder.find_spec(fullname, path, target) for finder in sys.meta_path
                                  if hasattr(finder, "find_spec"))), None)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            _register_with_transformers()

        spec.loader.exec_module = exec_module
        return spec


if _HF_REGISTRY in sys.modules:
    _register_with_transformers()
elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())
