"""Write a directory all at once: build it under a temporary name beside the destination, then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid


@contextlib.contextmanager
def atomic_directory(dst: str | os.PathLike, *, overwrite: bool = False):
    """Yields a temporary directory that becomes `dst` only if the block finishes without an exception.

    Nothing half-written is ever left at `dst`; on failure the temporary directory is removed. What it
    holds is made readable by all (see `make_readable`).
    """
    dst = os.path.abspath(os.fspath(dst))
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} exists (pass overwrite=True / --overwrite to replace it)")
    parent = os.path.dirname(dst)
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise type(e)(f"cannot create {dst}: its parent directory {parent} cannot be made ({e.strerror or e})") from e
    tmp = os.path.join(parent, f".{os.path.basename(dst)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    make_readable(tmp)
    if os.path.exists(dst):
        old = f"{tmp}.old"
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)


def make_readable(root: str) -> None:
    """Files at least 0644 and directories 0755 under `root`: a checkpoint is shared data, but some writers
    create private files (safetensors' save_file writes 0600)."""
    os.chmod(root, os.stat(root).st_mode | 0o755)
    for parent, dirs, files in os.walk(root):
        for name, bits in [(d, 0o755) for d in dirs] + [(f, 0o644) for f in files]:
            path = os.path.join(parent, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode | bits)
