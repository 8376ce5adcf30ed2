"""Resumable recovery state: nothing is unpickled, and a kill at any write of a save resumes exactly."""

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import recover_config
from safetensors.torch import load_file, save_file

from quikft.cli import main
from quikft.recovery import recover
from quikft.recovery import state as train_state
from quikft.recovery.run import state_dir_for

PACKAGE = Path(__file__).resolve().parents[1] / "quikft"
STEPS, SAVE_EVERY = 5, 2  # saves after steps 2 and 4
WRITES = ("_save_tensors", "_write_json", "_remove_dir")  # every file-system change a save makes


class Killed(BaseException):
    """Stands for SIGKILL: nothing catches it, so no cleanup runs (the save path has none)."""


class _Exploit:
    """A pickle that creates a file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _weights(out: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(out, "model.safetensors"))


def _assert_same_run(a: dict, b: dict) -> None:
    wa, wb = _weights(a["out"]), _weights(b["out"])
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name
    assert [p["loss"] for p in a["loss_curve"]] == [p["loss"] for p in b["loss_curve"]]


@pytest.fixture(scope="module")
def straight(packed, corpus, tmp_path_factory):
    """The uninterrupted run every resumed one must equal."""
    out = tmp_path_factory.mktemp("straight") / "out"
    return recover(recover_config(packed, corpus, out, steps=STEPS), progress=False)


def _count_writes(monkeypatch, kill_at: int | None, in_save: int):
    """Wrap every write of the state module; raise Killed before write ``kill_at`` of save ``in_save``."""
    counter = {"saves": 0, "writes": 0}
    real_begin = train_state.begin_save

    def begin_save(*args, **kwargs):
        counter["saves"] += 1
        counter["writes"] = 0
        return real_begin(*args, **kwargs)

    def wrap(real):
        def write(*args, **kwargs):
            if counter["saves"] == in_save:
                if counter["writes"] == kill_at:
                    raise Killed
                counter["writes"] += 1
            return real(*args, **kwargs)
        return write

    monkeypatch.setattr(train_state, "begin_save", begin_save)
    for name in WRITES:
        monkeypatch.setattr(train_state, name, wrap(getattr(train_state, name)))
    return counter


def test_a_save_makes_a_known_number_of_writes(packed, corpus, tmp_path, monkeypatch):
    counter = _count_writes(monkeypatch, kill_at=None, in_save=2)
    config = recover_config(packed, corpus, tmp_path / "out", steps=STEPS, save_every=SAVE_EVERY)
    with pytest.raises(Killed):
        # stop after the second save, before the run finishes
        monkeypatch.setattr("quikft.recovery.job.finish", lambda *a, **k: (_ for _ in ()).throw(Killed))
        recover(config, progress=False)
    # remove leftover, rng tensors + json, trainable, optimizer, state.json, manifest, previous step
    assert counter["writes"] == 8


@pytest.mark.parametrize("save,kill_at", [(2, n) for n in range(9)] + [(1, 3), (1, 6)])
def test_a_kill_at_any_write_of_a_save_resumes_bit_identically(packed, corpus, tmp_path, monkeypatch, straight,
                                                               save, kill_at):
    """Kill before write ``kill_at`` of save ``save`` (8: after its last write), then resume."""
    config = recover_config(packed, corpus, tmp_path / "out", steps=STEPS, save_every=SAVE_EVERY)
    with monkeypatch.context() as patch:
        _count_writes(patch, kill_at, save)
        if kill_at == 8:  # after the last write of the last save: stop before the output is written
            patch.setattr("quikft.recovery.job.finish", lambda *a, **k: (_ for _ in ()).throw(Killed))
        with pytest.raises(Killed):
            recover(config, progress=False)
    assert not Path(config.out).exists()
    state_dir = state_dir_for(Path(config.out))
    if train_state.committed_step(state_dir) is None:  # killed inside the first save: nothing to resume
        result = CliRunner().invoke(main, ["recover", "--model", str(packed), "--data", corpus["text"], "--seqlen",
                                           "32", "--resume", "--out", config.out])
        assert result.exit_code == 1 and "no training state" in result.output
        resumed = recover(config, progress=False)  # a fresh start reuses the directory
    else:
        config.resume = True
        resumed = recover(config, progress=False)
    _assert_same_run(resumed, straight)
    assert not state_dir.exists()


KILL_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from conftest import recover_config
from quikft.recovery import state as train_state
from quikft.recovery import recover

real, calls = train_state._write_json, []
def write_json(path, data):
    calls.append(path)
    if path.name == train_state.MANIFEST and len([c for c in calls if c.name == train_state.MANIFEST]) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # the second save dies right before its commit
    return real(path, data)
train_state._write_json = write_json
recover(recover_config({packed!r}, {corpus!r}, {out!r}, steps={steps}, save_every={every}), progress=False)
"""


