"""The six zero-shot tasks: where their data lives and how each record becomes scoring requests.

Prompts follow lm-evaluation-harness (0-shot, ``target_delimiter`` " "), so our numbers are
comparable with papers that used it:

- ARC:        ``"Question: {question}\\nAnswer:"`` + ``" {choice}"``
- PIQA:       ``"Question: {goal}\\nAnswer:"`` + ``" {sol}"``
- BoolQ:      ``"{passage}\\nQuestion: {question}?\\nAnswer:"`` + ``" no"`` / ``" yes"``
- HellaSwag:  the preprocessed ``query`` + ``" {ending}"`` (raw records are preprocessed as lm-eval does)
- WinoGrande: partial scoring: one context per option (the sentence up to the blank with the
  option filled in) and the same continuation for both (the rest of the sentence).

Records come from ``$QUIKFT_DATA/<task>/...`` (Hugging Face schema), from a jsonl/json path given
as ``task=PATH``, or from the hub through ``datasets`` when ``QUIKFT_DATA`` is unset.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from quikft.config import Choice
from quikft.data import DataError, data_root


class ZeroShotTask(Choice):
    """The zero-shot tasks (the README's "Zero-shot evaluation and reports"); each has its
    :class:`TaskSpec` in :data:`TASKS` (a test checks it)."""

    ARC_EASY = "arc_easy"
    ARC_CHALLENGE = "arc_challenge"
    PIQA = "piqa"
    HELLASWAG = "hellaswag"
    BOOLQ = "boolq"
    WINOGRANDE = "winogrande"


ALL_TASKS = "all"  # ``--tasks all``: every ZeroShotTask


@dataclass(frozen=True)
class Example:
    """One multiple-choice item as ``(context, continuation)`` requests, one per choice."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    # lm-eval's acc_norm divides each log-likelihood by the character length of the choice text
    # (without the leading delimiter space), not by its token count.
    norm_lengths: tuple[int, ...]

    @classmethod
    def multiple_choice(cls, context: str, choices: list[str], gold: int) -> Example:
        """A shared context scored against ``" " + choice`` for each choice."""
        if not 0 <= gold < len(choices):
            raise ValueError(f"gold index {gold} is outside the {len(choices)} choices")
        return cls(contexts=(context,) * len(choices), continuations=tuple(" " + c for c in choices),
                   gold=gold, norm_lengths=tuple(max(len(c), 1) for c in choices))

    @classmethod
    def partial(cls, contexts: list[str], continuation: str, gold: int) -> Example:
        """Partial scoring: one context per option, the same continuation for all of them."""
        if not 0 <= gold < len(contexts):
            raise ValueError(f"gold index {gold} is outside the {len(contexts)} options")
        return cls(contexts=tuple(contexts), continuations=(continuation,) * len(contexts), gold=gold,
                   norm_lengths=tuple(max(len(c), 1) for c in contexts))

    def requests(self) -> list[tuple[str, str]]:
        return list(zip(self.contexts, self.continuations, strict=True))


# ---------------------------------------------------------------------------- record -> Example

def arc_example(record: dict) -> Example:
    choices = record["choices"]
    gold = list(choices["label"]).index(record["answerKey"])
    return Example.multiple_choice(f"Question: {record['question']}\nAnswer:", list(choices["text"]), gold)


def piqa_example(record: dict) -> Example:
    return Example.multiple_choice(f"Question: {record['goal']}\nAnswer:", [record["sol1"], record["sol2"]],
                                   int(record["label"]))


def boolq_example(record: dict) -> Example:
    answer = record["answer"] if "answer" in record else record["label"]  # HF boolq or super_glue schema
    if isinstance(answer, str):  # some exports spell the bool out
        if answer.strip().lower() not in ("true", "false"):
            raise ValueError(f"answer must be true or false, got {answer!r}")
        answer = answer.strip().lower() == "true"
    return Example.multiple_choice(f"{record['passage']}\nQuestion: {record['question']}?\nAnswer:",
                                   ["no", "yes"], int(bool(answer)))


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's cleanup of HellaSwag text: WikiHow ``[title]``/``[step]`` markup and double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag_example(record: dict) -> Example:
    if "query" in record:  # already lm-eval/OLMES-preprocessed (the local 1000-example subset)
        return Example.multiple_choice(record["query"], list(record["choices"]), int(record["gold"]))
    context = record["ctx_a"] + " " + record["ctx_b"].capitalize()
    query = hellaswag_preprocess(record["activity_label"] + ": " + context)
    endings = [hellaswag_preprocess(ending) for ending in record["endings"]]
    return Example.multiple_choice(query, endings, int(record["label"]))


def winogrande_example(record: dict) -> Example:
    sentence = record["sentence"]
    if "_" not in sentence:
        raise ValueError("the sentence has no '_' blank")
    blank = sentence.index("_")
    contexts = [sentence[:blank] + record["option1"], sentence[:blank] + record["option2"]]
    answer = str(record["answer"]).strip()
    if answer not in ("1", "2"):
        raise ValueError(f"answer must be '1' or '2', got {answer!r}")
    gold = int(answer) - 1
    return Example.partial(contexts, " " + sentence[blank + 1:].strip(), gold)


# ---------------------------------------------------------------------------- task table

@dataclass(frozen=True)
class TaskSpec:
    """Where a task's evaluation split lives (locally and on the hub) and how to read its records."""

    name: ZeroShotTask
    local: str  # relative to $QUIKFT_DATA
    hub: tuple[str, str | None, str]  # (hub path, config, split)
    build: Callable[[dict], Example]
    metrics: tuple[str, ...]  # what lm-eval reports for the task


TASKS: dict[ZeroShotTask, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec(ZeroShotTask.ARC_EASY, "arc_easy/validation.jsonl", ("allenai/ai2_arc", "ARC-Easy", "validation"),
             arc_example, ("acc", "acc_norm")),
    TaskSpec(ZeroShotTask.ARC_CHALLENGE, "arc_challenge/validation.jsonl",
             ("allenai/ai2_arc", "ARC-Challenge", "validation"), arc_example, ("acc", "acc_norm")),
    TaskSpec(ZeroShotTask.PIQA, "piqa/validation.jsonl", ("baber/piqa", None, "validation"), piqa_example,
             ("acc", "acc_norm")),
    TaskSpec(ZeroShotTask.HELLASWAG, "hellaswag/validation_olmes_subsample1000.jsonl",
             ("Rowan/hellaswag", None, "validation"), hellaswag_example, ("acc", "acc_norm")),
    TaskSpec(ZeroShotTask.BOOLQ, "boolq/validation.jsonl", ("google/boolq", None, "validation"), boolq_example,
             ("acc",)),
    TaskSpec(ZeroShotTask.WINOGRANDE, "winogrande/validation.jsonl",
             ("allenai/winogrande", "winogrande_xl", "validation"), winogrande_example, ("acc",)),
)}


