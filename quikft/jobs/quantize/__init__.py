"""The ``quikft quantize`` job (:mod:`~quikft.jobs.quantize.job`) and its machinery for models larger than memory."""

from quikft.jobs.quantize.job import REPORT_NAME, check, quantize, reference_ppl

__all__ = ["REPORT_NAME", "check", "quantize", "reference_ppl"]
