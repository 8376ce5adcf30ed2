"""The ``quikft`` command line: each command is a thin call into a library function."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

import click

from quikft.config import BITS, Choice, QuantizeJob, setting_field
from quikft.eval.results import EvalBackend
from quikft.eval.tasks import ALL_TASKS, ZeroShotTask
from quikft.models import DEFAULT_MODEL
from quikft.recovery.config import RECOVER_DTYPES, RecoverConfig
from quikft.recovery.loss import Loss
from quikft.recovery.modes import MODES
from quikft.recovery.sharding import Sharding

MODEL_HELP = f"Model: an alias ({DEFAULT_MODEL}, the default), a hub id or a local directory."


def spoken(names: Sequence[object]) -> str:
    """``a, b or c``: a list of names as help text says it."""
    words = [str(name) for name in names]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _default_text(decl: str, default: Any) -> str | None:
    """How help shows a setting's default: the value; on/off, or the chosen name, for a flag pair;
    nothing for None, an empty list or a lone flag."""
    if isinstance(default, bool):
        if "/" not in decl:
            return None
        on, off = decl.split("/")
        if off == on.replace("--", "--no-", 1):
            return "on" if default else "off"
        return (on if default else off).removeprefix("--")
    return None if default in (None, ()) else str(default)


def setting_option(config_cls: type, decl: str, help: str = "", *, default_text: str | None = None,
                   click_choice: bool = True) -> Callable:
    """A click option for the setting of ``config_cls`` that ``decl`` names (``--dtype-rest``, ``--sym/--asym``).

    The setting's field is the one source: its type gives the option's type (a :class:`Choice` gives
    ``click.Choice`` of its names, which ``{choices}`` in ``help`` also spells), and its default ends
    the help as ``[default]`` (or ``default_text``). The option's own default is None, so a value
    from a YAML preset stands unless the flag is given. ``click_choice=False`` leaves the check to
    the config (a one-line error instead of click's usage error)."""
    item, kind = setting_field(config_cls, decl.split("/")[0].removeprefix("--").replace("-", "_"))
    if isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind):
        kind = next(option for option in typing.get_args(kind) if option is not type(None))
    attrs: dict[str, Any] = {}
    if isinstance(kind, type) and issubclass(kind, Choice):
        help = help.replace("{choices}", spoken(kind.names()))
        if click_choice:
            attrs["type"] = click.Choice(kind.names())
    elif kind in (int, float):
        attrs["type"] = kind
    elif kind is bool and "/" not in decl:
        attrs["is_flag"] = True
    elif typing.get_origin(kind) is tuple:
        attrs["multiple"] = True
    default = None if item.default is dataclasses.MISSING else item.default
    shown = default_text or _default_text(decl, default)
    if shown:
        help = f"{help.removesuffix('.')} [{shown}]." if help.endswith(".") else f"{help} [{shown}]".lstrip()
    return click.option(decl, default=None, help=help, **attrs)


def quantize_option(decl: str, help: str = "", **kwargs: Any) -> Callable:
    return setting_option(QuantizeJob, decl, help, **kwargs)


class UserError(click.ClickException):
    """A one-line error for bad input; click prints it and exits 1."""


def _fail_cleanly(func):
    """Turn the library's input errors into one-line CLI errors instead of tracebacks."""
    import functools

    from quikft.data import DataError
    from quikft.models import ModelUnavailableError

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (DataError, ModelUnavailableError, ValueError, FileExistsError, FileNotFoundError) as err:
            if os.environ.get("QUIKFT_DEBUG"):  # keep the traceback when debugging
                raise
            raise UserError(str(err)) from None

    return wrapper


TRUST_HELP = "Run Python code shipped with the model (transformers' trust_remote_code); only for models you trust."


def trust_remote_code_option(func):
    return click.option("--trust-remote-code", is_flag=True, default=None, help=TRUST_HELP)(func)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="quikft")
def main() -> None:
    """quikft: salient-column mixed-precision quantization and GIFT-SW recovery for LLMs."""
    from quikft.atomic import handle_sigterm_as_interrupt

    handle_sigterm_as_interrupt()  # a terminated run cleans up its temporary outputs like Ctrl-C


@main.command("eval")
@click.option("--model", "model_name", default=None, help=MODEL_HELP)
@click.option("--ppl", "ppl_datasets", multiple=True,
              help="Perplexity dataset (wikitext2, ptb, c4 or a text file); repeatable. "
                   "[wikitext2 when --tasks is not given]")
