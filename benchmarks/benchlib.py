"""What every benchmark shares: progress lines, peak memory, precision, `--quick`.

Scripts import it as `benchlib` (their own folder is first on sys.path when run as
`python benchmarks/bench_x.py`).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Self

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
# A one-line yes/no guard prompt, for benchmarks where SmolLM2 stands in for a guard LLM
# (scoring costs the same whatever the weights say).
GENERIC_GUARD_OPTIONS = {
    "response_template": "Is the following answer to the question unsafe? Answer unsafe or "
    "safe.\nQuestion: {prompt}\nAnswer: {response}\nVerdict:",
    "labels": ["unsafe", "safe"],
    "label_prefix": " ",
}
STARTED = time.perf_counter()


def say(message: str) -> None:
    """A progress line with the seconds since the benchmark started, printed at once."""
    print(f"[{time.perf_counter() - STARTED:6.0f}s] {message}", flush=True)


def add_common_arguments(parser: argparse.ArgumentParser, *, dtype: bool = True) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: tiny sizes, seconds to a few minutes")
    if dtype:
        parser.add_argument("--dtype", default="auto",
                            choices=("auto", "float32", "bfloat16"),
                            help="auto: bfloat16 where the hardware has it natively, else "
                            "float32 (safekeel.data.precision)")


def pick_dtype(choice: str) -> str:
    """Resolve --dtype as the project does, and say what the hardware is."""
    from safekeel.data.precision import describe_capability, resolve_dtype

    dtype = resolve_dtype(choice)
    say(f"{describe_capability()}; computing in {dtype}")
    return dtype


def rss_mib() -> float:
    """This process's resident set size now (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
    except OSError:
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def process_peak_mib() -> float:
    """Peak RSS of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class PeakRSS:
    """Peak RSS while a block runs, sampled every 20 ms by a thread (ru_maxrss only grows
    over the whole process, so it cannot tell one phase's peak from an earlier one's)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak_mib = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, rss_mib())
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self.peak_mib = rss_mib()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_mib = max(self.peak_mib, rss_mib())
