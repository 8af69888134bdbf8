"""The guard's settings: one `GuardSettings` for every place the guard LLM serves.

Annotate's critic and STAR (`annotate --critic.*`) and evaluate's Safety Critic judge
(`evaluate --critic.*`) read the same dataclass, passed on unchanged, so the same guard
scores with the same dtype, backend, context and engine settings in both stages. What an
engine does with them is `data.engines`'s policy (STAR turns prefix caching on there).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from safekeel.data.config import option
from safekeel.data.guard.templates import MODES

BACKENDS: tuple[str, ...] = ("auto", "vllm", "transformers")
DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")


class CriticError(ValueError):
    """The critic's settings, guard, engine or input cannot be used; the message says where."""


@dataclass
class GuardSettings:
    """The guard LLM and how it is served: the `critic:` section of annotate and evaluate.

    `None` means "the engine policy's default" (`data.engines`). An empty `model` means no
    guard. `threshold` is read by evaluate's judge only (annotate stores P(unsafe) itself).
    """

    model: str = option("", help="Guard model: HF dir, hub id (e.g. meta-llama/Llama-Guard-3-1B) "
                        "or a data.models alias; empty: no critic.")
    revision: str | None = option(None, help="Hub revision of the guard.")
    template: str = option("llama_guard_3", help="Guard prompt template: llama_guard_3, "
                           "llama_guard_2, shieldgemma, granite_guardian or generic.")
    template_options: dict[str, Any] = option({}, help="Template options, e.g. "
                                              "{excluded_categories: [S7]} or, for generic, "
                                              "{response_template: ..., labels: [Yes, No]}.")
    mode: Literal["response", "prompt"] = option(
        "response", help="response: judge the last assistant turn; prompt: the user's request.")
    backend: Literal["auto", "vllm", "transformers"] = option(
        "auto", help="auto: vLLM if installed, else transformers (the reference).")
    threshold: float = option(0.5, help="evaluate's judge: a response is unsafe when P(unsafe) "
                              ">= threshold.")
    batch_size: int = option(64, help="Rows per forward (transformers) or engine call (vLLM); "
                             "evaluate's judge retries a failing batch row by row.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", help="Guard weights' dtype; auto: bfloat16 where the hardware has it "
        "natively (GPU with bf16, CPU with AVX512-BF16 or AMX), else float32.")
    max_model_len: int | None = option(None, help="Guard context in tokens; longer inputs are "
                                       "cut inside the template and counted. None: the model's.")
    tensor_parallel_size: int = option(1, help="vLLM: GPUs one guard is split over.")
    data_parallel_size: int = option(1, help="vLLM: data-parallel ranks (needs torchrun and "
                                     "distributed_executor_backend=external_launcher; otherwise "
                                     "use annotate's num_workers).")
    gpu_memory_utilization: float | None = option(
        None, help="vLLM: share of accelerator memory (of CPU memory on CPU) to reserve; "
        "None: 0.9 on GPU, a 2 GiB KV cache on CPU (data.engines). VLLM_CPU_KVCACHE_SPACE "
        "(GiB), if set, wins on CPU.")
    enable_prefix_caching: bool | None = option(None, help="vLLM prefix caching; None: on when "
                                                "STAR runs, else vLLM's default.")
    block_size: int | None = option(None, help="vLLM KV block size; None: 32 on CPU when STAR "
                                    "runs, else vLLM's default.")
    enforce_eager: Literal["auto", True, False] = option(
        "auto", help="vLLM: true skips graph compilation (faster start-up, slower per "
        "token); auto: compile only when the rows to score pay for it (data.engines).")
    distributed_executor_backend: str | None = option(
        None, help="vLLM executor: None (in this process on one device, else vLLM's default), "
        "uni, mp, ray, external_launcher.")
    trust_remote_code: bool = option(False, help="Allow the guard's code from the hub.")
    device: str | None = option(None, help="transformers backend: None picks cuda if "
                                "available, else cpu.")
    seed: int = option(0, help="Engine seed.")
    progress: bool = option(True, help="Show a progress bar with rows/s.")

    @property
    def enabled(self) -> bool:
        return bool(self.model.strip())

    def check(self) -> None:
        """`validate`, and a guard model must be named: what building a critic needs."""
        self.validate()
        if not self.enabled:
            raise CriticError(
                "critic setting 'model': expected the guard model's path or hub id, got ''"
            )

    def validate(self) -> None:
        """Raise `CriticError` naming the first setting that is not usable."""

        def bad(name: str, expected: str) -> CriticError:
            return CriticError(
                f"critic setting {name!r}: expected {expected}, got {getattr(self, name)!r}"
            )

        if not isinstance(self.model, str):
            raise bad("model", "the guard model's path or hub id")
        if not isinstance(self.template, str) or not self.template:
            raise bad("template", "a guard template name")
        if not isinstance(self.template_options, Mapping):
            raise bad("template_options", "a mapping of template options")
        if self.mode not in MODES:
            raise bad("mode", f"one of {list(MODES)}")
        if self.backend not in BACKENDS:
            raise bad("backend", f"one of {list(BACKENDS)}")
        if isinstance(self.threshold, bool) or not (
            isinstance(self.threshold, (int, float)) and 0.0 <= self.threshold <= 1.0
        ):
            raise bad("threshold", "a number in [0, 1]")
        if self.dtype not in DTYPES:
            raise bad("dtype", f"one of {list(DTYPES)}")
        for name in ("batch_size", "tensor_parallel_size", "data_parallel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise bad(name, "an integer >= 1")
        if self.max_model_len is not None and (
            isinstance(self.max_model_len, bool)
            or not isinstance(self.max_model_len, int)
            or self.max_model_len < 2
        ):
            raise bad("max_model_len", "None or an integer >= 2")
        if self.block_size is not None and (
            isinstance(self.block_size, bool)
            or not isinstance(self.block_size, int)
            or self.block_size < 1
        ):
            raise bad("block_size", "None or an integer >= 1")
        if self.gpu_memory_utilization is not None and not (
            isinstance(self.gpu_memory_utilization, (int, float))
            and 0 < self.gpu_memory_utilization <= 1
        ):
            raise bad("gpu_memory_utilization", "None or a number in (0, 1]")
        if not (self.enforce_eager == "auto" or isinstance(self.enforce_eager, bool)):
            raise bad("enforce_eager", "auto, true or false")
