"""The cross-check backend: the same tasks through lm-evaluation-harness's HFLM on our model object.

lm-eval's own task configs supply the prompts and metrics; only the data source is swapped for
the local file (``datasets``' json builder, which works offline), with small adapters where the
local schema differs from the hub dataset lm-eval expects: BoolQ's ``answer`` (HF ``boolq``)
versus ``label`` (``super_glue``), and HellaSwag files that are already preprocessed. Tasks with
no local file use lm-eval's configs unchanged (the hub). Tested with lm-eval 0.4.13.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from quikft.eval.results import EvalBackend, TaskResult, ZeroShotSettings
from quikft.eval.tasks import TASKS, TaskRef, ZeroShotTask, task_records, task_source

INSTALL_HINT = 'pip install -e ".[eval]"'


class MissingExtraError(ValueError):
    """An optional dependency is not installed."""


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise MissingExtraError(f"--backend lm-eval needs lm-evaluation-harness: {INSTALL_HINT}") from None
    return lm_eval


def _first_record(path: Path) -> dict:
    _, record = next(task_records(path), ("", {}))
    return record if isinstance(record, dict) else {}


def _boolq_target(doc: dict) -> int:
    return int(doc["answer"] if "answer" in doc else doc["label"])


def _boolq_overrides(path: Path) -> dict:
    return {"doc_to_target": _boolq_target}


def _hellaswag_overrides(path: Path) -> dict:
    if "query" in _first_record(path):  # already preprocessed: skip process_docs
        return {"process_docs": None, "doc_to_target": "gold"}
    return {}


# Config changes that let lm-eval's task read our (Hugging Face schema) file; other tasks need none.
SCHEMA_OVERRIDES: dict[ZeroShotTask, Callable[[Path], dict]] = {
    ZeroShotTask.BOOLQ: _boolq_overrides,
    ZeroShotTask.HELLASWAG: _hellaswag_overrides,
}


def task_config(ref: TaskRef, task_manager) -> str | dict:
    """lm-eval's config for ``ref`` reading its local file, or its plain name for the hub."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = task_source(ref)
    if path is None:
        return ref.name
    config = dict(load_yaml(task_manager.task_index[ref.name].yaml_path, resolve_func=True))
    for key in ("tag", "group", "include"):
        config.pop(key, None)
    config.update(dataset_path="json", dataset_name=None,
                  dataset_kwargs={"data_files": {"validation": str(path.resolve())}},
                  training_split=None, validation_split="validation", test_split=None, fewshot_split=None)
    if ref.name in SCHEMA_OVERRIDES:
        config.update(SCHEMA_OVERRIDES[ref.name](path))
    return config


def _metrics(results: dict, name: str) -> dict[str, dict[str, float | None]]:
    def number(value):
        return float(value) if isinstance(value, int | float) else None  # lm-eval writes "N/A" sometimes

    return {metric: {"value": number(results.get(f"{metric},none")),
                     "stderr": number(results.get(f"{metric}_stderr,none"))}
            for metric in TASKS[name].metrics}


def evaluate_tasks_lm_eval(model, tokenizer, refs: list[TaskRef], settings: ZeroShotSettings | None = None
                           ) -> list[TaskResult]:
    """Run each task through lm-eval's HFLM wrapping the already-loaded ``model`` and ``tokenizer``."""
    settings = settings or ZeroShotSettings()
    if all(task_source(ref) is not None for ref in refs):
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local files only: never wait on the network
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=settings.batch_size)
    manager = TaskManager()
    out = []
    for ref in refs:  # one task per call, so each gets its own wall time
        began = time.perf_counter()
        config = task_config(ref, manager)
        results = simple_evaluate(model=lm, tasks=[config], limit=settings.limit, log_samples=False,
                                  task_manager=manager)
        samples = results.get("n-samples", {}).get(ref.name, {})
        out.append(TaskResult(
            model=settings.model_name or getattr(model.config, "_name_or_path", "model"), task=ref.name,
            n=int(samples.get("effective", 0)), metrics=_metrics(results["results"][ref.name], ref.name),
            seconds=time.perf_counter() - began, source=str(task_source(ref) or "hub"),
            backend=EvalBackend.LM_EVAL.value))
    return out
