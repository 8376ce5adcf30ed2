"""Resumable training state of ``quikft recover``: safetensors and JSON only, nothing is unpickled.

Layout of a state directory (``<out>.train-state/``)::

    latest.json                  the manifest: {"step": N, "dir": "step-00000N"} -- the commit point
    step-00000N/
        trainable.safetensors    the trained tensors, by parameter name
        optimizer.safetensors    the optimizer's per-parameter tensors ("state.<index>.<key>")
        rng-<rank>.safetensors   torch's generator state (and CUDA's) of each process
        rng-<rank>.json          Python's ``random`` state of each process
        state.json               step, settings, world size, optimizer groups, scheduler, loss curve
    log.jsonl                    one line per step, for people (rebuilt from the state on resume)

A save writes a complete ``step-N`` directory, then replaces the manifest atomically, then
removes the previous step's directory. A process killed at any instant therefore leaves a
manifest naming a complete state -- the old one or the new one, never a mix; directories the
manifest does not name are leftovers and are removed by the next save or resume.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from quikft.atomic import is_regular_file, write_text

MANIFEST = "latest.json"
LOG_NAME = "log.jsonl"
STATE_JSON = "state.json"
TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
STEP_DIR = re.compile(r"step-\d{8}")


class StateError(ValueError):
    """A training state that cannot be resumed; the message is one line."""


@dataclass
class TrainState:
    """Everything a resumed run needs: what a save writes and a resume reads back. ``optimizer`` is in
    ``optimizer.state_dict()``'s layout (for a sharded run, the same layout gathered whole),
    ``scheduler`` is the scheduler's state dict."""

    step: int
    settings: dict[str, Any]
    world: int
    trainable: Mapping[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    curve: dict[str, Any]


def committed_step(state_dir: Path) -> int | None:
    """The step of the committed state in ``state_dir``, or None when there is none."""
    if not (state_dir / MANIFEST).is_file():
        return None
    manifest = _read_json(state_dir / MANIFEST, state_dir)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("step"), int):
        raise _unreadable(state_dir / MANIFEST, state_dir, "no step")
    return manifest["step"]


# ------------------------------------------------------------------------------------ writing

def _write_json(path: Path, data: Any) -> None:
    # Strict: a value JSON cannot hold is an error, never silently turned into a string.
    write_text(path, json.dumps(data, allow_nan=False) + "\n")


def _save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    save_file({name: t.detach().cpu().contiguous() for name, t in tensors.items()}, path)


def _remove_dir(path: Path) -> None:
    if path.is_symlink():  # a link planted in the state goes, never what it points at
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def step_dir(state_dir: Path, step: int) -> Path:
    """The directory that holds the state saved after ``step``."""
    return state_dir / f"step-{step:08d}"


def begin_save(state_dir: Path, step: int) -> Path:
    """Rank 0, before every rank writes: a fresh directory for the state of ``step``."""
    directory = step_dir(state_dir, step)
    _remove_dir(directory)  # an uncommitted leftover of a run killed during this very save
    directory.mkdir(parents=True)
    return directory


def save_rng(directory: Path, rank: int) -> None:
    """This process's random generators (torch, CUDA, Python)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    _save_tensors(tensors, directory / f"rng-{rank}.safetensors")
    version, internal, gauss = random.getstate()
    _write_json(directory / f"rng-{rank}.json", {"python": [version, list(internal), gauss]})


def save_state(directory: Path, state: TrainState) -> None:
    """Rank 0, after every rank's RNG is written: tensors and JSON, then the commit."""
    optimizer_tensors, optimizer_meta = _split_optimizer(state.optimizer)
    _save_tensors(state.trainable, directory / TRAINABLE)
    _save_tensors(optimizer_tensors, directory / OPTIMIZER)
    _write_json(directory / STATE_JSON, {"step": state.step, "settings": state.settings, "world": state.world,
                                         "optimizer": optimizer_meta, "scheduler": state.scheduler,
                                         "curve": state.curve})
    _write_json(directory.parent / MANIFEST, {"step": state.step, "dir": directory.name})  # the commit
    remove_uncommitted(directory.parent)


def remove_uncommitted(state_dir: Path) -> None:
    """Remove step directories the manifest does not name (older states, interrupted saves)."""
    manifest = _read_json(state_dir / MANIFEST, state_dir) if (state_dir / MANIFEST).is_file() else {}
    for path in sorted(state_dir.glob("step-*")):
        if path.name != manifest.get("dir"):
            _remove_dir(path)


