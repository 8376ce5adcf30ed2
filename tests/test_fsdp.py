"""Recovery sharded with FSDP2 over 2 CPU processes (gloo) against one process with the same global batch.

Salient-FT (no noise: each process would draw its own) in fp32, 4 steps of 4 rows; the 2-process run
gives each process 2 of the 4 rows. The only numerical difference is the order in which the gradient
is summed (per process, then averaged by the reduce-scatter, instead of over all 4 rows at once):
about 1e-7 relative in fp32. AdamW divides each update by the gradient's running RMS, so such
differences stay relative, except for gradient elements near zero, where a flipped sign moves one
element by up to lr per step. Hence the checks: losses within 1e-5 relative, and the trained
columns' total change (trained - initial) equal within 1e-3 relative in Frobenius norm.
"""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import accelerate_launch, launch_errors, read_weights

from quikft.checkpoint import load

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _recover_args(packed, corpus, out, *extra):
    return ["recover", "--model", str(packed), "--mode", "salient-ft", "--data", corpus["text"], "--steps", "4",
            "--batch-size", "4", "--seqlen", "32", "--lr", "1e-3", "--eval-windows", "0", "--fp32", "--device",
            "cpu", "--seed", "0", "--out", str(out), *extra]


def _launch(args, processes: int):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    if processes == 1:
        cmd = ["python", "-m", "quikft.cli", *args]
    else:
        cmd = accelerate_launch(processes, "-m", "quikft.cli", *args)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, launch_errors(done.stderr)


def _salient(directory) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in read_weights(directory).items() if k.endswith(".salient_weight")}


def _relative_change_error(a, b, initial) -> float:
    delta_a = torch.cat([(a[k] - initial[k]).flatten() for k in initial])
    delta_b = torch.cat([(b[k] - initial[k]).flatten() for k in initial])
    return float(torch.linalg.norm(delta_a - delta_b) / torch.linalg.norm(delta_a))


def test_fsdp2_two_processes_match_one_process_and_resume(packed, corpus, tmp_path):
    assert shutil.which("accelerate"), "the accelerate CLI comes with the accelerate dependency"
    one, two = tmp_path / "one", tmp_path / "fsdp2"
    _launch(_recover_args(packed, corpus, one), 1)
    _launch(_recover_args(packed, corpus, two, "--sharding", "fsdp2"), 2)
    r1 = json.loads((one / "recover_report.json").read_text())
    r2 = json.loads((two / "recover_report.json").read_text())
    assert r2["processes"] == 2 and r2["config"]["sharding"] == "fsdp2"
    losses1, losses2 = ([p["loss"] for p in r["loss_curve"]] for r in (r1, r2))
    assert losses2 == pytest.approx(losses1, rel=1e-5)
    initial = _salient(packed)
    assert _relative_change_error(_salient(one), _salient(two), initial) < 1e-3
    # the same checkpoint format: the codes are the input's, and it loads
    before, after = read_weights(packed), read_weights(two)
    assert all(torch.equal(before[k], after[k]) for k in before if k.endswith(".qweight"))
    load(two)

    # resume under FSDP2: a run stopped right after its state at step 2 ends where the uninterrupted one did
    stopped = tmp_path / "stopped"
    args = _recover_args(packed, corpus, stopped, "--sharding", "fsdp2", "--save-every", "2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = accelerate_launch(2, str(REPO / "tests" / "stop_after_save.py"), *args)
    interrupted = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert interrupted.returncode != 0 and not stopped.exists(), launch_errors(interrupted.stderr)
    _launch([*args, "--resume"], 2)
    resumed = _salient(stopped)
    assert all(torch.equal(resumed[k], _salient(two)[k]) for k in resumed)
