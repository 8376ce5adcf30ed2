"""``quikft report``: the JSON reports of quantize, recover and eval runs in one table and two plots.

Every ``*.json`` under the given directories (or given directly) is read; quantize reports
(``quantize_report.json``), recover reports (``recover_report.json``) and ``quikft eval --json``
files become rows, anything else is skipped with a one-line note. An eval file in the same
directory as a quantize or recover report adds its zero-shot results to that run's row. The FP
reference perplexity stored in quantize/recover reports becomes an ``FP`` row, so FP, RTN,
GPTQ, +salient and +GIFT-SW sit side by side. Unknown or missing keys never stop a report.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from quikft.atomic import write_text
from quikft.config import salient_text
from quikft.data import DataError
from quikft.eval.results import EvalBackend
from quikft.recovery.modes import mode_label

# Files a model directory always has and that are never run reports: skipped without a note.
MODEL_FILES = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "vocab.json", "chat_template.json"}
PLOT_HINT = 'pip install -e ".[report]"'


@dataclass
class RunRow:
    """One line of the comparison table."""

    run: str
    method: str
    model: str = ""
    bits: int | None = None
    salient: int | float | None = None  # a count, or a fraction of each layer's inputs
    linear_bpw: float | None = None  # bits per weight of the quantized linears, as stored (quikft.bits)
    model_bpw: float | None = None  # bits per parameter of the whole stored model
    ppl: float | None = None
    ppl_windows: int | None = None
    seconds: float | None = None
    zeroshot: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> {"acc": .., "acc_norm": ..}
    loss_curve: list[dict] = field(default_factory=list)
    notes: str = ""

    def series(self) -> str:
        """The label of this row's line in the ppl-versus-bits plot."""
        if "--target-bpw" in self.notes:
            return f"{self.method} --target-bpw"
        return self.method if self.salient is None else f"{self.method} k={salient_text(self.salient)}"


@dataclass
class Report:
    rows: list[RunRow]
    skipped: list[Path]
    markdown: str


# ---------------------------------------------------------------------------- reading

def find_json_files(paths: list[str | os.PathLike]) -> list[Path]:
    """JSON files under each directory (recursively, skipping hidden temporaries) or given directly."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(sorted(p for p in path.rglob("*.json")
                                if not any(part.startswith(".") for part in p.relative_to(path).parts)
                                and p.name not in MODEL_FILES))
        else:
            raise DataError(f"{path} does not exist; pass run directories (or report files) to quikft report")
    return files


def report_kind(data: object) -> str | None:
    """``quantize``, ``recover``, ``eval`` or None for JSON that is not a quikft report."""
    if not isinstance(data, dict):
        return None
    job = data.get("job")
    if job in ("quantize", "recover", "eval"):
        return job
    if "config" in data and "quantize_seconds" in data:
        return "quantize"
    if "ppl_after" in data or "loss_curve" in data:
        return "recover"
    if "model" in data and (isinstance(data.get("ppl"), list) or isinstance(data.get("tasks"), list)):
        return "eval"
    return None


def _load(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _number(value) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _int(value) -> int | None:
    number = _number(value)
    return int(number) if number is not None else None


def _salient(value) -> int | float | None:
    """A report's salient setting: a count, or a fraction of each layer's inputs (kept as a float)."""
    number = _number(value)
    return None if number is None else int(number) if isinstance(value, int) else number


def _bpw(data: dict) -> dict[str, float | None]:
    """``linear_bpw``/``model_bpw`` of a report's ``bits_per_weight`` entry (absent in older reports)."""
    entry = data.get("bits_per_weight") if isinstance(data.get("bits_per_weight"), dict) else {}
    return {"linear_bpw": _number(entry.get("linear")), "model_bpw": _number(entry.get("model"))}


def _ppl(entry) -> tuple[float | None, int | None]:
    """(ppl, windows) of a PplResult dict, or of a bare number."""
    if isinstance(entry, dict):
        return _number(entry.get("ppl")), _int(entry.get("windows"))
    return _number(entry), None


# ---------------------------------------------------------------------------- rows

