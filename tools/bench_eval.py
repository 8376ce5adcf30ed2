"""Benchmark `quikft eval`'s perplexity loop against a plain transformers forward loop.

Both run on the same model object and the same windows (by default the stride-8 WikiText-2
subset: 19 windows of 2048 tokens), one after the other, so machine load affects both alike.
The plain loop is what most GPTQ-style scripts do: ``model(ids, labels=ids).loss`` per window.
Prints a Markdown table of ppl, seconds and tokens/s. Run from the repository root:

    QUIKFT_DATA=../shared/data python tools/bench_eval.py [--model M] [--window-stride 8] [--max-windows N]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from quikft.data import eval_text, tokenize_stream
from quikft.eval.ppl import perplexity_of_ids, window_starts
from quikft.models import load_model


@torch.inference_mode()
def plain_loop(model, ids: torch.Tensor, seqlen: int, starts: list[int]) -> float:
    """The reference: full logits and the model's own loss, one window at a time."""
    nll = 0.0
    for start in starts:
        window = ids[start:start + seqlen].unsqueeze(0)
        nll += model(input_ids=window, labels=window, use_cache=False).loss.item() * (seqlen - 1)
    return nll / (len(starts) * (seqlen - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--window-stride", type=int, default=8)
    parser.add_argument("--max-windows", type=int, default=None)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    ids = tokenize_stream(tokenizer, eval_text("wikitext2", "test"), add_special_tokens=True)
    starts = window_starts(ids.numel(), args.seqlen, args.max_windows, args.window_stride)
    rows = []
    for name, run in (("quikft evaluate_ppl", lambda: perplexity_of_ids(model, ids, args.seqlen, starts, None)[0]),
                      ("plain transformers loop", lambda: plain_loop(model, ids, args.seqlen, starts))):
        began = time.perf_counter()
        nll = run()
        seconds = time.perf_counter() - began
        rows.append((name, math.exp(nll), seconds, len(starts) * args.seqlen / seconds))
    print(f"{len(starts)} windows x {args.seqlen} tokens, torch threads {torch.get_num_threads()}\n")
    print("| loop | ppl | seconds | tokens/s |\n|---|---|---|---|")
    for name, ppl, seconds, tps in rows:
        print(f"| {name} | {ppl:.4f} | {seconds:.1f} | {tps:.0f} |")


if __name__ == "__main__":
    main()
