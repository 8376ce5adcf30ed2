"""The quick perplexity checks of a recovery run: before, during (``--eval-every``) and after training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from quikft.eval import ppl
from quikft.models import resolve_model

if TYPE_CHECKING:
    from quikft.recovery.config import RecoverConfig


def quick_ppl(model, tokenizer, config: RecoverConfig, label: str) -> dict | None:
    """The quick WikiText-2 ppl at the run's --eval-windows/--eval-stride/--eval-seqlen (None: 0 windows)."""
    return ppl.quick_ppl(model, tokenizer, config, label)


def fp_reference_ppl(config: RecoverConfig) -> dict | None:
    """The FP reference ppl the quantize run recorded, if it used the same evaluation setting."""
    report = Path(resolve_model(config.model)) / "quantize_report.json"
    if not report.is_file():
        return None
    fp = json.loads(report.read_text()).get("fp_ppl") or {}
    same = (fp.get("seqlen") == config.eval_seqlen and fp.get("windows") == config.eval_windows
            and fp.get("window_stride") == config.eval_stride)
    return fp if same else None
