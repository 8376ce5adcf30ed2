"""Accuracy per bit: WikiText-2 perplexity against bits per weight for fixed settings and --target-bpw.

Each row is one ``quikft quantize`` run of the default model (or ``--model``) whose built-in
evaluation covers the 19 stride-8 WikiText-2 windows; the row records the checkpoint's bits per
weight (quantized linear layers and whole model, counted from the written files), the perplexity of
the model as saved, and the quantize time (the --target-bpw measurement pass included). Rows are
appended to a JSONL file as they finish, so an interrupted benchmark resumes; the table marks the
Pareto frontier (no other row has both fewer bits and a lower perplexity).

    QUIKFT_DATA=../shared/data python tools/bench_pareto.py --nsamples 32            # every row
    QUIKFT_DATA=../shared/data python tools/bench_pareto.py --only target --table-only

CPU capability (``torch.backends.cpu.get_cpu_capability()``) and thread count are recorded per row.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REPORT = "quantize_report.json"


def rows() -> list[tuple[str, list[str]]]:
    """(row id, quantize flags): the issue's grid, the rows between 3 and 4.5 bits per weight first (a
    partial run then already answers which setting to use there)."""
    grid = {f"gptq-w{b}-k{k}": ["--bits", str(b), "--salient", str(k)] for b in (2, 3, 4, 8) for k in (0, 16, 32, 64, 128)
            if b != 8 or k == 0}
    grid.update({f"rtn-w{b}-k0": ["--method", "rtn", "--bits", str(b), "--salient", "0"] for b in (2, 3, 4, 8)})
    grid.update({f"target-{t}": ["--target-bpw", str(t)] for t in (2.5, 3.0, 3.5, 4.0, 4.5, 5.0)})
    # the other error the budget can minimise, to compare the two (quikft.quant.budget)
    grid.update({f"target-relative-{t}": ["--target-bpw", str(t), "--bpw-error", "relative"] for t in (3.0, 4.0)})
    first = ["target-4.0", "gptq-w4-k0", "gptq-w3-k0", "target-3.0", "target-3.5", "target-4.5", "gptq-w3-k16",
             "gptq-w3-k32", "gptq-w4-k16", "gptq-w3-k128", "target-relative-3.0", "target-relative-4.0",
             "gptq-w2-k0", "gptq-w8-k0", "target-2.5", "target-5.0"]
    return [(row, grid[row]) for row in first] + [(row, flags) for row, flags in grid.items() if row not in first]


def run_row(row_id: str, flags: list[str], args) -> dict:
    """Quantize (no built-in evaluation: its two streams through every block cost more than one pass of
    the packed model), then evaluate the checkpoint (:func:`_quantize_and_evaluate`)."""
    out = Path(args.workdir) / row_id
    model = ["--model", args.model] if args.model else []
    quantize = [sys.executable, "-m", "quikft.cli", "quantize", *flags, *model, "--nsamples", str(args.nsamples),
                "--eval-windows", "0", "--out", str(out), "--overwrite"]
    wall = _quantize_and_evaluate(quantize, out, Path(args.workdir) / f"{row_id}.log")
    report = json.loads((out / REPORT).read_text())
    evaluation = json.loads((out / "eval.json").read_text())
    plan = report.get("target_bpw") or {}
    return {"row": row_id, "flags": flags, "nsamples": args.nsamples,
            "linear_bpw": report["bits_per_weight"]["linear"], "model_bpw": report["bits_per_weight"]["model"],
            "ppl": _wikitext2_ppl(evaluation),
            "quantize_seconds": report["quantize_seconds"] + plan.get("measure_seconds", 0.0),
            "measure_seconds": plan.get("measure_seconds"), "wall_seconds": wall,
            "cpu": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "chosen": _chosen(plan)}


def run_budget_row(row_id: str, error: str, target: float, args) -> dict:
    """A --target-bpw row planned from the candidates another budget row measured (the measurement does
    not depend on the budget or the error, so one pass serves every budget): the in-memory quantization
    with that plan (a subprocess of this script), then the same evaluation as every row."""
    out = Path(args.workdir) / row_id
    source = Path(args.workdir) / args.measured_by / REPORT
    command = [sys.executable, str(Path(__file__).resolve()), "--quantize-with-plan", str(source), error,
               str(target), str(out)]
    wall = _quantize_and_evaluate(command, out, Path(args.workdir) / f"{row_id}.log")
    plan = json.loads((out / "plan.json").read_text())
    measure = json.loads(source.read_text())["target_bpw"]["measure_seconds"]
    counted = json.loads((out / "bits.json").read_text())
    return {"row": row_id, "flags": ["--target-bpw", str(target), "--bpw-error", error],
            "nsamples": args.nsamples, "linear_bpw": counted["linear"], "model_bpw": counted["model"],
            "ppl": _wikitext2_ppl(json.loads((out / "eval.json").read_text())),
            "quantize_seconds": plan["quantize_seconds"] + measure, "measure_seconds": measure,
            "wall_seconds": wall, "cpu": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "chosen": _chosen(plan), "measured_by": args.measured_by}


def quantize_with_plan(source: str, error: str, target: float, out: str) -> None:
    """In-memory quantization of the default model with a plan made from ``source``'s measured candidates."""
    from quikft.checkpoint import save_packed, stored_bits
    from quikft.config import QuantConfig
    from quikft.data import calibration_windows
    from quikft.models import load_model
    from quikft.quant.budget import plan_budget
    from quikft.quant.model import quantize_model

    report = json.loads(Path(source).read_text())
    settings = {k: v for k, v in report["config"].items() if k in QuantConfig.__dataclass_fields__}
    config = QuantConfig(**{**settings, "target_bpw": target, "bpw_error": error})
    model, tokenizer = load_model(report["config"]["model"], dtype=torch.float32)
    measured = {name: [{"bits": b, "salient": k, "storage": st, "loss": loss, "energy": energy,
                        **({"fisher": fisher[0]} if fisher else {}), "weights": _weights(model.get_submodule(name))}
                       for b, k, st, loss, energy, *fisher in rows]
                for name, rows in report["target_bpw"]["candidates"].items()}
    plan = plan_budget(measured, config)
    calib = calibration_windows(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed)
    began = time.perf_counter()
    quantized = quantize_model(model, calib, config, progress=False, plan=plan)
    plan["quantize_seconds"] = time.perf_counter() - began
    save_packed(model, tokenizer, quantized, out, config)
    (Path(out) / "plan.json").write_text(json.dumps({k: v for k, v in plan.items() if k != "candidates"}))
    (Path(out) / "bits.json").write_text(json.dumps(stored_bits(out).to_dict()))


