"""Crash-safe outputs: everything we produce is written under a temporary name and renamed, and
an output never replaces data quikft did not write.

A rename within one filesystem is atomic, so a reader (or a second process) sees either
the old state or the complete new one, never a half-written file or directory. A run killed
before its rename leaves a ``.<name>.<pid>.<random>.partial`` staging directory; the next run
writing the same output removes those whose process is gone. SIGTERM is turned into
``KeyboardInterrupt`` (:func:`handle_sigterm_as_interrupt`), so a terminated run cleans up like
one stopped with Ctrl-C.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any


class OutputError(ValueError):
    """An output location that must not or cannot be written; the message is one line."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as pretty JSON to ``path`` atomically."""
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


# ------------------------------------------------------------------------------------ output checks

def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def check_output(target: str | os.PathLike, marker: str, overwrite: bool = False,
                 inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """Refuse an output location before any work: one-line :class:`OutputError`\\ s.

    ``target`` may be absent or an empty directory; a directory holding ``marker`` (the report
    a previous run of the same job wrote) is replaced only with ``overwrite``; anything else is
    refused, as is a target equal to, inside or around one of ``inputs`` (local paths the job
    reads). The nearest existing ancestor must be a directory we can create entries in.
    """
    target = Path(target)
    resolved = target.resolve()
    for source in inputs:
        if source is not None and Path(source).exists() and _overlaps(resolved, Path(source).resolve()):
            raise OutputError(f"--out {target} overlaps the input {source}: writing it would destroy the input; "
                              f"choose another --out")
    if target.is_dir() and any(target.iterdir()):
        if not (target / marker).is_file():
            raise OutputError(f"--out {target} exists and is not a previous output of this command (no {marker}); "
                              f"choose another --out (quikft never replaces data it did not write)")
        if not overwrite:
            raise OutputError(f"--out {target} holds a previous output; pass --overwrite to replace it, "
                              f"or choose another --out")
    elif target.exists() and not target.is_dir():
        raise OutputError(f"--out {target} exists and is not a directory; choose another --out")
    _check_writable(target)


def _check_writable(target: Path) -> None:
    """The nearest existing ancestor of ``target``'s parent must be a directory we can create entries in.

    A probe directory is created and removed, because permission bits do not tell the whole
    story (a read-only filesystem, root, ACLs).
    """
    ancestor = target.parent  # the staging directory is created beside the target
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputError(f"{target} cannot be created: {ancestor} is not a directory")
    try:
        Path(tempfile.mkdtemp(prefix=".quikft-write-probe.", dir=ancestor)).rmdir()
    except OSError as err:
        raise OutputError(f"{target} is not writable: cannot create a directory in {ancestor} ({err.strerror}); "
                          f"choose another location") from None


def check_file_output(path: str | os.PathLike, setting: str) -> None:
    """A file output (e.g. ``--json``): not a directory, and its directory can be created and written."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{setting} {path} is a directory; pass a file name")
    _check_writable(path)


def prepare_output(target: str | os.PathLike, marker: str, overwrite: bool = False,
                   inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """:func:`check_output`, then remove what killed runs left beside ``target``. Returns ``target``."""
    target = Path(target)
    check_output(target, marker, overwrite, inputs)
    remove_stale_partials(target)
    return target


# ------------------------------------------------------------------------------------ one writer per output

def lock_path(out_dir: str | os.PathLike) -> Path:
    out_dir = Path(out_dir)
    return out_dir.with_name(f".{out_dir.name}.lock")


class OutputLock:
    """An exclusive, non-blocking lock on an output directory (a hidden file beside it) held by one job.

    Two jobs writing one output (or its resumable state) would mix their results and delete each
    other's fresh state, so the second is refused at once, naming the first's job and pid. The
    holder removes the file when it releases the lock; a lock taken on a file that was removed
    meanwhile is retaken on the new one, so two jobs never hold "the" lock at once. A killed job's
    file stays and is simply locked again by the next run (the kernel drops a dead process's locks).
    """

    def __init__(self, out_dir: str | os.PathLike, job: str):
        self.out_dir, self.path = Path(out_dir), lock_path(out_dir)
        self._handle: IO | None = self._acquire(f"{job} (pid {os.getpid()})")

    def _acquire(self, owner: str) -> IO:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            handle = open(self.path, "a+")  # noqa: SIM115 -- held open for the job's life
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.seek(0)
                other = handle.read(80).strip() or "process"
                handle.close()
                raise OutputError(f"{self.out_dir} is being written by another {other}; wait for it to finish or "
                                  f"choose another --out") from None
            if _same_file(handle, self.path):
                handle.seek(0)
                handle.truncate()
                handle.write(owner)
                handle.flush()
                return handle
            handle.close()  # the previous holder removed it between our open and our lock
        raise OutputError(f"{self.out_dir}: could not lock {self.path}; retry")

    def release(self) -> None:
        """Let another job write this output (the end of the process releases it too)."""
        if self._handle is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # while still holding it (see the class docstring)
            self._handle.close()
            self._handle = None


def _same_file(handle: IO, path: Path) -> bool:
    try:
        return os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def is_regular_file(path: str | os.PathLike) -> bool:
    """A regular file itself, not a link to one (state files are read and carried only as such)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


# ------------------------------------------------------------------------------------ staging

def _staging_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_partials(target: str | os.PathLike) -> list[Path]:
    """Remove ``target``'s staging and swap-aside directories whose process is gone; returns them."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    name = glob.escape(target.name)
    removed = []
    for path in [*target.parent.glob(f".{name}.*.partial"), *target.parent.glob(f".{name}.old.*")]:
        pid = path.name[len(target.name) + 2:].removeprefix("old.").split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, overwrite: bool = False, marker: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces ``target`` only if the block succeeds.

    On any exception (Ctrl-C and, through :func:`handle_sigterm_as_interrupt`, SIGTERM included)
    the temporary directory is removed and ``target`` is left untouched. An existing non-empty
    ``target`` is replaced only with ``overwrite`` and, when ``marker`` is given, only if it holds
    that file (a previous output of the same job); this is checked on entry and again at the swap.
    """
    target = Path(target)
    _check_replaceable(target, overwrite, marker)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_staging_prefix(target), suffix=".partial", dir=target.parent))
    try:
        yield tmp
        _share(tmp)
        _check_replaceable(target, overwrite, marker)
        if target.exists():
            # Move the old directory aside first so the swap is as short as possible.
            old = target.with_name(f".{target.name}.old.{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_replaceable(target: Path, overwrite: bool, marker: str | None) -> None:
    if not (target.is_dir() and any(target.iterdir())):
        if target.exists() and not target.is_dir():
            raise FileExistsError(f"{target} exists and is not a directory; choose another --out")
        return
    if not overwrite:
        raise FileExistsError(f"{target} exists and is not empty; pass --overwrite or choose another --out")
    if marker is not None and not (target / marker).is_file():
        raise FileExistsError(f"{target} is not a previous output (no {marker}); choose another --out")


def _share(directory: Path) -> None:
    """Give a finished output the permissions of a normally created one (mkdtemp/mkstemp use 0700/0600)."""
    mask = _umask()
    directory.chmod(0o777 & ~mask)
    for root, dirs, files in os.walk(directory):  # never into a linked directory
        for name in [*dirs, *files]:
            path = Path(root, name)
            if not path.is_symlink():  # a chmod through a link would change a file outside the output
                path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


# ------------------------------------------------------------------------------------ signals

def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"terminated by signal {signum}")


def handle_sigterm_as_interrupt() -> None:
    """Make SIGTERM raise ``KeyboardInterrupt``, so ``finally`` blocks clean up as for Ctrl-C.

    Only the main thread can install handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
