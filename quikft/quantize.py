"""The quantize job's public entry point, kept at this path for ``from quikft.quantize import quantize``
(the job lives in :mod:`quikft.jobs.quantize`)."""

from quikft.jobs.quantize import quantize

__all__ = ["quantize"]