def test_a_real_sigkill_before_the_commit_resumes_bit_identically(packed, corpus, tmp_path, straight):
    out = tmp_path / "out"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), packed=str(packed), corpus=corpus, out=str(out),
                                steps=STEPS, every=SAVE_EVERY)
    env = {**os.environ, "PYTHONPATH": str(PACKAGE.parent), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    state_dir = state_dir_for(out)
    assert train_state.committed_step(state_dir) == 2  # the first save; the second never committed
    assert len(list(state_dir.glob("step-*"))) == 2  # the interrupted save's directory is still there
    resumed = recover(recover_config(packed, corpus, out, steps=STEPS, save_every=SAVE_EVERY, resume=True),
                      progress=False)
    _assert_same_run(resumed, straight)


# ----------------------------------------------------------------------------- nothing is unpickled

def test_crafted_bytes_in_the_new_state_files_are_one_line_errors(packed, corpus, tmp_path):
    out = tmp_path / "out"
    state_dir = state_dir_for(out)
    step = train_state.step_dir(state_dir, 2)
    step.mkdir(parents=True)
    marker = tmp_path / "pwned"
    blob = pickle.dumps(_Exploit(marker))
    for name in (train_state.TRAINABLE, train_state.OPTIMIZER, "rng-0.safetensors"):
        (step / name).write_bytes(blob)
    (step / train_state.STATE_JSON).write_text(json.dumps({"step": 2, "settings": {}, "world": 1, "optimizer": {},
                                                           "scheduler": {}, "curve": {}}))
    (state_dir / train_state.MANIFEST).write_text(json.dumps({"step": 2, "dir": step.name}))
    config = recover_config(packed, corpus, out, steps=4, save_every=2, resume=True)
    with pytest.raises(train_state.StateError, match=r"trainable\.safetensors: unreadable training state"):
        recover(config, progress=False)
    (state_dir / train_state.MANIFEST).write_bytes(blob)
    with pytest.raises(train_state.StateError, match=r"latest\.json: unreadable training state"):
        recover(config, progress=False)
    assert not marker.exists()


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    # readable: only the link gives them away
    save_file({"x": torch.zeros(2)}, victim / train_state.TRAINABLE)
    save_file({}, victim / train_state.OPTIMIZER)
    (victim / train_state.STATE_JSON).write_text(json.dumps({"step": 2, "settings": {}, "world": 1, "curve": {},
                                                             "optimizer": {"param_groups": []}, "scheduler": {}}))
    return victim


def _state_naming(state_dir: Path, name: str) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / train_state.MANIFEST).write_text(json.dumps({"step": 2, "dir": name}))


@pytest.mark.parametrize("case", ["absolute", "parent", "linked_step", "linked_file"])
def test_a_recovery_state_is_read_only_from_its_own_regular_files(packed, corpus, tmp_path, case):
    """latest.json is data, never a path: a manifest naming a directory elsewhere, a step directory
    that is a link, or a state file that is a link is refused in one line; nothing outside is read,
    changed or deleted (a leftover step-* link is removed as a link, not followed)."""
    out, victim = tmp_path / "out", _victim(tmp_path)
    state_dir = state_dir_for(out)
    step = train_state.step_dir(state_dir, 2)
    if case == "absolute":
        _state_naming(state_dir, str(victim))
    elif case == "parent":
        _state_naming(state_dir, "step-00000002/../../victim")
    elif case == "linked_step":
        _state_naming(state_dir, step.name)
        step.symlink_to(victim)
    else:
        _state_naming(state_dir, step.name)
        step.mkdir()
        for name in (train_state.TRAINABLE, train_state.OPTIMIZER, train_state.STATE_JSON):
            (step / name).symlink_to(victim / name)
    (state_dir / "step-00000001").symlink_to(victim)  # a leftover the next save would remove
    config = recover_config(packed, corpus, out, steps=4, save_every=2, resume=True)
    with pytest.raises(train_state.StateError, match="unreadable training state") as err:
        recover(config, progress=False)
    assert "\n" not in str(err.value) and len(str(err.value)) < 1024
    before = (victim / train_state.TRAINABLE).read_bytes()
    train_state.remove_uncommitted(state_dir)
    assert sorted(p.name for p in victim.iterdir()) == sorted(["precious.txt", train_state.TRAINABLE,
                                                               train_state.OPTIMIZER, train_state.STATE_JSON])
    assert (victim / "precious.txt").read_text() == "keep me"
    assert (victim / train_state.TRAINABLE).read_bytes() == before


def test_a_second_recover_of_one_output_is_refused_at_once(packed, corpus, tmp_path):
    from quikft.atomic import OutputError, OutputLock

    out = tmp_path / "out"
    first = OutputLock(out, "recover")  # a live run holds the output
    try:
        with pytest.raises(OutputError, match=r"out is being written by another recover \(pid \d+\); wait"):
            recover(recover_config(packed, corpus, out, steps=1), progress=False)
    finally:
        first.release()
    assert not out.exists() and not any(p.name.endswith(".lock") for p in tmp_path.iterdir())
