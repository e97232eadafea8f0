"""Compile a C kernel of this package once per machine and load it with ctypes.

The shared library is cached under $QSHARD_CACHE/kernels (default ~/.cache/qshard/kernels), named
by a hash of the source, flags and compiler, and written atomically, so concurrent ranks that
build it at the same time cannot load a half-written file. Failure to build is not an error: the
caller gets the reason and uses another backend.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE_DIR = Path(__file__).parent


def cache_dir() -> Path:
    root = os.environ.get("QSHARD_CACHE") or Path.home() / ".cache" / "qshard"
    return Path(root) / "kernels"


def compiler() -> str | None:
    for name in (os.environ.get("CC"), "gcc", "cc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _source_with_includes(src: Path) -> bytes:
    """The source's bytes and those of the local headers it includes (#include "..."), recursively:
    the cache key must change when any of them does."""
    text = src.read_bytes()
    for name in re.findall(rb'^\s*#include\s+"([^"]+)"', text, flags=re.M):
        text += _source_with_includes(src.parent / name.decode())
    return text


@functools.cache
def load(source: str, flags: tuple[str, ...]) -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None) or (None, why not) for kernels/<source> compiled with `flags`."""
    cc = compiler()
    if cc is None:
        return None, "no C compiler (set CC, or install gcc)"
    src = SOURCE_DIR / source
    text = _source_with_includes(src)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(text + repr((flags, version)).encode()).hexdigest()[:16]
    target = cache_dir() / f"{src.stem}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so.tmp")
        os.close(fd)
        cmd = [cc, "-O3", "-shared", "-fPIC", *flags, str(src), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            os.unlink(tmp)
            return None, f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}"
        os.replace(tmp, target)  # atomic: a concurrent builder's identical file may win, either is fine
        log.info("built %s", target)
    try:
        return ctypes.CDLL(str(target)), None
    except OSError as e:
        return None, f"cannot load {target}: {e}"
