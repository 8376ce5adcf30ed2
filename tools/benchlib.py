"""What the benchmark scripts share: resumable JSONL results and their common flags.

Each finished row is appended to a JSONL file at once, so an interrupted benchmark resumes
where it stopped and a partial run still prints its table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path


def parser(description: str, default_results: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every resumable benchmark takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--results", default=default_results, help="JSONL file rows are appended to")
    p.add_argument("--only", default=None, help="run only rows whose id contains this text")
    p.add_argument("--table-only", action="store_true", help="print the table of finished rows and exit")
    return p


def load_results(path: str | Path) -> list[dict]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def append_result(path: str | Path, result: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(result) + "\n")


def run_missing(rows: Iterable[tuple[str, Callable[[], dict]]], done: list[dict], results: str | Path,
                only: str | None, summary: Callable[[dict], str]) -> None:
    """Run the rows not yet in ``done`` (and matching ``only``), appending each result as it finishes."""
    for row_id, run in rows:
        if any(r["row"] == row_id for r in done) or (only and only not in row_id):
            continue
        result = run()
        print(f"{row_id}: {summary(result)}", flush=True)
        append_result(results, result)
        done.append(result)


def child_env(code: Path, extra: dict | None = None) -> dict:
    """The environment of a quikft subprocess run from another directory: the quikft of checkout
    ``code`` first on the path, and a relative QUIKFT_DATA (as the usage lines write it) made absolute."""
    env = {**os.environ, **(extra or {}), "PYTHONPATH": str(code)}
    if env.get("QUIKFT_DATA"):
        env["QUIKFT_DATA"] = str(Path(env["QUIKFT_DATA"]).resolve())
    return env


def run_recover(code: Path, flags: list[str], env: dict | None = None, timeout: float | None = None) -> tuple[dict, float]:
    """``quikft recover FLAGS`` with the quikft of checkout ``code``, into a temporary output.

    Returns the recover report and the wall seconds. The process runs outside the working tree:
    ``python -m`` puts the working directory first on sys.path, before PYTHONPATH.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "quikft.cli", "recover", *flags, "--out", str(out)]
        began = time.perf_counter()
        done = subprocess.run(cmd, env=child_env(code, env), cwd=tmp,
                              capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - began
        if done.returncode != 0:
            raise SystemExit(f"quikft recover {' '.join(flags)} failed: {done.stderr[-2000:]}")
        return json.loads((out / "recover_report.json").read_text()), wall


def step_times(report: dict) -> list[float]:
    """Seconds of every optimizer step of a recover report."""
    tokens = report["config"]["batch_size"] * report["config"]["grad_accum"] * report["config"]["seqlen"]
    return [tokens / p["tokens_per_s"] for p in report["loss_curve"]]
