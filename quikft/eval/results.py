"""What a zero-shot run is asked and what it returns, shared by our scorer and the lm-eval backend."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from quikft.config import Choice
from quikft.runinfo import library_versions


class EvalBackend(Choice):
    """Which scorer produced a zero-shot result (``quikft eval --backend``)."""

    NATIVE = "native"  # ours (quikft.eval.zeroshot)
    LM_EVAL = "lm-eval"  # lm-evaluation-harness on the same model object (quikft.eval.lm_eval_backend)


@dataclass(frozen=True)
class ZeroShotSettings:
    """How tasks are scored: ``limit`` examples of each (None: all), ``batch_size`` sequences per
    forward, by our scorer (``native``) or lm-evaluation-harness (``lm-eval``); ``model_name`` labels
    the results (default: the model's own name)."""

    limit: int | None = None
    batch_size: int = 16
    backend: str = EvalBackend.NATIVE
    progress: bool = True
    model_name: str | None = None


@dataclass
class TaskResult:
    """Metrics of one task: ``metrics[name] = {"value": v, "stderr": s}``."""

    model: str
    task: str
    n: int
    metrics: dict[str, dict[str, float | None]]
    seconds: float
    source: str = ""
    backend: str = EvalBackend.NATIVE.value
    versions: dict = field(default_factory=library_versions)

    def to_dict(self) -> dict:
        return asdict(self)

    def rows(self) -> list[dict]:
        """Flat table rows: task, metric, value, stderr, n."""
        return [{"task": self.task, "metric": name, "value": m["value"], "stderr": m["stderr"], "n": self.n}
                for name, m in self.metrics.items()]
