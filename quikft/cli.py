"""The ``quikft`` command line: each command is a thin call into a library function."""

from __future__ import annotations

import os
import sys

import click

from quikft.models import DEFAULT_MODEL

MODEL_HELP = f"Model: an alias ({DEFAULT_MODEL}, the default), a hub id or a local directory."


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
        except (DataError, ModelUnavailableError, ValueError, FileExistsError) as err:
            if os.environ.get("QUIKFT_DEBUG"):  # keep the traceback when debugging
                raise
            raise UserError(str(err)) from None

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="quikft")
def main() -> None:
    """quikft: salient-column mixed-precision quantization and GIFT-SW recovery for LLMs."""


@main.command("eval")
@click.option("--model", "model_name", default=None, help=MODEL_HELP)
@click.option("--ppl", "ppl_datasets", multiple=True, default=("wikitext2",), show_default=True,
              help="Perplexity dataset (wikitext2, ptb, c4 or a text file); repeatable.")
@click.option("--split", default="test", show_default=True, help="Split of a named dataset.")
@click.option("--seqlen", default=2048, show_default=True, help="Window length in tokens (capped at the model's).")
@click.option("--max-windows", type=int, default=None, help="Evaluate only the first N windows.")
@click.option("--window-stride", default=1, show_default=True,
              help="Evaluate every K-th window (8 gives the standard quick subset: 19 of 148).")
@click.option("--dtype", default="float32", show_default=True, help="float32, bfloat16 or float16.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="Write results as JSON.")
@_fail_cleanly
def eval_command(model_name, ppl_datasets, split, seqlen, max_windows, window_stride, dtype, device, json_path):
    """Perplexity with the paper protocol (WikiText-2 test, 2048-token windows)."""
    from quikft.atomic import write_json
    from quikft.eval import evaluate_ppl
    from quikft.models import load_model, model_label

    model, tokenizer = load_model(model_name, dtype=dtype, device=device)
    results = []
    for dataset in ppl_datasets:
        result = evaluate_ppl(model, tokenizer, dataset, seqlen, max_windows, window_stride, split,
                              model_name=model_label(model_name))
        click.echo(result.summary())
        results.append(result.to_dict())
    if json_path:
        write_json(json_path, {"model": model_label(model_name), "dtype": dtype, "ppl": results})


@main.command()
@click.argument("prompt")
@click.option("--model", "model_name", default=None, help=MODEL_HELP)
@click.option("--max-new-tokens", default=64, show_default=True)
@click.option("--temperature", default=0.0, show_default=True, help="0 means greedy decoding.")
@click.option("--chat/--raw", default=True, show_default=True,
              help="Wrap the prompt in the tokenizer's chat template when it has one.")
@click.option("--seed", default=0, show_default=True)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--device", default="cpu", show_default=True)
@_fail_cleanly
def generate(prompt, model_name, max_new_tokens, temperature, chat, seed, dtype, device):
    """Generate a continuation of PROMPT."""
    from quikft.generation import generate_text
    from quikft.models import load_model

    model, tokenizer = load_model(model_name, dtype=dtype, device=device)
    click.echo(generate_text(model, tokenizer, prompt, max_new_tokens, temperature, chat, seed))

@main.command()
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML preset (see configs/); flags given here override it.")
@click.option("--model", default=None, help=MODEL_HELP)
@click.option("--bits", type=int, default=None, help="Bit-width of the non-salient weights: 2, 3, 4 or 8 [3].")
@click.option("--salient", type=int, default=None, help="FP16 input columns kept per linear layer [128].")
@click.option("--metric", default=None, help="Saliency metric: gift, quik, owq, wanda or custom [gift].")
@click.option("--tau", type=float, default=None, help="Metric: norm of the weight error D_j (inf allowed).")
@click.option("--rho", type=float, default=None, help="Metric: norm of the input column X_j (1, 2 or inf).")
@click.option("--gamma", type=float, default=None, help="Metric: exponent on ||X_j||.")
@click.option("--method", type=click.Choice(["gptq", "rtn"]), default=None, help="[gptq]")
@click.option("--group-size", type=int, default=None, help="Columns per scale; -1 = per row [128].")
@click.option("--sym/--asym", default=None, help="Symmetric or asymmetric grid [asym].")
@click.option("--act-order/--no-act-order", default=None, help="GPTQ column order by Hessian diagonal [on].")
@click.option("--clip-search/--no-clip-search", default=None, help="Search the clipping range per row [on].")
@click.option("--calib", default=None, help="Calibration data: c4, wikitext2, a name or a file [c4].")
@click.option("--nsamples", type=int, default=None, help="Calibration windows [128].")
@click.option("--seqlen", type=int, default=None, help="Tokens per calibration window [512].")
@click.option("--seed", type=int, default=None, help="[0]")
@click.option("--batch-size", type=int, default=None, help="Calibration windows per block forward [8].")
@click.option("--device", default=None, help="Where each block is quantized: cpu or cuda [cpu].")
@click.option("--out", default=None, help="Output directory [runs/<model>-w<bits>-k<salient>-<method>].")
@click.option("--fake-quant/--packed", default=None,
              help="Save dequantized float weights (a debugging format) instead of the packed checkpoint [packed].")
@click.option("--eval-windows", type=int, default=None,
              help="Quick WikiText-2 ppl on the first N windows of the stride-8 subset (19 = all of it; 0 = skip) [4].")
@_fail_cleanly
def quantize(config_path, **flags):
    """Quantize a model: salient columns in FP16, the rest with GPTQ (or RTN)."""
    from quikft.config import QuantConfig, build_config
    from quikft.quantize import quantize as run_quantize

    config = build_config(QuantConfig, config_path, **flags)
    report = run_quantize(config)
    click.echo(f"quantized {report['config']['model'] or 'smollm2-135m'} to {config.bits} bits with "
               f"{config.salient} salient columns ({report['salient_fraction']:.1%} of inputs) in "
               f"{report['quantize_seconds']:.0f}s, peak RSS {report['peak_rss_mb']:.0f} MiB -> {report['out']}")
    if report["ppl"]:
        click.echo(f"wikitext2 ppl ({report['ppl']['windows']} windows x {report['ppl']['seqlen']}): "
                   f"FP {report['fp_ppl']['ppl']:.3f} -> quantized {report['ppl']['ppl']:.3f}")


def _not_built(name: str, issue: str):
    @main.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                  help=f"(not built yet: {issue})")
    def command():
        click.echo(f"quikft {name}: not built yet ({issue}).", err=True)
        sys.exit(2)

    return command


recover = _not_built("recover", "GIFT-SW recovery fine-tuning lands with the recover issue")


@main.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the full summary (every layer) as JSON.")
@_fail_cleanly
def info(directory, as_json):
    """Show a packed checkpoint's settings, size, compression and salient fractions."""
    import json

    from quikft.checkpoint import describe, format_description

    summary = describe(directory)
    click.echo(json.dumps(summary, indent=2) if as_json else format_description(summary))


if __name__ == "__main__":
    main()