@click.option("--tasks", default=None,
              help=f"Zero-shot tasks, comma separated: {', '.join(ZeroShotTask.names())} or {ALL_TASKS}; "
                   f"task=PATH reads that task from a jsonl file.")
@click.option("--limit", type=int, default=None, help="Zero-shot: evaluate only the first N examples of each task.")
@click.option("--batch-size", default=16, show_default=True, help="Zero-shot: sequences per forward pass.")
@click.option("--backend", type=click.Choice(EvalBackend.names()), default=EvalBackend.NATIVE.value, show_default=True,
              help="Zero-shot scorer: ours, or lm-evaluation-harness on the same model (needs the [eval] extra).")
@click.option("--split", default="test", show_default=True, help="Split of a named dataset.")
@click.option("--seqlen", default=2048, show_default=True, help="Window length in tokens (capped at the model's).")
@click.option("--max-windows", type=int, default=None, help="Evaluate only the first N windows.")
@click.option("--window-stride", default=1, show_default=True,
              help="Evaluate every K-th window (8 gives the standard quick subset: 19 of 148).")
@click.option("--dtype", default="auto", show_default=True,
              help="auto (bfloat16 where the device runs it natively, else float32), float32, bfloat16 or float16.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda when present), cpu or cuda.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write results as JSON.")
@click.option("--cache-dequantized", is_flag=True,
              help="Packed models: dequantize each layer once and keep it (much faster zero-shot scoring, "
                   "one more full-precision weight copy in memory).")
@trust_remote_code_option
@_fail_cleanly
def eval_command(model_name, ppl_datasets, tasks, limit, batch_size, backend, split, seqlen, max_windows,
                 window_stride, dtype, device, json_path, cache_dequantized, trust_remote_code):
    """Perplexity with the paper protocol (WikiText-2 test, 2048-token windows) and zero-shot tasks."""
    from quikft.atomic import check_file_output, write_json
    from quikft.data import check_source
    from quikft.eval import PplTask, ZeroShotSettings, evaluate_tasks, parse_tasks, task_ppl
    from quikft.eval.ppl import require_finite
    from quikft.eval.zeroshot import format_table
    from quikft.hardware import resolve_device, resolve_dtype
    from quikft.models import load_model, model_label

    # Bad task names, data, dtype or --json fail before the model loads.
    refs = parse_tasks(tasks) if tasks else []
    if not ppl_datasets and not refs:
        ppl_datasets = ("wikitext2",)
    for dataset in ppl_datasets:
        check_source(dataset, "--ppl")
    if json_path:
        check_file_output(json_path, "--json")
    device = resolve_device(device)
    choice = resolve_dtype(dtype, device)
    label = model_label(model_name)
    model, tokenizer = load_model(model_name, dtype=choice.dtype, device=device,
                                  trust_remote_code=bool(trust_remote_code))
    if cache_dequantized:
        from quikft.nn import set_dequantized_cache

        set_dequantized_cache(model)
    results = []
    for dataset in ppl_datasets:
        task = PplTask(dataset, seqlen, max_windows, window_stride, split)
        result = require_finite(task_ppl(model, tokenizer, task, model_name=label))
        click.echo(result.summary())
        results.append(result.to_dict())
    settings = ZeroShotSettings(limit, batch_size, backend, model_name=label)
    task_results = evaluate_tasks(model, tokenizer, refs, settings) if refs else []
    table = [{"task": r["dataset"], "metric": "ppl", "value": r["ppl"], "stderr": None, "n": r["windows"]}
             for r in results] + [row for r in task_results for row in r.rows()]
    if refs:
        click.echo(format_table(table))
    if json_path:
        from quikft.nn import kernel_counts

        report = {"job": "eval", "model": label, "dtype": choice.name, "compute_dtype": choice.to_dict(),
                  "device": device, "kernels": kernel_counts(model), "ppl": results}
        if refs:
            report.update(backend=backend, limit=limit, tasks=[r.to_dict() for r in task_results], table=table)
        write_json(json_path, report)


@main.command()
@click.argument("prompt")
@click.option("--model", "model_name", default=None, help=MODEL_HELP)
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 means greedy decoding.")
@click.option("--chat/--raw", default=True, show_default=True,
              help="Wrap the prompt in the tokenizer's chat template when it has one.")
@click.option("--seed", default=0, show_default=True)
@click.option("--dtype", default="auto", show_default=True,
              help="auto (bf16 where the device runs it natively, else float32), float32, bfloat16 or float16.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda when present), cpu or cuda.")