def quantize_rows(data: dict, run: str) -> list[RunRow]:
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    model = str(config.get("model") or "smollm2-135m")
    ppl, windows = _ppl(data.get("ppl"))
    budget = _number(config.get("target_bpw"))
    # Under --target-bpw, bits and k are chosen per layer: the config's own values were not used.
    salient = None if budget is not None else _salient(config.get("salient"))
    notes = [f"metric {config['metric']}" if config.get("metric") and salient else "",
             f"--target-bpw {budget:g}: bits and k per layer" if budget is not None else ""]
    row = RunRow(run=run, method=str(config.get("method") or "?").upper(), model=model,
                 bits=None if budget is not None else _int(config.get("bits")), salient=salient, **_bpw(data),
                 ppl=ppl, ppl_windows=windows, seconds=_number(data.get("wall_seconds")),
                 notes="; ".join(note for note in notes if note))
    return [row, *_fp_row(data.get("fp_ppl"), model)]


def recover_rows(data: dict, run: str) -> list[RunRow]:
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    model = str(config.get("model") or "smollm2-135m")
    mode = config.get("mode")
    ppl, windows = _ppl(data.get("ppl_after"))
    before, _ = _ppl(data.get("ppl_before"))
    noise_bits = config.get("noise_bits")
    noise = (f"noise {noise_bits}-bit" if noise_bits else "noise") if config.get("noise") else ""
    notes = [f"ppl before {before:.2f}" if before is not None else "", noise]
    curve = [p for p in data.get("loss_curve") or [] if isinstance(p, dict) and _number(p.get("loss")) is not None]
    row = RunRow(run=run, method=mode_label(mode), model=model,
                 bits=_int(data.get("bits", config.get("bits"))), salient=_salient(data.get("salient", config.get("salient"))),
                 **_bpw(data), ppl=ppl, ppl_windows=windows, seconds=_number(data.get("seconds")), loss_curve=curve, notes=", ".join(n for n in notes if n))
    return [row, *_fp_row(data.get("fp_ppl"), model)]


def _fp_row(entry, model: str) -> list[RunRow]:
    ppl, windows = _ppl(entry)
    return [RunRow(run=f"{model} (FP reference)", method="FP", model=model, ppl=ppl, ppl_windows=windows)] \
        if ppl is not None else []


def zeroshot_of(data: dict) -> dict[str, dict[str, float]]:
    """task -> {metric: value} from an eval report's ``tasks`` list."""
    out: dict[str, dict[str, float]] = {}
    for task in data.get("tasks") or []:
        if not isinstance(task, dict) or not isinstance(task.get("metrics"), dict):
            continue
        values = {name: _number(m.get("value")) for name, m in task["metrics"].items() if isinstance(m, dict)}
        out[str(task.get("task"))] = {k: v for k, v in values.items() if v is not None}
    return out


def eval_row(data: dict, run: str) -> RunRow:
    ppl_entries = [p for p in data.get("ppl") or [] if isinstance(p, dict)]
    preferred = next((p for p in ppl_entries if p.get("dataset") == "wikitext2"), ppl_entries[0] if ppl_entries else None)
    ppl, windows = _ppl(preferred)
    parts = [_number(p.get("seconds")) for p in ppl_entries + list(data.get("tasks") or []) if isinstance(p, dict)]
    seconds = sum(s for s in parts if s is not None) if any(s is not None for s in parts) else None
    backend = data.get("backend")
    notes = [f"model {data['model']}" if data.get("model") else "",
             f"backend {backend}" if backend not in (None, EvalBackend.NATIVE) else "",
             f"first {data['limit']} per task" if _int(data.get("limit")) else ""]
    return RunRow(run=run, method="eval", model=str(data.get("model") or ""), ppl=ppl, ppl_windows=windows,
                  seconds=seconds, zeroshot=zeroshot_of(data), notes=", ".join(n for n in notes if n))


def _dedupe_fp(rows: list[RunRow]) -> list[RunRow]:
    """One FP row per reference: every quantize/recover report of a model repeats the same FP ppl."""
    seen, out = set(), []
    for row in rows:
        key = (round(row.ppl or 0.0, 6), row.ppl_windows)
        if row.method == "FP":
            if key in seen:
                continue
            seen.add(key)
        out.append(row)
    return out


