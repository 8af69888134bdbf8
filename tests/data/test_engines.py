"""The one vLLM engine policy: arguments per role, context sizing, environment, start-up."""

import os

import pytest

from safekeel.annotate.activations import WORKER_EXTENSION
from safekeel.data import engines
from safekeel.data.engines import (
    EngineError,
    EngineSpec,
    context_length,
    cpu_environment,
    engine_environment,
    engine_kwargs,
)

KEYS = ("OMP_NUM_THREADS", "VLLM_CPU_NUM_OF_RESERVED_CPU", "VLLM_CPU_OMP_THREADS_BIND",
        "VLLM_ENABLE_V1_MULTIPROCESSING")


def kwargs_for(model_dir, cpu=True, model_limit=8192, **fields):
    return engine_kwargs(EngineSpec(model=str(model_dir), **fields), model_limit=model_limit,
                         cpu=cpu)


def test_context_is_the_setting_else_the_need_within_the_model_else_the_model():
    assert context_length(512, 100, 8192) == 512
    assert context_length(None, 300, 8192) == 300
    assert context_length(None, 9000, 8192) == 8192
    assert context_length(None, 300, None) == 300
    assert context_length(None, None, 8192) == 8192


def test_needed_tokens_size_the_engine_from_the_model_config(tiny_model_dir):
    # the tiny model's config says 512 positions: a larger need is capped there
    assert engine_kwargs(EngineSpec(model=str(tiny_model_dir), needed_tokens=40),
                         cpu=True)["max_model_len"] == 40
    assert engine_kwargs(EngineSpec(model=str(tiny_model_dir), needed_tokens=10_000),
                         cpu=True)["max_model_len"] == engines.model_context_limit(
                             str(tiny_model_dir))


