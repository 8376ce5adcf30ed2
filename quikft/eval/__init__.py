"""Evaluation: the paper-protocol perplexity and zero-shot multiple-choice tasks."""

from quikft.eval.ppl import PplResult, PplTask, evaluate_ppl, perplexity_of_ids, task_ppl, window_starts
from quikft.eval.results import TaskResult, ZeroShotSettings
from quikft.eval.tasks import TASKS, load_task, parse_tasks
from quikft.eval.zeroshot import evaluate_task, evaluate_tasks

__all__ = ["TASKS", "PplResult", "PplTask", "TaskResult", "evaluate_ppl", "evaluate_task", "evaluate_tasks", "load_task",
           "parse_tasks", "perplexity_of_ids", "task_ppl", "window_starts", "ZeroShotSettings"]
