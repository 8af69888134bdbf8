"""A quiet terminal: our progress bars and one-line summaries stay on it; library logs go to
`<output_dir>/safekeel.log`.

Libraries talk on three channels, and each is routed to the log file:

* Python logging: a file handler on the root logger; vLLM is told not to install its own
  handler (VLLM_CONFIGURE_LOGGING=0, so its loggers propagate to the root), and
  transformers' and datasets' own stderr handlers give way to propagation too;
* `warnings.warn`: captured into logging (logger `py.warnings`); a warning of a category
  the project defines (`safekeel.data.precision.PrecisionWarning`: bf16 asked for on a CPU
  that emulates it) is for the user and is printed on the terminal as well;
* bytes written straight to file descriptors 1 and 2 (C++ extensions, child processes such
  as vLLM's engine core): the descriptors point at the log file while a verb runs, and
  Python's `sys.stdout` / `sys.stderr` are re-opened on copies of the terminal's.

transformers' and datasets' progress bars are turned off; ours are tqdm bars on sys.stderr.
With `verbose` nothing is redirected (library output shows as before) and the log file
still gets what reaches Python logging.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from safekeel.data.output_dir import CONSOLE_LOG_NAME, prepare_output_dir

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def is_user_error(err: BaseException) -> bool:
    """A mistake in what the user gave (config, data file, model name, missing extra): the
    project raises these as its own ValueError / ImportError subclasses, messages that name
    the file, row, field or key."""
    own = type(err).__module__.startswith("safekeel.")
    return own and isinstance(err, (ValueError, ImportError))


@contextmanager
def routed_output(log_dir: str | Path, verbose: bool = False) -> Iterator[Path]:
    """While the block runs, library logs go to `log_dir/safekeel.log` (see the module)."""
    # a folder that cannot be written is the user's to fix: one line, before any work
    log_path = prepare_output_dir(log_dir) / CONSOLE_LOG_NAME
    with ExitStack() as stack:
        stack.enter_context(_python_logging_to(log_path))
        stack.enter_context(_own_warnings_on_terminal())
        if not verbose:
            stack.enter_context(_environment(VLLM_CONFIGURE_LOGGING="0",
                                             HF_HUB_DISABLE_PROGRESS_BARS="1"))
            stack.enter_context(_propagating("vllm"))  # in case vLLM was configured already
            _quiet_hugging_face()
            stack.enter_context(_descriptors_to(log_path))
        yield log_path


@contextmanager
def _environment(**defaults: str) -> Iterator[None]:
    """Set variables the user has not set, for the block (child processes inherit them)."""
    applied = {k: v for k, v in defaults.items() if k not in os.environ}
    os.environ.update(applied)
    try:
        yield
    finally:
        for key in applied:
            os.environ.pop(key, None)


@contextmanager
def _propagating(name: str) -> Iterator[None]:
    """Logger `name` without its own handlers, passing its records to the root's."""
    logger = logging.getLogger(name)
    handlers, propagate = list(logger.handlers), logger.propagate
    for handler in handlers:
        logger.removeHandler(handler)
    logger.propagate = True
    try:
        yield
    finally:
        logger.propagate = propagate
        for handler in handlers:
            logger.addHandler(handler)


@contextmanager
def _python_logging_to(log_path: Path) -> Iterator[None]:
    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    # a library's warning once per call site, as the terminal would have shown it
    warnings.simplefilter("default")
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


def is_user_warning(category: type[Warning]) -> bool:
    """A warning the project itself defines (as `is_user_error` reads errors): the user's to
    act on, so it belongs on the terminal, not only in the log file."""
    return category.__module__.startswith("safekeel.")


@contextmanager
def _own_warnings_on_terminal() -> Iterator[None]:
    """Print the project's own warnings on the terminal too, one line each; every warning
    still reaches the log (through `logging.captureWarnings`, entered before this)."""
    from tqdm.auto import tqdm

    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if is_user_warning(category):
            # sys.stderr is the terminal's (`_descriptors_to`); tqdm.write keeps bars intact
            tqdm.write(f"safekeel: warning: {message}", file=sys.stderr)
        shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def _quiet_hugging_face() -> None:
    """transformers: no own stderr handler (propagate to ours), no bars; datasets: no bars
    (its loggers propagate already)."""
    from datasets import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_default_handler()
    transformers_logging.enable_propagation()
    transformers_logging.disable_progress_bar()
    disable_progress_bars()


@contextmanager
def _descriptors_to(log_path: Path) -> Iterator[None]:
    """fds 1 and 2 -> the log file; sys.stdout / sys.stderr keep writing to the terminal."""
    streams = {1: "stdout", 2: "stderr"}
    for name in streams.values():
        getattr(sys, name).flush()
    saved = {fd: os.dup(fd) for fd in streams}
    replaced = {}
    for fd, name in streams.items():
        stream = getattr(sys, name)
        if _fileno(stream) == fd:  # a real terminal / pipe stream (not pytest's capture)
            replaced[name] = stream
            setattr(sys, name, io.TextIOWrapper(
                io.FileIO(os.dup(saved[fd]), "w"), encoding=stream.encoding,
                errors=stream.errors, line_buffering=True, write_through=True))
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    for fd in streams:
        os.dup2(log_fd, fd)
    os.close(log_fd)
    try:
        yield
    finally:
        for name in streams.values():
            getattr(sys, name).flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        for name, stream in replaced.items():
            getattr(sys, name).close()
            setattr(sys, name, stream)


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None