def collect_rows(files: list[Path]) -> tuple[list[RunRow], list[Path]]:
    """Rows from the report files; eval results merge into a quantize/recover row of the same directory."""
    runs: list[RunRow] = []
    by_dir: dict[Path, list[RunRow]] = {}
    evals: list[tuple[Path, dict]] = []
    skipped: list[Path] = []
    for path in files:
        data = _load(path)
        kind = report_kind(data)
        if kind is None:
            skipped.append(path)
        elif kind == "eval":
            evals.append((path, data))
        else:
            rows = (quantize_rows if kind == "quantize" else recover_rows)(data, str(path.parent))
            runs.extend(rows)
            by_dir.setdefault(path.parent, []).append(rows[0])
    for path, data in evals:
        siblings = by_dir.get(path.parent)
        if not siblings:
            runs.append(eval_row(data, str(path)))
            continue
        found = eval_row(data, str(path))
        for row in siblings:
            row.zeroshot.update(found.zeroshot)
            if row.ppl is None or (found.ppl_windows or 0) > (row.ppl_windows or 0):
                row.ppl, row.ppl_windows = found.ppl, found.ppl_windows  # the fuller evaluation wins
    return _dedupe_fp(runs), skipped


# ---------------------------------------------------------------------------- markdown

def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _avg_acc(row: RunRow) -> str:
    accs = [m["acc"] for m in row.zeroshot.values() if "acc" in m]
    return f"{100 * sum(accs) / len(accs):.2f} ({len(accs)})" if accs else "–"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def markdown_table(rows: list[RunRow]) -> str:
    lines = ["| run | method | bits | salient k | bits/weight (linear) | bits/weight (model) | ppl | ppl windows | "
             "0-shot avg acc (tasks) | time | notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.run} | {row.method} | {row.bits if row.bits is not None else '–'} | "
                     f"{salient_text(row.salient) if row.salient is not None else '–'} | {_fmt(row.linear_bpw)} | "
                     f"{_fmt(row.model_bpw)} | {_fmt(row.ppl)} | "
                     f"{row.ppl_windows if row.ppl_windows is not None else '–'} | {_avg_acc(row)} | "
                     f"{_duration(row.seconds)} | {row.notes} |")
    return "\n".join(lines)


