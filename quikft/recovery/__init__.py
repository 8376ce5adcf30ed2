"""GIFT-SW recovery fine-tuning (``quikft recover``; the README's "Recover (GIFT-SW)"): train the
salient columns of a quantized model (or, in ``pre`` mode, of the full-precision model before
quantizing it).

The package, from the job down to the layers it trains:

- :mod:`~quikft.recovery.job`: :func:`recover`, the whole job from a config to the output.
- :mod:`~quikft.recovery.config`: :class:`RecoverConfig`, the flat settings (CLI flags, YAML presets).
- :mod:`~quikft.recovery.run`: the decisions made once before any weights are read (:func:`plan`).
- :mod:`~quikft.recovery.modes`: the modes (``post``, ``pre``, ``salient-ft``, ``lora``), each one
  class with its name, labels and behaviour, and the registry :data:`MODES` the CLI, the config's
  check and ``quikft report`` are built from.
- :mod:`~quikft.recovery.session`: the training session (trainable parameters, optimizer and
  schedule, curve, random generators), its steps, saves and resumes.
- :mod:`~quikft.recovery.training`: the optimisation loop (batches, accumulation, evaluation).
- :mod:`~quikft.recovery.report`: ``recover_report.json``.
- :mod:`~quikft.recovery.evaluation`: the quick perplexity checks.
- :mod:`~quikft.recovery.gift_linear`: ``GiftLinear``, the trainable salient slice beside the noisy
  frozen rest.
- :mod:`~quikft.recovery.data`, :mod:`~quikft.recovery.loss`: training rows and the losses
  (:class:`~quikft.recovery.loss.Loss`).
- :mod:`~quikft.recovery.state`, :mod:`~quikft.recovery.sharding`: the resumable state on disk and
  how several processes split the model (:class:`~quikft.recovery.sharding.Sharding`).

Recovery sits above the quantizer, the format and the inference layers (``quikft.nn``): it uses
them, and none of them imports it (tests/test_layering.py).
"""

from quikft.recovery.config import RecoverConfig
from quikft.recovery.job import recover
from quikft.recovery.modes import MODES

__all__ = ["MODES", "RecoverConfig", "recover"]