@trust_remote_code_option
@_fail_cleanly
def generate(prompt, model_name, max_new_tokens, temperature, chat, seed, dtype, device, trust_remote_code):
    """Generate a continuation of PROMPT."""
    from quikft.generation import GenerationRequest, generate_text
    from quikft.hardware import check_device
    from quikft.models import load_model

    request = GenerationRequest(prompt, max_new_tokens, temperature, chat, seed)
    request.check()
    check_device(device)
    model, tokenizer = load_model(model_name, dtype=dtype, device=device, trust_remote_code=bool(trust_remote_code))
    click.echo(generate_text(model, tokenizer, request))

@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML preset (see configs/); flags given here override it.")
@quantize_option("--model", MODEL_HELP)
@quantize_option("--bits", f"Bit-width of the non-salient weights: {spoken(BITS)}.")
@quantize_option("--salient", "FP16 input columns kept per linear layer: a count, or a fraction of each layer's "
                              "inputs (3% or 0.03).")
@quantize_option("--target-bpw", "Bits-per-weight budget of the linear layers: bits (2-8) and salient columns (0-64) "
                                 "are chosen per layer from measured errors; replaces --bits and --salient.")
@quantize_option("--bpw-error", "What --target-bpw minimises: each layer's output error weighed by the loss's "
                                "sensitivity to that layer (fisher), relative to its output energy, or absolute.")
# The config's check gives an unknown metric its one-line error (the names also come from a YAML preset).
@quantize_option("--metric", "Saliency metric: {choices}.", click_choice=False)
@quantize_option("--tau", "Metric: norm of the weight error D_j (inf allowed).")
@quantize_option("--rho", "Metric: norm of the input column X_j (1, 2 or inf).")
@quantize_option("--gamma", "Metric: exponent on ||X_j||.")
@quantize_option("--method")
@quantize_option("--group-size", "Columns per scale; -1 = per row.")
@quantize_option("--sym/--asym", "Symmetric or asymmetric grid.")
@quantize_option("--act-order/--no-act-order", "GPTQ column order by Hessian diagonal.")
@quantize_option("--clip-search/--no-clip-search", "Search the clipping range per row.")
@quantize_option("--calib", "Calibration data: c4, wikitext2, a name or a file.")
@quantize_option("--nsamples", "Calibration windows.")
@quantize_option("--seqlen", "Tokens per calibration window.")
@quantize_option("--seed")
@quantize_option("--batch-size", "Calibration windows per block forward.")
@quantize_option("--device", "Where each block is quantized: auto (cuda when present), cpu, cuda or cuda:N.")
@quantize_option("--targets", "Quantize only modules whose full name matches this glob (e.g. '*.mlp.*'); repeatable.",
                 default_text="all")
@quantize_option("--ignore", "Keep modules whose full name matches this glob in full precision; repeatable.")
@quantize_option("--quantize-lm-head/--no-quantize-lm-head",
                 "Also quantize the output layer (a tied one is untied; the embedding stays FP).")
@quantize_option("--expert-min-tokens", "MoE: an expert routed fewer calibration tokens takes statistics from all "
                                        "tokens of its layer.")
@quantize_option("--offload-activations", "Where calibration activations wait between blocks: on the compute device, "
                                          "in host memory, or in files beside --out.")
@quantize_option("--resume", "Continue an interrupted quantize from its state (<out>.quantize-state) with the same "
                             "settings.")
@quantize_option("--out", "Output directory.", default_text="runs/<model>-w<bits>-k<salient>-<method>")
@quantize_option("--overwrite", "Replace a previous quantize output at --out.")
@quantize_option("--fake-quant/--packed", "Save dequantized float weights (a debugging format) instead of the packed "
                                          "checkpoint.")
@quantize_option("--eval-windows", "Quick WikiText-2 ppl on the first N windows of the stride-8 subset (19 = all of "
                                   "it; 0 = skip).")
@quantize_option("--dtype-rest", "Dtype of the unquantized tensors (embeddings, norms, an untied head) in the "
                                 "checkpoint.")
