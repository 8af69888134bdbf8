"""`make test` runs pytest-xdist workers, each pinned to its own share of the cores
(tests/conftest.py); unpinned, their OpenMP threads thrash each other."""

from __future__ import annotations

import os

import pytest
import torch


def test_an_xdist_worker_runs_on_its_own_cores_with_as_many_threads():
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if "PYTEST_XDIST_WORKER" not in os.environ or workers < 2 or (os.cpu_count() or 1) < workers:
        pytest.skip("not a worker of a parallel run with a core for each worker")
    mine = os.sched_getaffinity(0)
    assert len(mine) <= -(-(os.cpu_count() or 1) // workers)  # its share, not every core
    assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"]) == len(mine)