@dataclass(frozen=True)
class TaskRef:
    """A task named on the command line, optionally with its own data file (``task=PATH``)."""

    name: str
    path: str | None = None


@dataclass
class TaskData:
    name: str
    source: str  # the file or hub dataset the examples came from
    examples: list[Example]
    metrics: tuple[str, ...]


def parse_tasks(text: str) -> list[TaskRef]:
    """``"arc_easy,piqa=my.jsonl"`` → task references; ``all`` expands to the six tasks."""
    refs: list[TaskRef] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, _, path = item.partition("=")
        name = name.strip()
        if name == ALL_TASKS and not path:
            refs.extend(TaskRef(task.value) for task in TASKS)
            continue
        if name not in TASKS:
            raise DataError(f"unknown task {name!r}; use one or more of {', '.join(TASKS)} or {ALL_TASKS} "
                            f"(comma separated, task=PATH for a local file)")
        refs.append(TaskRef(name, path.strip() or None))
    if not refs:
        raise DataError(f"no task given in {text!r}; use e.g. --tasks arc_easy,piqa or --tasks all")
    return refs


def task_records(path: Path) -> Iterator[tuple[str, dict]]:
    """``(location, record)`` pairs of a .jsonl (location ``file:line``) or a .json list (``file: record N``)."""
    try:
        yield from _task_records(path)
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text; task files are JSON lines") from None


def _task_records(path: Path) -> Iterator[tuple[str, dict]]:
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records or a .jsonl file")
        yield from ((f"{path}: record {i}", rec) for i, rec in enumerate(data, 1))
        return
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None


def _hub_records(spec: TaskSpec) -> Iterator[tuple[str, dict]]:
    hub_path, config, split = spec.hub
    try:
        import datasets
    except ImportError:
        raise DataError(f"loading {spec.name} from the hub needs `pip install -e \".[hub]\"` (or set QUIKFT_DATA "
                        f"to a local data folder, or pass {spec.name}=PATH)") from None
    try:
        dataset = datasets.load_dataset(hub_path, config, split=split)
    except Exception as err:  # network or hub errors come in many types
        raise DataError(f"cannot load {hub_path} split {split} from the hub ({type(err).__name__}); "
                        f"set QUIKFT_DATA to a local data folder or pass {spec.name}=PATH") from None
    yield from ((f"{hub_path} row {i}", dict(rec)) for i, rec in enumerate(dataset))


def task_source(ref: TaskRef) -> Path | None:
    """The local file for a task reference, or None when it comes from the hub."""
    spec = TASKS[ref.name]
    if ref.path:
        path = Path(ref.path).expanduser()
        if not path.is_file():
            raise DataError(f"{ref.name}: task file {path} does not exist")
        return path
    root = data_root()
    if root is None:
        return None
    path = root / spec.local
    if not path.is_file():
        raise DataError(f"{ref.name}: task file {path} does not exist (expected under QUIKFT_DATA={root}); "
                        f"pass {ref.name}=PATH or unset QUIKFT_DATA to use the hub")
    return path


def load_task(ref: TaskRef | str, limit: int | None = None) -> TaskData:
    """The examples of a task (the first ``limit`` of them), with a one-line error for bad records."""
    ref = TaskRef(ref) if isinstance(ref, str) else ref
    if ref.name not in TASKS:
        raise DataError(f"unknown task {ref.name!r}; use one of {', '.join(TASKS)}")
    if limit is not None and limit < 1:
        raise DataError(f"--limit must be at least 1 (got {limit})")
    spec = TASKS[ref.name]
    path = task_source(ref)
    records = task_records(path) if path is not None else _hub_records(spec)
    examples = []
    for location, record in records:
        if limit is not None and len(examples) >= limit:
            break
        examples.append(_build(spec, location, record))
    source = str(path) if path is not None else f"hub:{spec.hub[0]}"
    if not examples:
        raise DataError(f"{ref.name}: {source} has no examples")
    return TaskData(ref.name, source, examples, spec.metrics)


def _build(spec: TaskSpec, location: str, record: object) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{location}: expected a JSON object for a {spec.name} record")
    try:
        return spec.build(record)
    except KeyError as err:
        raise DataError(f"{location}: {spec.name} record has no field {err} "
                        f"(fields: {', '.join(sorted(record)) or 'none'})") from None
    except (ValueError, TypeError, IndexError, AttributeError) as err:
        raise DataError(f"{location}: malformed {spec.name} record ({err})") from None