def _weights(linear) -> int:
    return linear.in_features * linear.out_features


def _wikitext2_ppl(evaluation: dict) -> float:
    return float(next(r["ppl"] for r in evaluation["ppl"] if r["dataset"] == "wikitext2"))


def _quantize_and_evaluate(quantize: list[str], out: Path, log_path: Path) -> float:
    """Run a row's quantize command, then evaluate ``out`` with the exact reference kernel (so the ppl is
    the method's, not a kernel's activation rounding); returns the quantize command's wall seconds."""
    evaluate = [sys.executable, "-m", "quikft.cli", "eval", "--model", str(out), "--ppl", "wikitext2",
                "--window-stride", "8", "--json", str(out / "eval.json")]
    with open(log_path, "w") as log:
        began = time.perf_counter()
        subprocess.run(quantize, cwd=REPO, env=benchlib.child_env(REPO), stdout=log, stderr=subprocess.STDOUT,
                       check=True)
        wall = time.perf_counter() - began
        subprocess.run(evaluate, cwd=REPO, env=benchlib.child_env(REPO, {"QUIKFT_KERNEL": "torch"}), stdout=log,
                       stderr=subprocess.STDOUT, check=True)
    return wall


def _chosen(plan: dict) -> dict | None:
    """How many layers took each (bits, k) under --target-bpw."""
    if not plan:
        return None
    counts: dict[str, int] = {}
    for setting in plan["layers"].values():
        key = f"w{setting['bits']}k{setting['salient']}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def frontier(results: list[dict]) -> set[str]:
    """Rows no other row beats in both linear bits per weight and perplexity."""
    return {r["row"] for r in results
            if not any(o["linear_bpw"] <= r["linear_bpw"] and o["ppl"] < r["ppl"] and o is not r for o in results)}


