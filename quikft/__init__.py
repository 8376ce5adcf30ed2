"""quikft: salient-column mixed-precision quantization and GIFT-SW recovery for LLMs."""

import importlib.abc
import sys
import warnings

from quikft.format import load, save_packed
from quikft.models import DEFAULT_MODEL, load_model

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