@trust_remote_code_option
@_fail_cleanly
def quantize(config_path, targets, ignore, **flags):
    """Quantize a model: salient columns in FP16, the rest with GPTQ (or RTN)."""
    from quikft.config import QuantizeJob, build_config, salient_text
    from quikft.jobs.quantize import quantize as run_quantize

    job = build_config(QuantizeJob, config_path, targets=tuple(targets) or None, ignore=tuple(ignore) or None,
                       **flags)
    config = job.quant
    report = run_quantize(job)
    scheme = (f"{report['bits_per_weight']['linear']:.2f} bits per weight (target {config.target_bpw:g}; bits and "
              f"salient columns per layer)" if config.target_bpw is not None else
              f"{config.bits} bits with {salient_text(config.salient)} salient columns")
    click.echo(f"quantized {report['config']['model'] or 'smollm2-135m'} to {scheme} "
               f"({report['salient_fraction']:.1%} of inputs salient) in "
               f"{report['quantize_seconds']:.0f}s, peak RSS {report['peak_rss_mb']:.0f} MiB, resumable state up to "
               f"{report['state_peak_bytes'] / 2**20:.0f} MiB on disk -> {report['out']}")
    if report["ppl"]:
        saved = report.get("ppl_saved")
        note = f" ({config.dtype_rest} unquantized tensors, as saved: {saved['ppl']:.3f})" if saved else ""
        click.echo(f"wikitext2 ppl ({report['ppl']['windows']} windows x {report['ppl']['seqlen']}): "
                   f"FP {report['fp_ppl']['ppl']:.3f} -> quantized {report['ppl']['ppl']:.3f}{note}")


# --mode, --loss and --sharding: the choices and their help come from the code that implements them.
MODE_HELP = ", ".join(f"{name} = {mode.summary}" for name, mode in MODES.items()) + f" [{RecoverConfig.mode}]."
LOSS_HELP = "; ".join(f"{loss.value} = {loss.help}" for loss in Loss) + f" [{RecoverConfig.loss}]."
_SHARDABLE_MODES = "/".join(name for name, mode in MODES.items() if mode.shardable)
SHARDING_HELP = "Several processes (accelerate launch): " + "; ".join(
    f"{choice.value} {choice.help}" + (f" ({_SHARDABLE_MODES})" if choice.shards_parameters else "")
    for choice in Sharding) + f" [{RecoverConfig.sharding}]."


@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML preset (e.g. configs/gift-sw.yaml); flags override it.")
@click.option("--model", default=None,
              help="post/salient-ft/lora: a packed checkpoint from `quikft quantize`; pre: a full-precision model.")
@click.option("--mode", type=click.Choice(list(MODES)), default=None, help=MODE_HELP)
@click.option("--noise/--no-noise", default=None, help="Inject step-scaled noise [on for post/pre].")
@click.option("--noise-bits", type=int, default=None, help="Bit-width whose step scales the noise [post 4, pre --bits].")
@click.option("--bits", type=int, default=None, help="Pre mode: quantize to this many bits after training [3].")
@click.option("--salient", default=None,
              help="Pre mode: salient columns per linear, a count or a fraction of its inputs (3% or 0.03) [128].")
@click.option("--quant-config", default=None, help="Pre mode: quantize YAML preset used after training.")
@click.option("--data", multiple=True, default=None,
              help="Training data, repeatable for a mixture: alpaca, alpaca-gpt4, c4, wikitext2 or a file [alpaca, c4].")
@click.option("--loss", type=click.Choice([loss.value for loss in Loss]), default=None, help=LOSS_HELP)
@click.option("--teacher", default=None, help="KD teacher model [the model the checkpoint was quantized from].")
@click.option("--steps", type=int, default=None, help="Optimizer steps [100].")
@click.option("--batch-size", type=int, default=None, help="Rows of --seqlen tokens per micro-batch [4].")
@click.option("--grad-accum", type=int, default=None, help="Micro-batches per optimizer step [1].")
@click.option("--seqlen", type=int, default=None, help="Tokens per row [512].")
@click.option("--lr", type=float, default=None, help="AdamW learning rate, cosine schedule, 3% warmup [1e-4].")
@click.option("--max-grad-norm", type=float, default=None, help="Gradient clipping; 0 = off [1.0].")
@click.option("--dtype", type=click.Choice(RECOVER_DTYPES), default=None,
              help="Autocast dtype of the frozen weights' GEMMs; auto = bf16 where the device runs it natively, "
                   "else fp32 (trainable columns always stay fp32) [auto].")
@click.option("--bf16/--fp32", "bf16", default=None, help="Force bf16 or fp32 autocast (wins over --dtype).")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
              help="Recompute activations in backward to save memory [off].")
@click.option("--cache-base/--no-cache-base", default=None,
              help="Post modes: keep the dequantized frozen weights between steps (memory for speed) [on].")
