"""Output folders: checked writable before a stage starts; a full disk said in one line.

Every stage checks its output folder before it loads a model or reads the corpus, so a
folder it cannot write fails at once, not after the first hour of work. Results are written
through temporary files renamed into place (shards, manifests, trainer state, generations),
so a disk that fills up mid-write leaves nothing a rerun would take as finished;
`disk_errors` turns that OSError into one line naming the folder and what to do.
"""

from __future__ import annotations

import errno
import functools
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# OSErrors that mean "this folder cannot take our output", not a bug.
_OUTPUT_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


_WRITE_CHECK = ".safekeel-write-check-"
CONSOLE_LOG_NAME = "safekeel.log"  # library logs of a CLI run (safekeel.console)


def is_bookkeeping(name: str) -> bool:
    """A file the CLI or `prepare_output_dir` puts in any output folder (the console log, a
    write probe a kill left behind): not a stage's content, so not foreign either."""
    return name == CONSOLE_LOG_NAME or name.startswith(_WRITE_CHECK)


class OutputDirError(ValueError):
    """An output folder that cannot be used (not writable, full, or not ours)."""


def _reason(err: OSError) -> str | None:
    if err.errno in _OUTPUT_ERRNOS:
        return _OUTPUT_ERRNOS[err.errno]
    if "No space left on device" in str(err):  # pyarrow's IO errors carry no errno
        return _OUTPUT_ERRNOS[errno.ENOSPC]
    return None


def prepare_output_dir(path: str | Path) -> Path:
    """Create `path` if needed and prove it writable with a probe file (removed again)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"output_dir {path}: is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=_WRITE_CHECK, dir=path)
        try:
            os.write(handle, b"ok")
            os.fsync(handle)
        finally:
            os.close(handle)
            os.unlink(probe)
    except OSError as err:
        reason = _reason(err) or err.strerror or str(err)
        raise OutputDirError(
            f"output_dir {path}: cannot be written ({reason}); choose another folder with "
            "output_dir, or free space / fix its permissions"
        ) from None
    return path


@contextmanager
def disk_errors(path: str | Path) -> Iterator[None]:
    """Turn a full disk or lost write permission under `path` into an `OutputDirError`."""
    try:
        yield
    except OSError as err:
        reason = _reason(err)
        if reason is None:
            raise
        where = f" writing {err.filename}" if err.filename else ""
        raise OutputDirError(
            f"output_dir {path}: {reason}{where}; what was finished is kept and nothing "
            "unfinished is marked done: free space (or fix permissions) and rerun to resume"
        ) from err


def guards_output_dir(stage):
    """Decorate a stage `stage(cfg, ...)`: OSErrors of a full or unwritable
    `cfg.output_dir` reach the user as `OutputDirError` (one line), not a traceback."""

    @functools.wraps(stage)
    def run(cfg, *args, **kwargs):
        with disk_errors(cfg.output_dir):
            return stage(cfg, *args, **kwargs)

    return run
