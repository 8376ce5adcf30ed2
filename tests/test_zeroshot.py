import json
import math
import statistics

import pytest
import torch
from click.testing import CliRunner

from quikft.cli import main
from quikft.data import DataError
from quikft.eval import ZeroShotSettings, zeroshot
from quikft.eval.tasks import TASKS, Example, TaskData, TaskRef, load_task, parse_tasks
from quikft.eval.zeroshot import choice_metrics, encode_pair, evaluate_task, loglikelihoods, mean_and_stderr

HAND_MADE = TaskData("hand", "test", [
    Example.multiple_choice("The quick brown fox", ["jumps over the lazy dog.", "is blue.", "sleeps"], 0),
    Example.multiple_choice("Quantization maps weights to", ["a small set of levels.", "the dog."], 0),
    Example.partial(["Robert Boulter is an English", "Robert Boulter is a"], " film actor.", 1),
], ("acc", "acc_norm"))


def direct_score(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation token | prefix) from one full forward pass of the joined text."""
    whole = tokenizer.encode(context + continuation)
    n_context = len(tokenizer.encode(context))
    with torch.no_grad():
        logits = model(torch.tensor([whole])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(logprobs[p - 1, whole[p]].item() for p in range(n_context, len(whole)))


def test_scores_and_metrics_equal_a_direct_computation(tiny, single_thread):
    model, tokenizer = tiny
    requests = [pair for example in HAND_MADE.examples for pair in example.requests()]
    expected = [direct_score(model, tokenizer, c, x) for c, x in requests]
    got = loglikelihoods(model, tokenizer, requests, batch_size=3, progress=None)
    assert got == pytest.approx(expected, abs=1e-4)

    result = evaluate_task(model, tokenizer, HAND_MADE, ZeroShotSettings(batch_size=2, progress=False))
    per_example, offset = [], 0
    for example in HAND_MADE.examples:
        per_example.append(expected[offset:offset + len(example.contexts)])
        offset += len(example.contexts)
    pairs = list(zip(per_example, HAND_MADE.examples, strict=True))
    acc = [float(max(range(len(s)), key=s.__getitem__) == e.gold) for s, e in pairs]
    norm = [float(max(range(len(s)), key=lambda i, s=s, e=e: s[i] / e.norm_lengths[i]) == e.gold)
            for s, e in pairs]
    assert result.metrics["acc"]["value"] == pytest.approx(sum(acc) / 3)
    assert result.metrics["acc_norm"]["value"] == pytest.approx(sum(norm) / 3)
    assert result.n == 3 and result.rows()[0] == {"task": "hand", "metric": "acc", "value": result.metrics["acc"]["value"],
                                                   "stderr": result.metrics["acc"]["stderr"], "n": 3}


def test_batched_equals_unbatched_and_generic_head_path(tiny, single_thread, monkeypatch):
    model, tokenizer = tiny
    requests = [pair for example in HAND_MADE.examples for pair in example.requests()]
    one = loglikelihoods(model, tokenizer, requests, batch_size=1, progress=None)
    many = loglikelihoods(model, tokenizer, requests, batch_size=16, progress=None)
    assert many == pytest.approx(one, abs=1e-4)
    monkeypatch.setattr(zeroshot.arch, "head_path_matches", lambda m, ids: False)  # the model(...).logits path
    assert loglikelihoods(model, tokenizer, requests, batch_size=4, progress=None) == pytest.approx(one, abs=1e-4)


def test_shared_inputs_are_scored_once_and_per_continuation(tiny, single_thread):
    model, tokenizer = tiny
    context = "Perplexity is the exponential of the mean"
    requests = [(context, " no"), (context, " yes"), (context, " negative log")]
    got = loglikelihoods(model, tokenizer, requests, batch_size=2, progress=None)
    assert got == pytest.approx([direct_score(model, tokenizer, c, x) for c, x in requests], abs=1e-4)


def test_trailing_space_moves_into_the_continuation(tiny):
    _, tokenizer = tiny
    assert encode_pair(tokenizer, "Answer: ", "blue") == encode_pair(tokenizer, "Answer:", " blue")
    context_ids, continuation_ids = encode_pair(tokenizer, "The quick brown", " fox")
    assert context_ids + continuation_ids == tokenizer.encode("The quick brown fox")


def test_metrics_use_choice_length_and_sample_stderr():
    examples = [Example.multiple_choice("q", ["a", "bbbbbbbbbb"], 1), Example.multiple_choice("q", ["a", "b"], 0)]
    metrics = choice_metrics(examples, [[-1.0, -5.0], [-2.0, -1.0]])
    assert metrics["acc"]["value"] == 0.0  # argmax picks "a" then "b"
    assert metrics["acc_norm"]["value"] == 0.5  # -5/10 beats -1/1 in the first example
    values = [1.0, 0.0, 1.0, 1.0]
    assert mean_and_stderr(values)["stderr"] == pytest.approx(statistics.stdev(values) / math.sqrt(4))
    assert mean_and_stderr([1.0])["stderr"] is None


# ---------------------------------------------------------------------------- loaders

RECORDS = {
    "arc_easy": {"id": "x", "question": "Which is a gas?", "answerKey": "2",
                 "choices": {"text": ["rock", "air", "wood"], "label": ["1", "2", "3"]}},
    "piqa": {"goal": "Dry a towel.", "sol1": "Hang it up.", "sol2": "Put it in water.", "label": 0},
    "boolq": {"question": "is the sky blue", "answer": True, "passage": "The sky is blue."},
    "winogrande": {"sentence": "The cup fell off the table because _ was tilted.", "option1": "the cup",
                   "option2": "the table", "answer": "2"},
    "hellaswag": {"ind": 1, "query": "Cooking: A man cracks an egg.", "choices": ["He eats.", "It flies."], "gold": 0},
}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("name", list(RECORDS))
def test_each_loader_reads_its_schema(name, tmp_path):
    path = write_jsonl(tmp_path / f"{name}.jsonl", [RECORDS[name]] * 3)
    task = load_task(TaskRef(name, str(path)), limit=2)
    assert len(task.examples) == 2 and task.source == str(path) and task.metrics == TASKS[name].metrics
    example = task.examples[0]
    expected = {
        "arc_easy": ("Question: Which is a gas?\nAnswer:", (" rock", " air", " wood"), 1),
        "piqa": ("Question: Dry a towel.\nAnswer:", (" Hang it up.", " Put it in water."), 0),
        "boolq": ("The sky is blue.\nQuestion: is the sky blue?\nAnswer:", (" no", " yes"), 1),
        "hellaswag": ("Cooking: A man cracks an egg.", (" He eats.", " It flies."), 0),
    }
    if name in expected:
        context, continuations, gold = expected[name]
        assert example.contexts == (context,) * len(continuations)
        assert (example.continuations, example.gold) == (continuations, gold)


def test_winogrande_partial_scoring_split():
    example = load_task_from(RECORDS["winogrande"], "winogrande")
    assert example.contexts == ("The cup fell off the table because the cup",
                                "The cup fell off the table because the table")
    assert example.continuations == (" was tilted.", " was tilted.") and example.gold == 1


def test_hellaswag_raw_schema_is_preprocessed_like_lm_eval():
    raw = {"activity_label": "Making a cake", "ctx_a": "[header] How to bake.", "ctx_b": "then [title] mix",
           "endings": ["the  flour [step] well.", "a dog."], "label": "1"}
    example = load_task_from(raw, "hellaswag")
    assert example.contexts[0] == "Making a cake: How to bake. Then. mix"
    assert example.continuations == (" the flour well.", " a dog.") and example.gold == 1
    assert example.norm_lengths == (len("the flour well."), len("a dog."))


def load_task_from(record, name):
    from quikft.eval.tasks import _build

    return _build(TASKS[name], "fixture", record)


def test_bad_task_files_name_the_file_and_line(tmp_path):
    with pytest.raises(DataError, match=r"arc_easy: task file .*nope.jsonl does not exist"):
        load_task(TaskRef("arc_easy", str(tmp_path / "nope.jsonl")))
    bad = tmp_path / "piqa.jsonl"
    bad.write_text(json.dumps(RECORDS["piqa"]) + "\n{not json\n")
    with pytest.raises(DataError, match=rf"^{bad}:2: not valid JSON"):
        load_task(TaskRef("piqa", str(bad)))
    write_jsonl(bad, [RECORDS["piqa"], RECORDS["piqa"], {"goal": "g", "sol1": "a", "label": 0}])
    with pytest.raises(DataError, match=rf"^{bad}:3: piqa record has no field 'sol2'"):
        load_task(TaskRef("piqa", str(bad)))
    wino = write_jsonl(tmp_path / "w.jsonl", [dict(RECORDS["winogrande"], answer="3")])
    with pytest.raises(DataError, match=rf"^{wino}:1: malformed winogrande record"):
        load_task(TaskRef("winogrande", str(wino)))


def test_json_list_files_are_read_too(tmp_path):
    path = tmp_path / "piqa.json"
    path.write_text(json.dumps([RECORDS["piqa"], {"goal": "g"}]))
    with pytest.raises(DataError, match=rf"^{path}: record 2: piqa record has no field 'sol1'"):
        load_task(TaskRef("piqa", str(path)))
    assert len(load_task(TaskRef("piqa", str(path)), limit=1).examples) == 1


def test_missing_file_under_quikft_data_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("QUIKFT_DATA", str(tmp_path))
    with pytest.raises(DataError, match="boolq: task file .*boolq/validation.jsonl does not exist"):
        load_task("boolq")


def test_parse_tasks():
    assert [r.name for r in parse_tasks("all")] == list(TASKS)
    assert parse_tasks("arc_easy, piqa=/x/p.jsonl") == [TaskRef("arc_easy"), TaskRef("piqa", "/x/p.jsonl")]
    with pytest.raises(DataError, match="unknown task 'mmlu'"):
        parse_tasks("arc_easy,mmlu")


COUNTS = {"arc_easy": 570, "arc_challenge": 299, "piqa": 1838, "hellaswag": 1000, "boolq": 2000, "winogrande": 1267}


@pytest.mark.parametrize("name", list(COUNTS))
def test_shared_task_files_load_completely(name, shared_data):
    if not (shared_data / TASKS[name].local).exists():
        pytest.skip(f"{TASKS[name].local} is not in {shared_data}")
    task = load_task(name)
    assert len(task.examples) == COUNTS[name]
    assert all(0 <= e.gold < len(e.contexts) for e in task.examples)


# ---------------------------------------------------------------------------- CLI and lm-eval

def test_cli_eval_tasks_prints_table_and_writes_json(tiny_dir, tmp_path):
    out = tmp_path / "zs.json"
    arc = write_jsonl(tmp_path / "arc.jsonl", [RECORDS["arc_easy"]] * 4)
    args = ["eval", "--model", str(tiny_dir), "--tasks", f"arc_easy={arc},winogrande", "--limit", "3",
            "--json", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["ppl"] == []  # --tasks without --ppl runs no perplexity
    assert [(t["task"], t["n"]) for t in report["tasks"]] == [("arc_easy", 3), ("winogrande", 3)]
    assert [(r["task"], r["metric"]) for r in report["table"]] == [
        ("arc_easy", "acc"), ("arc_easy", "acc_norm"), ("winogrande", "acc")]
    assert "torch" in report["tasks"][0]["versions"] and report["tasks"][0]["seconds"] > 0
    assert "arc_easy" in result.output and "acc_norm" in result.output


def test_cli_eval_defaults_to_wikitext2_ppl_and_combines_with_tasks(tiny_dir, tmp_path, shared_data):
    out = tmp_path / "ppl.json"
    small = ["--seqlen", "32", "--max-windows", "1", "--json", str(out)]
    result = CliRunner().invoke(main, ["eval", "--model", str(tiny_dir), *small])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert [p["dataset"] for p in report["ppl"]] == ["wikitext2"] and "tasks" not in report
    arc = write_jsonl(tmp_path / "arc.jsonl", [RECORDS["arc_easy"]] * 2)
    result = CliRunner().invoke(main, ["eval", "--model", str(tiny_dir), "--ppl", "wikitext2", "--tasks",
                                       f"arc_easy={arc}", *small])
    assert result.exit_code == 0, result.output
    table = json.loads(out.read_text())["table"]
    assert [(r["task"], r["metric"], r["n"]) for r in table] == [
        ("wikitext2", "ppl", 1), ("arc_easy", "acc", 2), ("arc_easy", "acc_norm", 2)]


def test_cli_eval_bad_task_is_one_line_error(tiny_dir):
    result = CliRunner().invoke(main, ["eval", "--model", str(tiny_dir), "--tasks", "arc_easy,nope"])
    assert result.exit_code == 1 and result.output.startswith("Error: unknown task 'nope'")
    assert result.output.count("\n") == 1


def test_lm_eval_backend_without_the_extra_says_how_to_install(monkeypatch):
    import sys

    from quikft.eval.lm_eval_backend import MissingExtraError, require_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` fail
    with pytest.raises(MissingExtraError, match=r'pip install -e "\.\[eval\]"'):
        require_lm_eval()


def test_lm_eval_backend_agrees_with_native_on_tiny_model(tiny, tmp_path, single_thread):
    pytest.importorskip("lm_eval")
    from quikft.eval.lm_eval_backend import evaluate_tasks_lm_eval

    model, tokenizer = tiny
    records = [RECORDS["arc_easy"], dict(RECORDS["arc_easy"], answerKey="1"), dict(RECORDS["arc_easy"], answerKey="3")]
    refs = [TaskRef("arc_easy", str(write_jsonl(tmp_path / "arc.jsonl", records))),
            TaskRef("boolq", str(write_jsonl(tmp_path / "boolq.jsonl", [RECORDS["boolq"]] * 2)))]
    theirs = evaluate_tasks_lm_eval(model, tokenizer, refs, ZeroShotSettings(limit=3, batch_size=4))
    ours = zeroshot.evaluate_tasks(model, tokenizer, refs, ZeroShotSettings(limit=3, batch_size=4, progress=False))
    for a, b in zip(ours, theirs, strict=True):
        assert (a.task, a.n) == (b.task, b.n) and b.backend == "lm-eval"
        for metric in a.metrics:
            assert a.metrics[metric]["value"] == pytest.approx(b.metrics[metric]["value"])