@click.option("--lora-rank", type=int, default=None, help="Lora mode: adapter rank [64].")
@click.option("--seed", type=int, default=None, help="[0]")
@click.option("--eval-every", type=int, default=None, help="Quick ppl every N steps; 0 = only before/after [0].")
@click.option("--eval-windows", type=int, default=None,
              help="Quick WikiText-2 ppl windows of the stride-8 subset (19 = all; 0 = skip) [4].")
@click.option("--eval-before/--no-eval-before", default=None, help="Also measure the input model's ppl [on].")
@click.option("--save-every", type=int, default=None, help="Resumable state every N steps; 0 = never [0].")
@click.option("--resume", is_flag=True, default=None, help="Continue an interrupted run from its saved state.")
@click.option("--sharding", type=click.Choice([choice.value for choice in Sharding]), default=None,
              help=SHARDING_HELP)
@click.option("--device", default=None, help="auto (cuda when present), cpu or cuda [auto].")
@click.option("--out", default=None, help="Output directory [runs/<model>-<mode>].")
@click.option("--overwrite", is_flag=True, default=None, help="Replace a previous recover output at --out.")
@trust_remote_code_option
@_fail_cleanly
def recover(config_path, data, **flags):
    """Recover a quantized model with GIFT-SW: train only the salient columns, with noise on the rest."""
    from quikft.config import build_config
    from quikft.recovery import recover as run_recover
    from quikft.recovery.job import end_distributed

    config = build_config(RecoverConfig, config_path, data=tuple(data) or None, **flags)
    try:
        report = run_recover(config)
    finally:  # this process made the group (accelerate launch / torchrun); it ends with the command
        end_distributed()
    if report is None:  # not the main process of a distributed run
        return
    click.echo(f"recovered ({config.mode}, noise {report['config']['noise_bits'] or 'off'}, "
               f"{report['compute_dtype']['dtype']}) {report['trainable_params']:,} trainable parameters, "
               f"{config.steps} steps ({report['step_seconds'] or 0:.2f} s/step) -> {report['out']}")
    before, after, fp = report["ppl_before"], report["ppl_after"], report["fp_ppl"]
    if before and after:
        quantized_input = MODES[config.mode].packed_input
        label = "quantized" if quantized_input else "FP"
        line = f"wikitext2 ppl ({after['windows']} windows x {after['seqlen']}): {label} {before['ppl']:.3f}"
        if fp and quantized_input:
            line = f"{line} (FP {fp['ppl']:.3f})"
        click.echo(f"{line} -> recovered {after['ppl']:.3f}")


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the full summary (every layer) as JSON.")
@click.option("--verify", is_flag=True,
              help="Also recompute every tensor's recorded sha256 checksum (reads the whole checkpoint).")
@_fail_cleanly
def info(directory, as_json, verify):
    """Show a packed checkpoint's settings, size, compression and salient fractions.

    The checkpoint first passes every check loading makes; a checkpoint that would not load is refused."""
    import json

    from quikft.format.inspect import describe, format_description

    summary = describe(directory, verify)
    click.echo(json.dumps(summary, indent=2) if as_json else format_description(summary))


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--out", required=True, help="New directory for the converted checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace a previous convert's output in --out.")
@_fail_cleanly
def convert(directory, out, overwrite):
    """Rewrite a packed checkpoint of an older format (1) in the current one (2); the weights do not change."""
    from quikft.format.conversion import convert as run_convert
    from quikft.format.layout import FORMAT_VERSION
    from quikft.format.reader import read_quantization_config

    before = read_quantization_config(directory)["format_version"]
    run_convert(directory, out, overwrite)
    click.echo(f"converted {directory} (format {before}) -> {out} (format {FORMAT_VERSION})")


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--out", default="runs/report", show_default=True, help="Folder for report.md and the PNG plots.")
@_fail_cleanly
def report(run_dirs, out):
    """Compare runs: quantize, recover and eval reports under RUN_DIRS in one Markdown table and plots."""
    from pathlib import Path

    from quikft.eval.report import build_report

    result, notes = build_report(list(run_dirs), out)
    click.echo(result.markdown.split("\n\n![")[0].rstrip())
    for note in notes:
        click.echo(note)
    written = ["report.md"] + [p for p in ("ppl_vs_bits.png", "loss_curves.png") if f"({p})" in result.markdown]
    click.echo(f"wrote {', '.join(str(Path(out) / name) for name in written)}")


if __name__ == "__main__":
    main()
