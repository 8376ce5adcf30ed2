"""What the architecture adapter finds in each model family, and how long the tiny model takes to quantize.

For every tiny random model of ``tests/families.py`` (the families CI runs through the whole path,
plus, with ``--extra``, the slow-test ones): the block list and class, the quantizable projections of
block 0 (routers excluded, experts collapsed to ``<proj>.*``), the groups of projections found to read
one input tensor, the experts modules, and the seconds of ``quantize_model`` (3 bits, k = 8, group 32,
8 calibration windows of 32 tokens, one thread). Prints a Markdown table.

    python tools/bench_families.py [--extra] [--only mixtral]
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from benchlib import load_results, parser, run_missing  # noqa: E402
from conftest import TOKENIZER_CORPUS, build_tokenizer  # noqa: E402
from families import EXTRA_FAMILIES, FAMILIES, build_extra, build_family  # noqa: E402

from quikft import arch  # noqa: E402
from quikft.config import QuantConfig  # noqa: E402
from quikft.data import calibration_windows  # noqa: E402
from quikft.quant.model import quantize_model  # noqa: E402


def collapse(names) -> list[str]:
    """Per-expert names as one pattern each: ``mlp.experts.down_proj.*``."""
    return sorted({re.sub(r"\.\d+(?=\.|$)", ".*", name) for name in names})


def measure(name: str, model, calib: torch.Tensor) -> dict:
    layout = arch.layout(model)
    config = QuantConfig(bits=3, salient=8, group_size=32, nsamples=calib.shape[0], seqlen=calib.shape[1],
                         clip_search=False, expert_min_tokens=4)
    began = time.perf_counter()
    quantized = quantize_model(model, calib, config, progress=False, device="cpu", batch_size=4)
    seconds = time.perf_counter() - began
    block0 = layout.block_name(0)
    layers = [n.removeprefix(f"{block0}.") for n in quantized.results if n.startswith(f"{block0}.")]
    return {"row": name, "blocks": f"{layout.prefix} ({len(layout)} x {layout.block_class})",
            "layers": collapse(layers), "layers_per_block": len(layers),
            "groups": [sorted(group) for group in quantized.input_groups[block0]],
            "experts": len(quantized.experts), "seconds": seconds, "starved": len(quantized.starved())}


def table(rows: list[dict]) -> str:
    lines = ["| family | blocks | projections of block 0 | shared inputs (by identity) | quantize s |",
             "|---|---|---|---|---|"]
    for row in rows:
        groups = "; ".join("{" + ", ".join(group) + "}" for group in row["groups"]) or "none"
        layers = ", ".join(row["layers"]) + (f" ({row['layers_per_block']} layers)" if row["experts"] else "")
        lines.append(f"| {row['row']} | {row['blocks']} | {layers} | {groups} | {row['seconds']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    p = parser(__doc__.splitlines()[0], "runs/bench_families.jsonl")
    p.add_argument("--extra", action="store_true", help="also the families of the slow tests")
    args = p.parse_args()
    rows = load_results(args.results)
    if not args.table_only:
        torch.set_num_threads(1)
        tokenizer = build_tokenizer()
        corpus = Path(args.results).with_suffix(".corpus.txt")
        corpus.write_text("\n".join(TOKENIZER_CORPUS * 4) + "\n")
        calib = calibration_windows(tokenizer, str(corpus), 8, 32, 0)
        jobs = [(family.name, lambda f=family: measure(f.name, build_family(f, tokenizer), calib))
                for family in FAMILIES]
        if args.extra:
            jobs += [(name, lambda n=name: measure(n, build_extra(n, tokenizer), calib)) for name in EXTRA_FAMILIES]
        run_missing(jobs, rows, args.results, args.only, lambda row: f"{row['seconds']:.2f}s")
    print(table(rows))


if __name__ == "__main__":
    main()
