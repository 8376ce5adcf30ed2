"""Result records of the zero-shot scorers, shared by our scorer and the lm-eval backend."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from quikft.config import Choice
from quikft.runinfo import library_versions


class EvalBackend(Choice):
    """Which scorer produced a zero-shot result (``quikft eval --backend``)."""

    NATIVE = "native"  # ours (quikft.eval.zeroshot)
    LM_EVAL = "lm-eval"  # lm-evaluation-harness on the same model object (quikft.eval.lm_eval_backend)


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