def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer state dict as flat tensors plus JSON (param groups and any non-tensor values)."""
    tensors, extra = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value
            else:
                extra.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "extra": extra}


def _join_optimizer(tensors: Mapping[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    for index, values in meta.get("extra", {}).items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


# ------------------------------------------------------------------------------------ log

def append_log(state_dir: Path, entry: dict, fresh: bool) -> None:
    """One step of ``log.jsonl``, so a crash keeps the curve so far."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / LOG_NAME, "w" if fresh else "a") as log:
        log.write(json.dumps(entry) + "\n")


def rewrite_log(state_dir: Path, entries: list[dict]) -> None:
    """The log as the resumed state knows it (drops steps logged after the last save)."""
    write_text(state_dir / LOG_NAME, "".join(json.dumps(entry) + "\n" for entry in entries))


# ------------------------------------------------------------------------------------ reading

def _unreadable(path: Path, state_dir: Path, reason: str) -> StateError:
    return StateError(f"{path}: unreadable training state ({reason}); delete {state_dir} to start over")


def _read_json(path: Path, state_dir: Path) -> Any:
    _check_regular(path, state_dir)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _unreadable(path, state_dir, err.__class__.__name__) from None


def _check_regular(path: Path, state_dir: Path) -> None:
    """State files are read only as regular files of the state (a link could point anywhere)."""
    if (path.exists() or path.is_symlink()) and not is_regular_file(path):
        raise _unreadable(path, state_dir, "not a regular file")


def _load_tensors(path: Path, state_dir: Path) -> dict[str, torch.Tensor]:
    _check_regular(path, state_dir)
    try:
        return load_file(path)
    except (OSError, SafetensorError) as err:
        raise _unreadable(path, state_dir, (str(err).splitlines() or ["not safetensors"])[0]) from None


def load_state(state_dir: Path) -> TrainState:
    """The committed state of ``state_dir`` (tensors on CPU)."""
    directory = _committed_dir(state_dir)
    meta = _read_json(directory / STATE_JSON, state_dir)
    remove_uncommitted(state_dir)
    try:
        return TrainState(step=int(meta["step"]), settings=meta["settings"], world=int(meta["world"]),
                          trainable=_load_tensors(directory / TRAINABLE, state_dir),
                          optimizer=_join_optimizer(_load_tensors(directory / OPTIMIZER, state_dir), meta["optimizer"]),
                          scheduler=meta["scheduler"], curve=meta["curve"])
    except StateError:
        raise
    except (KeyError, TypeError, ValueError) as err:  # JSON of the wrong shape
        raise _unreadable(directory / STATE_JSON, state_dir, f"{err.__class__.__name__}: {err}") from None


def _committed_dir(state_dir: Path) -> Path:
    manifest = _read_json(state_dir / MANIFEST, state_dir)
    name = manifest.get("dir") if isinstance(manifest, dict) else None
    if not isinstance(name, str) or not STEP_DIR.fullmatch(name):
        raise _unreadable(state_dir / MANIFEST, state_dir, "no step directory")
    directory = state_dir / name
    if directory.is_symlink() or not directory.is_dir():
        raise _unreadable(directory, state_dir, "not a directory of this state")
    return directory


def load_rng(state_dir: Path, rank: int) -> None:
    """Restore this process's random generators from the committed state."""
    directory = _committed_dir(state_dir)
    tensors = _load_tensors(directory / f"rng-{rank}.safetensors", state_dir)
    version, internal, gauss = _read_json(directory / f"rng-{rank}.json", state_dir)["python"]
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len([k for k in tensors if k.startswith("cuda.")]))]
    if cuda:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate((version, tuple(internal), gauss))


def check_trainable(state: TrainState, params: Mapping[str, torch.nn.Parameter]) -> None:
    """The state must hold a tensor for every trained parameter."""
    missing = sorted(set(params) - set(state.trainable))
    if missing:
        raise StateError(f"the training state has no tensor for {missing[0]}; it belongs to another model")


def restore(state: TrainState, params: Mapping[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
            scheduler: Any) -> None:
    """Copy a loaded state into the live parameters, optimizer and scheduler."""
    check_trainable(state, params)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(state.trainable[name])
    optimizer.load_state_dict(state.optimizer)
    scheduler.load_state_dict(state.scheduler)

