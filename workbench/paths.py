"""Paths a command is given: checked before the command does any work, and output files written whole or
not at all. Each problem is a `UsageError` naming the option and the path."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from triton_workbench.kernels.errors import UsageError


def existing_database(db: str | os.PathLike | None) -> None:
    """Refuse a `--db` that does not exist (reading it would create an empty database); None (the default
    database) is always fine."""
    if db is not None and not Path(db).expanduser().exists():
        raise UsageError(f"--db {db} does not exist")


def writable_file(path: str | os.PathLike, option: str) -> Path:
    """`path` as a Path, refused unless a file can be written there: it is not a directory and its directory
    exists."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a directory: name a file")
    if not path.parent.is_dir():
        raise UsageError(f"{option} {path}: the directory {path.parent} does not exist")
    return path


@contextmanager
def written_whole(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` for the block to write; it then replaces `path`. If the block (or the
    replacing) fails, the temporary file is removed: never half a file under either name."""
    temporary = path.with_name(f"{path.stem}.partial{path.suffix}")  # the suffix kept: x.csv.gz stays gzip
    try:
        yield temporary
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
