"""Atomic file writes: a reader (or a restart after kill -9) sees the old file or the new one, never
part of one. Write beside the destination, then `os.replace` (atomic on POSIX within a directory);
`fsync` first where the write must also survive a machine crash."""
from __future__ import annotations

import os
from pathlib import Path


def fsync(path: str | Path) -> None:
    """Flush file or directory `path` to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | Path) -> None:
    """`fsync` every file and directory under `root`, `root` included."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            fsync(Path(dirpath) / f)
        fsync(Path(dirpath))


def temporary(path: str | Path) -> Path:
    """The hidden name a write to `path` goes to first: `.<name>.tmp-<pid>` beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns `path`."""
    tmp = temporary(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return Path(path)
