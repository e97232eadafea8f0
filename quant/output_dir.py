"""Where a writer (quantize, write-random, prepare-default) may put a model directory, and how it
gets there without ever destroying data.

`check_output_dir` runs before any expensive work: it refuses an existing file, a path under a
file, a non-empty directory (unless overwrite), anything that is, contains or lies inside an
input directory (even with overwrite), and a place that cannot be written. `atomic_directory`
then writes into a temporary directory beside the target and renames it into place; an old
directory is replaced only at the very end (moved aside, the new one moved in, the old one
deleted), so a failure leaves either the old or the new directory, never nothing.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from kernels.errors import InputError


def check_output_dir(target: str | Path, *, overwrite: bool, inputs: Iterable[str | Path] = (),
                     option: str = "--output", overwrite_option: str = "--overwrite") -> Path:
    """The resolved target, or InputError naming `option` and the path. Cheap: call it before
    reading any weight. `inputs` are directories the writer reads from."""
    given = Path(target)
    resolved = given.resolve()  # symlinks followed: the check and the write see the same place
    where = f"{option} {given}" + (f" (= {resolved})" if str(resolved) != str(given.absolute()) else "")
    if resolved.parent == resolved:
        raise InputError(f"{where} is a filesystem root; choose a new directory")
    # an input is compared as given and with its links followed: either form inside the target
    # would be lost with it
    sources = dict.fromkeys(form for s in inputs for form in (Path(s).absolute(), Path(s).resolve()))
    for source in sources:
        if resolved == source:
            raise InputError(f"{where} is the input model directory; choose another")
        if source.is_relative_to(resolved):
            raise InputError(f"{where} contains the input model directory {source}; choose another")
        if resolved.is_relative_to(source):
            raise InputError(f"{where} is inside the input model directory {source}; choose another")
    existing = next(p for p in (resolved, *resolved.parents) if p.exists())
    if existing == resolved:
        if not resolved.is_dir():
            raise InputError(f"{where} is an existing file; choose a directory")
        if not overwrite and any(resolved.iterdir()):
            raise InputError(f"{where} is a non-empty directory; pass {overwrite_option} to replace it, "
                             f"or choose a new directory")
        existing = resolved.parent  # the temporary directory and the rename happen there
    elif not existing.is_dir():
        raise InputError(f"{where} is under {existing}, which is a file, not a directory")
    _probe_writable(existing, where)
    return resolved


def _probe_writable(directory: Path, where: str) -> None:
    """Create and remove a file in `directory`: permission bits say nothing when running as root,
    and /proc or /sys refuse only an actual write."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".qshard-probe-", dir=directory)
    except OSError as e:
        raise InputError(f"{where}: cannot write in {directory}: creating a file there failed "
                         f"({e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


@contextmanager
def atomic_directory(target: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = (),
                     option: str = "--output", overwrite_option: str = "--overwrite") -> Iterator[Path]:
    """A temporary directory beside `target` that becomes `target` only when the block succeeds.
    An existing non-empty target is replaced only with overwrite (checked again at the end, in case
    something appeared there meanwhile); on any failure the temporary directory is removed and
    the target is as it was."""
    target = check_output_dir(target, overwrite=overwrite, inputs=inputs, option=option,
                              overwrite_option=overwrite_option)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_directory_beside(target)
    try:
        yield tmp
        _move_into_place(tmp, target, overwrite, f"{option} {target}", overwrite_option)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _new_directory_beside(target: Path) -> Path:
    """An empty `.name-XXXXXXXX` directory next to target, with the permissions of a plain mkdir
    (the umask's; tempfile.mkdtemp's 0700 would make the finished model unreadable to others)."""
    while True:
        path = target.parent / f".{target.name}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _move_into_place(tmp: Path, target: Path, overwrite: bool, where: str, overwrite_option: str) -> None:
    if not target.exists() and not target.is_symlink():
        os.replace(tmp, target)
        return
    if target.is_dir() and not any(target.iterdir()):
        os.rmdir(target)  # an empty directory holds nothing to lose
        os.replace(tmp, target)
        return
    if not overwrite or not target.is_dir():
        raise InputError(f"{where} was filled while writing; pass {overwrite_option} to replace it")
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
    os.replace(target, old / target.name)  # aside, not deleted: restored if the next rename fails
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old / target.name, target)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
