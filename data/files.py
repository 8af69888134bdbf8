"""File helpers every stage shares: a file's sha256 and writes that never leave half a file.

An atomic write goes through a hidden temporary file beside the target (`.NAME.tmp`: hidden
and not ending in the target's suffix, so no glob or dataset reader picks it up) and an
`os.replace` onto the target, so a reader sees the old content or the new, never a part.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (memory stays bounded for large files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def temporary_path(path: Path) -> Path:
    """Where `path` is written before the rename that makes it visible."""
    return path.with_name(f".{path.name}.tmp")


def fsync_directory(directory: Path) -> None:
    """Make a rename durable; best effort (not every platform can open a directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary path to write `path`'s content to (by any writer, e.g. Parquet); renamed
    into place, fsynced, when the block ends, and removed if it fails."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically (see `atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | Path, payload: Any, *, indent: int = 2) -> Path:
    """`payload` as indented JSON with a final newline, written atomically."""
    return atomic_write_text(path, json.dumps(payload, indent=indent) + "\n")


def build_directory_once(target: Path, build: Callable[[Path], None]) -> Path:
    """`build(staging)` into a hidden folder beside `target`, then rename it into place, so
    `target` either does not exist or is whole. Concurrent builders race harmlessly: the
    first rename wins and the others keep its copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # a plain mkdir (not mkdtemp, which is private to the user) keeps the umask's permissions
    staging = target.parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        build(staging)
        try:
            staging.rename(target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
