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
    cores = sorted(os.sched_getaffinity(0))
    assert wanted["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert wanted["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(map(str, cores))
    assert wanted["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert engine_environment(EngineSpec(model="m"), cpu=False) == {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    # a process pinned to core 1 binds vLLM's threads to core 1, not to core 0
    assert cpu_environment([1]) == {"OMP_NUM_THREADS": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                                    "VLLM_CPU_OMP_THREADS_BIND": "1"}
    assert cpu_environment([0, 2, 3])["VLLM_CPU_OMP_THREADS_BIND"] == "0,2,3"


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


def test_enforce_eager_auto_compiles_only_when_the_work_pays(tiny_model_dir, monkeypatch):
    # the measured rates, mocked: compiling costs 100 s and saves 0.01 s a prompt token and
    # 0.1 s a generated token
    monkeypatch.setattr(engines, "COMPILE_EXTRA_START_S", 100.0)
    monkeypatch.setattr(engines, "COMPILE_SAVES_PER_PROMPT_TOKEN_S", 0.01)
    monkeypatch.setattr(engines, "COMPILE_SAVES_PER_NEW_TOKEN_S", 0.1)
    small = engines.EngineWork(prompts=10, prompt_tokens=1_000, new_tokens=500)  # saves 60 s
    large = engines.EngineWork(prompts=100, prompt_tokens=5_000, new_tokens=600)  # saves 110 s
    assert kwargs_for(tiny_model_dir, work=small)["enforce_eager"] is True
    assert kwargs_for(tiny_model_dir, work=large)["enforce_eager"] is False
    assert kwargs_for(tiny_model_dir, role="star", work=large)["enforce_eager"] is False
    # explicit settings win both ways; the activation engine is always eager
    assert kwargs_for(tiny_model_dir, work=small, enforce_eager=False)["enforce_eager"] is False
    assert kwargs_for(tiny_model_dir, work=large, enforce_eager=True)["enforce_eager"] is True
    assert kwargs_for(tiny_model_dir, role="activations", work=large)["enforce_eager"] is True
    # work unknown, or a GPU: vLLM's default (compiled)
    assert kwargs_for(tiny_model_dir)["enforce_eager"] is False
    assert kwargs_for(tiny_model_dir, cpu=False, work=small)["enforce_eager"] is False
    with pytest.raises(EngineError, match="enforce_eager"):
        kwargs_for(tiny_model_dir, enforce_eager="sometimes")


def test_the_eager_choice_and_its_reason_are_logged(tiny_model_dir, monkeypatch, caplog):
    monkeypatch.setattr(engines, "COMPILE_EXTRA_START_S", 100.0)
    monkeypatch.setattr(engines, "COMPILE_SAVES_PER_PROMPT_TOKEN_S", 0.001)
    caplog.set_level("INFO", logger=engines.__name__)
    kwargs_for(tiny_model_dir, role="generation",
               work=engines.EngineWork(prompts=3, prompt_tokens=300, new_tokens=30))
    assert "generation engine: enforce_eager=True (auto, 3 prompts, 300 prompt tokens" in (
        caplog.text)
    kwargs_for(tiny_model_dir, enforce_eager=False)
    assert "enforce_eager=False (set explicitly)" in caplog.text


def test_the_measured_break_even_is_recorded():
    """auto rests on the figures of benchmarks/bench_engine_compile.py, not on zeros."""
    assert engines.COMPILE_EXTRA_START_S > 0
    assert engines.COMPILE_SAVES_PER_PROMPT_TOKEN_S >= 0
    assert engines.COMPILE_SAVES_PER_NEW_TOKEN_S >= 0
