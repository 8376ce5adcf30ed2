"""The resumable state of a quantize job, committed after every block.

It lives beside the output, in ``<out>.quantize-state/`` (the output itself appears only when the
job is complete): the finished blocks' packed shards (``blocks/``, written by the job's output
writer), the activations entering the next block (``activations-<block>/``, every stream's
batches in the model's dtype, exact), torch's RNG state, and ``progress.json``: the next block
and everything the report and the final files need (layer reports, input groups, experts).
``progress.json`` is written last, atomically, so it is the commit point: a crash at any moment
leaves either the previous block's state or the new one, never a mixture.

With ``--target-bpw``, ``measure.json`` commits the candidates measured so far after every block of
the measurement pass, so a run killed during it resumes the measurement where it stopped.

``fingerprint.json`` records every setting that changes the output (and the model's identity);
a resumed run must match it, and one that does not is refused naming the setting. A state left
by a killed run is never used without ``--resume``, and never silently overwritten either.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from quikft.atomic import OutputError, OutputLock, is_regular_file, write_json
from quikft.config import brief
from quikft.quant.activations import ActivationStore, Offload

PROGRESS_NAME = "progress.json"
FINGERPRINT_NAME = "fingerprint.json"
BLOCKS_DIR = "blocks"
RNG_NAME = "rng.safetensors"
MEASURE_NAME = "measure.json"  # --target-bpw: the candidates measured so far, before the first block commits
STATE_SUFFIX = ".quantize-state"
# progress.json: per finished block, its files in blocks/ with their sha256 (the output is built from
# them, so a swapped or damaged one must be refused before it is carried into a checkpoint); the
# activations' files with their sizes (hashing gigabytes every block would cost more than it guards).
SHARDS_KEY = "shards"
ACTIVATION_FILES_KEY = "activation_files"
PLAIN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Fingerprint entries that change the output only in rounding: a resume that differs in them warns.
# GPTQ's results depend on torch's thread count (the reductions' order; on the default model 1 and
# 2 threads gave different codes in most tensors and wikitext2 ppl 26.99 vs 26.81, both valid).
ADVISORY = frozenset({"threads"})


class QuantizeStateError(ValueError):
    """A resumable state that cannot be used as asked; the message is one line naming the fix."""


def state_dir_for(out_dir: str | os.PathLike) -> Path:
    out_dir = Path(out_dir)
    return out_dir.with_name(f"{out_dir.name}{STATE_SUFFIX}")


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


class QuantizeState:
    """One job's state directory (see the module docstring)."""

    def __init__(self, directory: Path, progress: dict | None, lock: OutputLock | None = None):
        self.directory = directory
        self.progress = progress
        self.peak_bytes = directory_bytes(directory)
        self._lock = lock  # held for the job's life: one writer per output

    @property
    def blocks_dir(self) -> Path:
        return self.directory / BLOCKS_DIR

    @property
    def next_block(self) -> int:
        return self.progress["next_block"] if self.progress else 0

    @classmethod
    def begin(cls, out_dir: str | os.PathLike, fingerprint: dict[str, Any], resume: bool) -> QuantizeState:
        """Open the state for a resumed run (checking its fingerprint) or start an empty one."""
        directory = state_dir_for(out_dir)
        try:
            lock = OutputLock(out_dir, "quantize")
        except OutputError as err:
            raise QuantizeStateError(str(err)) from None
        try:
            return cls(directory, cls._open(directory, fingerprint, resume), lock)
        except BaseException:
            lock.release()  # a refused run holds and leaves nothing
            raise

    @staticmethod
    def _open(directory: Path, fingerprint: dict[str, Any], resume: bool) -> dict | None:
        """The progress of a resumed run (checked) or None for an empty new state."""
        progress_file = directory / PROGRESS_NAME
        if progress_file.is_file():
            progress = _read_json(progress_file)
            if not isinstance(progress, dict):
                raise QuantizeStateError(f"{progress_file}: not a quantize progress record; delete {directory} to "
                                         f"start over")
            done = f"{progress.get('next_block', 0)} of {progress.get('blocks', '?')} blocks done"
            if _finished_leftover(directory, progress):
                # Killed between the output's rename and the state's removal: the output is complete.
                shutil.rmtree(directory)
                return QuantizeState._open(directory, fingerprint, resume)
            if not resume:
                raise QuantizeStateError(f"{directory} holds an interrupted quantize ({done}); rerun with --resume to "
                                         f"continue it, or delete that directory to start over")
            _check_fingerprint(directory, fingerprint)
            _check_progress(progress_file, progress)
            return progress
        measured = _measured_blocks(directory)
        if measured and not resume:
            raise QuantizeStateError(f"{directory} holds an interrupted quantize (--target-bpw measurement of "
                                     f"{measured} blocks done); rerun with --resume to continue it, or delete that "
                                     f"directory to start over")
        if measured:
            _check_fingerprint(directory, fingerprint)
            return None
        if resume:
            raise QuantizeStateError(f"--resume: no interrupted quantize at {directory} (its state is written "
                                     f"after the first block); run without --resume")
        # A run killed before its first commit leaves nothing worth keeping (and this one holds the lock).
        shutil.rmtree(directory, ignore_errors=True)
        (directory / BLOCKS_DIR).mkdir(parents=True)
        write_json(directory / FINGERPRINT_NAME, fingerprint)
        return None

    def measurement(self) -> dict[str, list[dict]]:
        """The --target-bpw candidates measured so far (by layer name), kept across a kill."""
        path = self.directory / MEASURE_NAME
        measured = _read_json(path).get("layers") if is_regular_file(path) else {}
        if not isinstance(measured, dict):
            raise QuantizeStateError(f"{path}: not a measurement record; delete {self.directory} to start over")
        return measured

    def save_measurement(self, blocks: int, measured: dict[str, list[dict]]) -> None:
        """Commit the candidates of the first ``blocks`` blocks (atomically: the old record or the new)."""
        write_json(self.directory / MEASURE_NAME, {"blocks": blocks, "layers": measured})

    def commit(self, next_block: int, stores: dict[str, ActivationStore], record: dict[str, Any],
               written: list[Path]) -> None:
        """Save the activations entering ``next_block`` and the RNG, then commit ``progress.json``
        with the sha256 of the files the finished block ``written`` to ``blocks/``."""
        activations = self.directory / activations_name(next_block)
        shutil.rmtree(activations, ignore_errors=True)
        for name, store in stores.items():
            store.persist(activations / name)
        save_file({"torch": torch.get_rng_state()}, activations / RNG_NAME)
        previous = self.progress.get("activations") if self.progress else None
        shards = [*(self.progress or {}).get(SHARDS_KEY, []), {path.name: _sha256(path) for path in written}]
        self.progress = {**record, "next_block": next_block, "activations": activations.name, SHARDS_KEY: shards,
                         ACTIVATION_FILES_KEY: _sizes(activations)}
        write_json(self.directory / PROGRESS_NAME, self.progress)
        self.peak_bytes = max(self.peak_bytes, directory_bytes(self.directory))
        if previous and previous != activations.name:
            shutil.rmtree(self.directory / previous, ignore_errors=True)

    def restore(self, name: str, offload: Offload) -> ActivationStore:
        """A committed stream's activations, in a store placed as ``offload`` says; also restores the RNG."""
        activations = self.directory / self.progress["activations"]
        torch.set_rng_state(load_file(activations / RNG_NAME)["torch"])
        return offload.load(activations / name)

    def discard(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        self.release()

    def release(self) -> None:
        """Let another job write this output (the end of the process releases it too)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def _measured_blocks(directory: Path) -> int:
    """How many blocks an interrupted --target-bpw measurement pass committed (0: none)."""
    path = directory / MEASURE_NAME
    record = _read_json(path) if is_regular_file(path) else None
    blocks = record.get("blocks") if isinstance(record, dict) else None
    return blocks if isinstance(blocks, int) and not isinstance(blocks, bool) and blocks > 0 else 0


def _finished_leftover(directory: Path, progress: dict) -> bool:
    """The state of a run that finished every block and wrote its output after its last commit (the
    output directory is renamed into place after every block is committed, so an output newer than
    ``progress.json`` is that run's, complete; an older one is a previous run's)."""
    out_dir = directory.with_name(directory.name.removesuffix(STATE_SUFFIX))
    blocks = progress.get("blocks")
    return (isinstance(blocks, int) and progress.get("next_block") == blocks and out_dir.is_dir()
            and not out_dir.is_symlink()
            and out_dir.stat().st_mtime_ns >= (directory / PROGRESS_NAME).stat().st_mtime_ns)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise QuantizeStateError(f"{path}: unreadable quantize state ({err}); delete {path.parent} to start over") \
            from None


def activations_name(next_block: int) -> str:
    return f"activations-{next_block:05d}"


def _check_progress(progress_file: Path, progress: Any) -> None:
    """The state's progress names only what this job writes: a block number and, for it, the
    activations directory inside the state, a real directory. Anything else (a path elsewhere, a
    link, activations of another block) is refused before anything is read, moved or deleted."""
    directory = progress_file.parent
    start_over = f"the quantize state is inconsistent; delete {directory} to start over"
    next_block = progress.get("next_block") if isinstance(progress, dict) else None
    blocks = progress.get("blocks") if isinstance(progress, dict) else None
    if (not isinstance(next_block, int) or isinstance(next_block, bool) or next_block < 1
            or (isinstance(blocks, int) and next_block > blocks)):
        raise QuantizeStateError(f"{progress_file}: next_block {brief(next_block)} is not a finished block "
                                 f"count; {start_over}")
    expected = activations_name(next_block)
    if progress.get("activations") != expected:
        raise QuantizeStateError(f"{progress_file}: names activations {brief(progress.get('activations'))} for "
                                 f"block {next_block}, not {expected}; {start_over}")
    activations = directory / expected
    if activations.is_symlink() or not activations.is_dir():
        raise QuantizeStateError(f"{activations} is not a directory of this state; {start_over}")
    _check_files(directory, progress, start_over)


def _check_files(directory: Path, progress: dict, start_over: str) -> None:
    """Every file the state records is a regular file of this state as it was written: the finished
    blocks' shards by sha256, the activations by size; the activations hold nothing else."""
    shards = progress.get(SHARDS_KEY)
    if not isinstance(shards, list) or len(shards) != progress["next_block"] \
            or not all(isinstance(block, dict) and block for block in shards):
        raise QuantizeStateError(f"{directory / PROGRESS_NAME}: no checksums for the {progress['next_block']} "
                                 f"finished blocks; {start_over}")
    for block in shards:
        for name, digest in block.items():
            path = _state_file(directory / BLOCKS_DIR, name, start_over)
            if _sha256(path) != digest:
                raise QuantizeStateError(f"{path} does not match its recorded sha256 (changed since it was "
                                         f"written); {start_over}")
    activations = directory / progress["activations"]
    recorded, found = progress.get(ACTIVATION_FILES_KEY), _sizes(activations)
    if not isinstance(recorded, dict):
        raise QuantizeStateError(f"{directory / PROGRESS_NAME}: no record of the activations' files; {start_over}")
    if found != recorded:  # a file missing, added, truncated, or replaced by a link
        name = min(key for key in set(found) | set(recorded) if found.get(key) != recorded.get(key))
        raise QuantizeStateError(f"{activations}: {brief(name)} is not as this state wrote it; {start_over}")


def _state_file(parent: Path, name: Any, start_over: str) -> Path:
    """``parent/name`` for a plain ``name`` that is a regular file of the state (never a link)."""
    path = parent / str(name)
    if not isinstance(name, str) or not PLAIN_NAME.fullmatch(name):
        raise QuantizeStateError(f"{parent}: the state names {brief(name)}, not a file of this state; {start_over}")
    if not path.exists() and not path.is_symlink():
        raise QuantizeStateError(f"{path} is missing; {start_over}")
    if not is_regular_file(path):
        raise QuantizeStateError(f"{path} is not a regular file (a link or device); {start_over}")
    return path


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _sizes(directory: Path) -> dict[str, int]:
    """Every entry below ``directory`` by relative name: a file's size, -1 for anything else (a
    link, a device), so that a state holding one is never equal to the record."""
    sizes = {}
    for root, dirs, files in os.walk(directory):
        for name in [*files, *(d for d in dirs if Path(root, d).is_symlink())]:
            path = Path(root, name)
            mode = path.lstat().st_mode
            sizes[path.relative_to(directory).as_posix()] = path.lstat().st_size if stat.S_ISREG(mode) else -1
    return sizes


def _check_fingerprint(directory: Path, fingerprint: dict[str, Any]) -> None:
    saved = _read_json(directory / FINGERPRINT_NAME)
    changed = [key for key in sorted(set(saved) | set(fingerprint)) if saved.get(key) != fingerprint.get(key)]
    # A refusal first: nothing is warned about for a resume that does not happen.
    for key in sorted(changed, key=lambda key: key in ADVISORY):
        was, now = f"{key}={saved.get(key)!r}", f"{key}={fingerprint.get(key)!r}"
        if key not in ADVISORY:
            raise QuantizeStateError(f"--resume: the interrupted run used {was}, this one {now}; rerun with the same "
                                     f"settings or delete {directory} to start over")
        warnings.warn(f"--resume: the interrupted run used {was}, this one {now}; the blocks quantized from here "
                      f"can round differently from an uninterrupted run (set OMP_NUM_THREADS={saved.get(key)} "
                      f"for a bit-identical result)", stacklevel=3)
