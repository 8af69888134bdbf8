"""vLLM CPU environment defaults: set where unset, never override the user."""

import os

import pytest
import torch

from safekeel.data.vllm_env import prepare_cpu_engine_environment

KEYS = ("OMP_NUM_THREADS", "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_OMP_THREADS_BIND")


def test_defaults_fill_gaps_and_keep_user_values(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("GPU machine: nothing is set")
    for key in KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    applied = prepare_cpu_engine_environment()
    assert "OMP_NUM_THREADS" not in applied and os.environ["OMP_NUM_THREADS"] == "7"
    cores = len(os.sched_getaffinity(0))
    assert applied["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert applied["VLLM_CPU_OMP_THREADS_BIND"] == (f"0-{cores - 1}" if cores > 1 else "0")
    assert prepare_cpu_engine_environment() == {}  # second call: everything is set