def table(results: list[dict]) -> str:
    best = frontier(results)
    lines = ["| row | bits/weight (linear) | bits/weight (model) | WikiText-2 ppl (19 windows) | frontier | "
             "quantize s | chosen (layers per setting) | CPU, threads |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: r["linear_bpw"]):
        chosen = ", ".join(f"{k}: {v}" for k, v in (r["chosen"] or {}).items()) or "–"
        lines.append(f"| {r['row']} | {r['linear_bpw']:.2f} | {r['model_bpw']:.2f} | {r['ppl']:.2f} | "
                     f"{'yes' if r['row'] in best else ''} | {r['quantize_seconds']:.0f} | {chosen} | "
                     f"{r['cpu']}, {r['threads']} |")
    return "\n".join(lines)


def proxy_table(results: list[dict], workdir: Path) -> str:
    """How well each --target-bpw error predicts perplexity: for every fixed row whose setting was a
    measured candidate, the error that setting sums to over the layers (from a budget row's
    measurement pass, on full-precision inputs), beside the row's measured ppl; with the rank
    correlation of each error with ppl (1 = a perfect predictor of the ordering)."""
    plan = next((json.loads(report.read_text()).get("target_bpw") for report in
                 sorted(workdir.glob("target-*/quantize_report.json"))), None)
    if not plan:
        return "no --target-bpw row has finished: no measured candidates to compare"
    rows = []
    for r in results:
        setting = _fixed_setting(r["row"])
        if setting is None:
            continue
        totals = _totals(plan["candidates"], setting)
        if totals is not None:
            rows.append((r["row"], r["linear_bpw"], r["ppl"], *totals))
    lines = ["| row | bits/weight | ppl | summed output error | summed relative error | summed fisher error |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {row} | {bpw:.2f} | {ppl:.2f} | {out:.4g} | {rel:.4g} | {fisher:.4g} |"
              for row, bpw, ppl, out, rel, fisher in sorted(rows, key=lambda row: row[1])]
    if len(rows) >= 3:
        ppl = [row[2] for row in rows]
        correlations = ", ".join(f"{name} {_spearman([r[3 + i] for r in rows], ppl):.3f}"
                                 for i, name in enumerate(("output", "relative", "fisher")))
        lines.append(f"\nrank correlation with ppl over {len(rows)} rows: {correlations}")
    return "\n".join(lines)


def _fixed_setting(row_id: str) -> tuple[int, int] | None:
    parts = row_id.split("-")
    if parts[0] != "gptq":
        return None
    return int(parts[1][1:]), int(parts[2][1:])


def _totals(candidates: dict, setting: tuple[int, int]) -> tuple[float, float, float] | None:
    output = relative = fisher = 0.0
    for rows in candidates.values():
        match = [c for c in rows if (c[0], c[1]) == setting]
        if not match:
            return None
        bits, k, storage, loss, energy, *weighed = match[0]
        output += loss
        relative += loss / energy if energy > 0 else loss
        fisher += weighed[0] if weighed and weighed[0] is not None else float("nan")
    return output, relative, fisher


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0.0] * len(values)
        for rank, index in enumerate(order):
            out[index] = float(rank)
        return out

    ra, rb = ranks(a), ranks(b)
    mean = (len(a) - 1) / 2
    cov = sum((x - mean) * (y - mean) for x, y in zip(ra, rb, strict=True))
    var = sum((x - mean) ** 2 for x in ra)
    return cov / var if var else float("nan")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list[dict]] = {}
    for r in results:
        series.setdefault(r["row"].split("-k")[0] if not r["row"].startswith("target") else "target-bpw",
                          []).append(r)
    for label, points in sorted(series.items()):
        points = sorted(points, key=lambda r: r["linear_bpw"])
        ax.plot([p["linear_bpw"] for p in points], [p["ppl"] for p in points], marker="o", label=label)
    ax.set_xlabel("bits per weight (quantized linear layers)")
    ax.set_ylabel("WikiText-2 perplexity (19 windows)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def budget_rows() -> list[tuple[str, str, float]]:
    """(row id, error, budget) of the rows planned from one measurement pass (``--measured-by``)."""
    return [(f"plan-{error}-{target}", error, target) for target in (3.0, 3.5, 4.5, 4.0, 2.5, 5.0)
            for error in ("fisher", "relative", "output") if error == "fisher" or target in (3.0, 4.0)]


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--quantize-with-plan":
        quantize_with_plan(sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5])
        return
    p = benchlib.parser(__doc__.splitlines()[0], "runs/pareto/results.jsonl")
    p.add_argument("--workdir", default="runs/pareto", help="where each row's checkpoint and log go")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows of every row")
    p.add_argument("--model", default=None, help="model alias or directory [the default model]")
    p.add_argument("--plot", default=None, help="write the ppl-vs-bits plot here (PNG)")
    p.add_argument("--measured-by", default=None,
                   help="a finished --target-bpw row whose measured candidates plan the plan-* rows (every budget "
                        "and error from one measurement pass); without it those rows are not run")
    args = p.parse_args()
    done = [r for r in benchlib.load_results(args.results) if r.get("nsamples") == args.nsamples]
    if not args.table_only:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
        summary = lambda r: f"{r['linear_bpw']:.2f} bpw, ppl {r['ppl']:.2f}, {r['quantize_seconds']:.0f}s"  # noqa: E731
        planned = [(row_id, lambda r=row_id, e=error, t=target: run_budget_row(r, e, t, args))
                   for row_id, error, target in budget_rows()] if args.measured_by else []
        fixed = [(row_id, lambda r=row_id, f=flags: run_row(r, f, args)) for row_id, flags in rows()]
        benchlib.run_missing([*planned, *fixed], done, args.results, args.only, summary)
    print(table(done))
    print()
    print(proxy_table(done, Path(args.workdir)))
    if args.plot and done:
        plot(done, Path(args.plot))


if __name__ == "__main__":
    main()