def zeroshot_table(rows: list[RunRow]) -> str:
    """Per-task accuracy of the rows that have zero-shot results (acc, and acc_norm where reported)."""
    with_tasks = [row for row in rows if row.zeroshot]
    tasks = list(dict.fromkeys(task for row in with_tasks for task in row.zeroshot))
    if not tasks:
        return ""
    lines = ["| run | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for row in with_tasks:
        cells = []
        for task in tasks:
            metrics = row.zeroshot.get(task, {})
            cell = " / ".join(f"{100 * metrics[m]:.2f}" for m in ("acc", "acc_norm") if m in metrics)
            cells.append(cell or "–")
        lines.append(f"| {row.run} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(rows: list[RunRow], plots: list[str]) -> str:
    parts = ["# quikft runs", "", markdown_table(rows), ""]
    per_task = zeroshot_table(rows)
    if per_task:
        parts += ["## Zero-shot accuracy per task (acc / acc_norm, %)", "", per_task, ""]
    parts += [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(parts).rstrip() + "\n"


# ---------------------------------------------------------------------------- plots

def _save_figure(figure, path: Path) -> None:
    """Write the PNG under a temporary name and rename it (a reader never sees half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


PER_WEIGHT_LABEL = "bits per weight (quantized linear layers, all stored bits)"
CODE_BITS_LABEL = "bits (non-salient weights)"


def ppl_vs_bits_series(rows: list[RunRow]
                       ) -> tuple[str, dict[str, list[tuple[float, float]]], list[tuple[str, float]]]:
    """The plot's x-axis label, its lines (label -> (x, ppl) points) and the FP references drawn across
    it (label, ppl).

    x is the quantized linears' bits per weight (all their stored bits), or the code bit-width when a
    plotted run's report predates the count: the two scales never share an axis."""
    plotted = [row for row in rows if row.ppl is not None
               and (row.method == "FP" or row.bits is not None or row.linear_bpw is not None)]
    # Perplexities over different window subsets are not comparable: keep them on separate lines.
    mixed = len({row.ppl_windows for row in plotted}) > 1
    quantized = [row for row in plotted if row.method != "FP"]
    per_weight = bool(quantized) and all(row.linear_bpw is not None for row in quantized)
    if not per_weight:  # a budget row has no single code bit-width to stand on
        quantized = [row for row in quantized if row.bits is not None]

    def label(row: RunRow) -> str:
        name = f"FP {row.model}" if row.method == "FP" else row.series()
        return f"{name} ({row.ppl_windows} windows)" if mixed else name

    series: dict[str, list[tuple[float, float]]] = {}
    for row in quantized:
        series.setdefault(label(row), []).append((row.linear_bpw if per_weight else row.bits, row.ppl))
    fp = [(label(row), row.ppl) for row in plotted if row.method == "FP"]
    return (PER_WEIGHT_LABEL if per_weight else CODE_BITS_LABEL), series, fp


def plot_ppl_vs_bits(rows: list[RunRow], path: Path) -> bool:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    xlabel, series, fp = ppl_vs_bits_series(rows)
    if not series:
        return False
    figure, axis = plt.subplots(figsize=(6, 4))
    for name, points in sorted(series.items()):
        x, ppl = zip(*sorted(points), strict=True)
        axis.plot(x, ppl, marker="o", label=name)
    for name, ppl in fp:
        axis.axhline(ppl, linestyle="--", color="gray", label=name)
    axis.set(xlabel=xlabel, ylabel="perplexity", yscale="log", title="Perplexity vs bits")
    axis.yaxis.set_major_formatter(ScalarFormatter())
    axis.yaxis.set_minor_formatter(ScalarFormatter())
    if xlabel == CODE_BITS_LABEL:
        axis.set_xticks(sorted({b for points in series.values() for b, _ in points}))
    axis.legend(fontsize="small")
    _save_figure(figure, path)
    plt.close(figure)
    return True


def plot_loss_curves(rows: list[RunRow], path: Path) -> bool:
    import matplotlib.pyplot as plt

    curves = [row for row in rows if row.loss_curve]
    if not curves:
        return False
    figure, axis = plt.subplots(figsize=(6, 4))
    for row in curves:
        points = sorted((int(p.get("step", i)), float(p["loss"])) for i, p in enumerate(row.loss_curve))
        steps, losses = zip(*points, strict=True)
        axis.plot(steps, losses, label=f"{row.method} {Path(row.run).name}")
    axis.set(xlabel="step", ylabel="training loss", title="Recovery training loss")
    axis.legend(fontsize="small")
    _save_figure(figure, path)
    plt.close(figure)
    return True


def matplotlib_available() -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")  # files only, never a window
    return True


# ---------------------------------------------------------------------------- entry point

def build_report(paths: list[str | os.PathLike], out: str | os.PathLike = "runs/report") -> tuple[Report, list[str]]:
    """Write ``report.md`` (and the PNG plots when matplotlib is installed) to ``out``.

    Returns the report and one-line notes for the user (skipped files, missing matplotlib).
    """
    out = Path(out)
    rows, skipped = collect_rows(find_json_files(paths))
    if not rows:
        raise DataError(f"no quikft reports found in {', '.join(map(str, paths))} "
                        f"(looked for quantize_report.json, recover_report.json and `quikft eval --json` files)")
    notes = []
    if skipped:
        names = ", ".join(str(p) for p in skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        notes.append(f"skipped {len(skipped)} JSON file(s) that are not quikft reports: {names}")
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    if matplotlib_available():
        if plot_ppl_vs_bits(rows, out / "ppl_vs_bits.png"):
            plots.append("ppl_vs_bits.png")
        if plot_loss_curves(rows, out / "loss_curves.png"):
            plots.append("loss_curves.png")
    else:
        notes.append(f"plots skipped: matplotlib is not installed ({PLOT_HINT})")
    markdown = render_markdown(rows, plots)
    write_text(out / "report.md", markdown)
    return Report(rows, skipped, markdown), notes
