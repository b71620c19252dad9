"""Directories that appear whole: written beside their place, then renamed into it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["replace_dir"]


@contextmanager
def replace_dir(out_dir: str | os.PathLike, marker: str) -> Iterator[Path]:
    """A fresh directory beside ``out_dir`` for the block to fill, ``marker`` (a file name)
    written last. When the block ends without error the directory becomes ``out_dir`` at
    once (an ``out_dir`` without ``marker``, left incomplete, is removed first), unless a
    complete ``out_dir`` appeared meanwhile (another process): that one is kept. On error
    the fresh directory is removed and ``out_dir`` is left as it was."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; this is an ordinary directory
        yield tmp
        if (out_dir / marker).is_file():
            shutil.rmtree(tmp)
        else:
            if out_dir.exists():
                shutil.rmtree(out_dir)
            os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