def test_memory_share_and_in_process_defaults(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    kwargs = kwargs_for(tiny_model_dir, dtype="bfloat16", seed=3)
    assert kwargs["gpu_memory_utilization"] == engines.CPU_MEMORY_SHARE
    # on CPU a fixed KV cache: the share rule subtracts every in-process engine's memory
    assert kwargs["kv_cache_memory_bytes"] == engines.CPU_KV_CACHE_GIB * 1024**3
    assert "kv_cache_memory_bytes" not in kwargs_for(tiny_model_dir, cpu=False)
    assert "kv_cache_memory_bytes" not in kwargs_for(tiny_model_dir, gpu_memory_utilization=0.2)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    assert "kv_cache_memory_bytes" not in kwargs_for(tiny_model_dir)
    assert kwargs["distributed_executor_backend"] == "uni"
    assert (kwargs["dtype"], kwargs["seed"], kwargs["max_model_len"]) == ("bfloat16", 3, 8192)
    assert "enable_prefix_caching" not in kwargs and "block_size" not in kwargs
    assert kwargs_for(tiny_model_dir, cpu=False)["gpu_memory_utilization"] == (
        engines.GPU_MEMORY_SHARE)
    assert kwargs_for(tiny_model_dir, gpu_memory_utilization=0.1)["gpu_memory_utilization"] == 0.1
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    split = kwargs_for(tiny_model_dir, cpu=False, tensor_parallel_size=2)
    assert "distributed_executor_backend" not in split  # vLLM's own multiprocess default
    assert kwargs_for(tiny_model_dir, distributed_executor_backend="mp")[
        "distributed_executor_backend"] == "mp"


def test_weight_loading_bars_follow_the_quiet_console(tiny_model_dir, monkeypatch):
    monkeypatch.delenv("VLLM_CONFIGURE_LOGGING", raising=False)
    assert kwargs_for(tiny_model_dir)["use_tqdm_on_load"] is True  # a library call: vLLM's own
    monkeypatch.setenv("VLLM_CONFIGURE_LOGGING", "0")  # what the CLI's quiet console sets
    assert kwargs_for(tiny_model_dir)["use_tqdm_on_load"] is False


def test_star_turns_on_prefix_caching_with_small_blocks_on_cpu(tiny_model_dir):
    star = kwargs_for(tiny_model_dir, role="star")
    assert (star["enable_prefix_caching"], star["block_size"]) == (True, engines.STAR_BLOCK_SIZE)
    assert "block_size" not in kwargs_for(tiny_model_dir, role="star", cpu=False)
    user = kwargs_for(tiny_model_dir, role="star", enable_prefix_caching=False, block_size=16)
    assert (user["enable_prefix_caching"], user["block_size"]) == (False, 16)


def test_activation_engines_run_whole_prompts_eagerly_with_the_hooks(tiny_model_dir):
    assert engines.ACTIVATION_WORKER_EXTENSION == WORKER_EXTENSION
    kwargs = kwargs_for(tiny_model_dir, role="activations", needed_tokens=3000)
    assert kwargs["worker_extension_cls"] == WORKER_EXTENSION
    assert kwargs["enforce_eager"] and not kwargs["enable_prefix_caching"]
    assert not kwargs["enable_chunked_prefill"]
    assert kwargs["max_model_len"] == 3000 and kwargs["max_num_batched_tokens"] >= 3000
    for bad in ({"enable_prefix_caching": True}, {"extra": {"enforce_eager": False}},
                {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"}):
        with pytest.raises(EngineError, match="conflicting"):
            kwargs_for(tiny_model_dir, role="activations", **bad)


def test_data_parallel_needs_the_external_launcher(tiny_model_dir):
    with pytest.raises(EngineError, match="data_parallel_size=2.*num_workers"):
        kwargs_for(tiny_model_dir, data_parallel_size=2)
    launched = kwargs_for(tiny_model_dir, data_parallel_size=2,
                          distributed_executor_backend="external_launcher")
    assert launched["data_parallel_size"] == 2


def test_environment_fills_gaps_and_keeps_user_values(monkeypatch):
    for key in KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    wanted = engine_environment(EngineSpec(model="m"), cpu=True)
    assert "OMP_NUM_THREADS" not in wanted
    cores = len(os.sched_getaffinity(0))
    assert wanted["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert wanted["VLLM_CPU_OMP_THREADS_BIND"] == (f"0-{cores - 1}" if cores > 1 else "0")
    assert wanted["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert engine_environment(EngineSpec(model="m"), cpu=False) == {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert cpu_environment(1)["VLLM_CPU_OMP_THREADS_BIND"] == "0"


def test_start_engine_sets_the_environment_only_while_it_builds(monkeypatch, tiny_model_dir):
    for key in KEYS:
        monkeypatch.delenv(key, raising=False)
    seen = {}

    class FakeLLM:
        def __init__(self, **kwargs):
            seen.update(kwargs=kwargs, env={k: os.environ.get(k) for k in KEYS})

    monkeypatch.setattr(engines, "require_vllm", lambda what: type("V", (), {"LLM": FakeLLM}))
    monkeypatch.setattr(engines, "on_cpu", lambda: True)
    engines.start_engine(EngineSpec(model=str(tiny_model_dir), role="generation",
                                    max_model_len=64))
    assert seen["env"]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert seen["env"]["OMP_NUM_THREADS"] == str(len(os.sched_getaffinity(0)))
    assert seen["kwargs"]["max_model_len"] == 64
    assert all(key not in os.environ for key in KEYS)  # restored after the build


def test_missing_vllm_is_named_with_the_install_hint(monkeypatch):
    monkeypatch.setattr(engines.importlib.util, "find_spec", lambda name: None)
    assert not engines.vllm_available()
    with pytest.raises(EngineError, match=r"a vLLM guard engine needs the vllm package.*pip"):
        engines.start_engine(EngineSpec(model="m"))


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bf16_only_where_the_cpu_has_it(tiny_model_dir, cpu_bf16, native):
    """vLLM's own auto would run a float32 checkpoint in bf16 even where bf16 is emulated."""
    cpu_bf16(native)
    for role in ("guard", "star", "generation", "activations"):
        assert kwargs_for(tiny_model_dir, role=role)["dtype"] == (
            "bfloat16" if native else "float32")
    assert kwargs_for(tiny_model_dir, dtype="float32")["dtype"] == "float32"


def test_explicit_bf16_on_a_cpu_without_it_warns(tiny_model_dir, cpu_bf16, recwarn):
    from safekeel.data.precision import PrecisionWarning

    cpu_bf16(True)
    assert kwargs_for(tiny_model_dir, dtype="bfloat16")["dtype"] == "bfloat16"
    assert not recwarn.list
    cpu_bf16(False)
    with pytest.warns(PrecisionWarning, match="42x slower than float32"):
        assert kwargs_for(tiny_model_dir, dtype="bfloat16")["dtype"] == "bfloat16"


def test_gpu_engines_follow_the_gpus_bf16_support(tiny_model_dir, monkeypatch):
    from safekeel.data import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_bf16"}))
    for supported, expected in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(precision, "cuda_bf16_supported", lambda s=supported: s)
        assert kwargs_for(tiny_model_dir, cpu=False)["dtype"] == expected


def test_an_unknown_dtype_is_an_engine_error(tiny_model_dir):
    with pytest.raises(EngineError, match="guard engine: dtype 'half'"):
        kwargs_for(tiny_model_dir, dtype="half")
