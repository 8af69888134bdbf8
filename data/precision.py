"""Precision by what the hardware does fast: `auto` picks bfloat16 only where it is native.

A bfloat16 matmul is fast on GPUs that support it and on CPUs with AVX512-BF16 or AMX
(Intel Sapphire Rapids and later, AMD Zen 4 and later) or the Arm BF16 extension. Elsewhere
(e.g. an AVX2-only CPU) torch emulates it, and the same matmul runs 15-80x slower than in
float32 (measured on a 2-core AVX2 machine: 1.2 GFLOP/s bf16 against 127 GFLOP/s float32).
Mixed-precision autocast to bf16 pays that price on every layer.

    resolve_dtype("auto")              -> "bfloat16" where native, else "float32"
    resolve_dtype("bfloat16")          -> "bfloat16", with a warning on a CPU without it
    resolve_mixed_precision("auto")    -> accelerate's "bf16" / "fp16" / "no" likewise

Every model load resolves its dtype here: `data.engines` for every vLLM engine, the guard's
and generation's transformers loads, training's autocast. The warning states the slowdown,
measured once per process on a small matmul (well under a second even where bf16 is
emulated); `safekeel.console` also prints it on the terminal, whose library warnings
otherwise go to the log file. `describe_capability()` names what was detected, for
logs and benchmark headers. The capability checks are small functions (`cpu_flags`,
`cuda_available`, `cuda_bf16_supported`, `cuda_device_name`) so tests can replace them.
"""

from __future__ import annotations

import functools
import logging
import platform
import time
import warnings
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Names a dtype option may take; "auto" is resolved by `resolve_dtype`.
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
HALF_DTYPES = ("bfloat16", "float16")
# /proc/cpuinfo flags that make a half-precision matmul native on a CPU
# (x86: AVX512-BF16 / AVX512-FP16 instructions or AMX tiles; Arm: the BF16 / FP16 extensions).
NATIVE_CPU_FLAGS = {
    "bfloat16": frozenset({"avx512_bf16", "amx_bf16", "bf16"}),
    "float16": frozenset({"avx512_fp16", "amx_fp16", "fphp", "asimdhp"}),
}
CPUINFO = Path("/proc/cpuinfo")
EMULATED_RANGE = "15-80x"  # the bf16/float32 matmul time ratios seen on AVX2 machines
WARN_SLOWDOWN = 1.5  # warn when an emulated half matmul is at least this much slower


class PrecisionWarning(UserWarning):
    """A half-precision dtype was asked for on hardware that only emulates it."""


_warned: set[str] = set()  # the PrecisionWarning messages this process has shown


# --------------------------------------------------------------------------- capability


def cuda_available() -> bool:
    return torch.cuda.is_available()


def cuda_bf16_supported() -> bool:
    return torch.cuda.is_bf16_supported()


def cuda_device_name() -> str:
    return torch.cuda.get_device_name()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty where it cannot be read)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return frozenset()
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        # x86 lists them under "flags", Arm under "Features"; every core repeats the list
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return frozenset(flags)


def cpu_native(dtype: str) -> bool:
    """Whether this CPU computes `dtype` matmuls natively (float32 always is)."""
    if dtype not in NATIVE_CPU_FLAGS:
        return True
    return bool(cpu_flags() & NATIVE_CPU_FLAGS[dtype])


def bf16_is_native(device: str | None = None) -> bool:
    """Whether bfloat16 runs natively on `device` ("cuda", "cpu"; None: CUDA when present)."""
    if device is None:
        device = "cuda" if cuda_available() else "cpu"
    if device.startswith("cuda"):
        return cuda_bf16_supported()
    return cpu_native("bfloat16")


def describe_capability() -> str:
    """One line naming the hardware and whether bf16 is native, e.g. for benchmark headers."""
    if cuda_available():
        support = "native" if cuda_bf16_supported() else "not supported"
        return f"GPU {cuda_device_name()}: bf16 {support}"
    flags = cpu_flags()
    isa = torch.backends.cpu.get_cpu_capability()  # what torch's kernels use: AVX2, AVX512, ...
    present = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile",
                              "avx512_fp16", "bf16"})
    native = "native" if cpu_native("bfloat16") else "emulated (slow)"
    return (f"CPU {platform.machine()} ({isa} kernels; flags: {', '.join(present) or 'none'}): "
            f"bf16 {native}")


# --------------------------------------------------------------------------- measurement


def matmul_flops(dtype: torch.dtype, size: int, repeats: int) -> float:
    """FLOP/s of a square `size` matmul in `dtype` on the CPU, best of `repeats` timings."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    a @ b  # first call: allocations, kernel selection
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / max(best, 1e-9)


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048),
                repeats: int = 5) -> float:
    """This machine's practical matmul peak in `dtype`: the best of a few large squares."""
    return max(matmul_flops(dtype, size, repeats) for size in sizes)


@functools.cache
def cpu_slowdown(dtype: str) -> float:
    """How many times slower a `dtype` matmul runs than float32 here (measured once)."""
    half = getattr(torch, dtype)
    # 256x256: 34 MFLOP, about 30 ms even at the 1 GFLOP/s of emulated bf16
    return matmul_flops(torch.float32, 256, 3) / matmul_flops(half, 256, 3)


def warn_if_emulated(dtype: str, *, what: str = "dtype") -> None:
    """Warn when an explicit half dtype will run emulated on this CPU, saying how slow."""
    if dtype not in HALF_DTYPES or cuda_available() or cpu_native(dtype):
        return
    ratio = cpu_slowdown(dtype)
    if ratio < WARN_SLOWDOWN:  # the flags say emulated, but the kernels cope (e.g. via oneDNN)
        return
    message = (
        f"{what}={dtype!r} on a CPU without native {dtype} matmuls "
        f"({torch.backends.cpu.get_cpu_capability()}; no AVX512-BF16/AMX): a {dtype} matmul "
        f"ran {ratio:.0f}x slower than float32 here just now ({EMULATED_RANGE} on AVX2 "
        f"machines), and the whole model slows down about as much. Use 'auto' or 'float32'."
    )
    # once per process, however many loads of a run ask for it (generation's cache key and
    # its engine, the critic and the judge); Python's own once-per-location rule is undone by
    # any filter change, and libraries change filters as they are imported
    if message in _warned:
        return
    _warned.add(message)
    warnings.warn(message, PrecisionWarning, stacklevel=3)


# --------------------------------------------------------------------------- resolution


def resolve_dtype(choice: str, *, device: str | None = None) -> str:
    """The dtype name to compute in: "auto" is bfloat16 where native, else float32.

    An explicit choice is kept; a half dtype that this CPU only emulates gets a warning.
    """
    if choice not in DTYPE_CHOICES:
        raise ValueError(f"dtype {choice!r}: expected one of {list(DTYPE_CHOICES)}")
    if choice == "auto":
        resolved = "bfloat16" if bf16_is_native(device) else "float32"
        logger.info("dtype auto -> %s (%s)", resolved, describe_capability())
        return resolved
    if device is None or not device.startswith("cuda"):
        warn_if_emulated(choice)
    return choice


def resolve_mixed_precision(choice: str) -> str:
    """accelerate's `mixed_precision` for a config value ("auto", "no", "bf16", "fp16").

    auto: bf16 where native (GPU or CPU), fp16 on a GPU without bf16, else "no" (float32).
    fp16 needs a GPU (ValueError otherwise); bf16 on a CPU that emulates it gets a warning.
    """
    on_gpu = cuda_available()
    if choice == "auto":
        if bf16_is_native():
            return "bf16"
        return "fp16" if on_gpu else "no"
    if choice == "fp16" and not on_gpu:
        raise ValueError("mixed_precision: 'fp16' needs a GPU; use 'bf16' or 'no' on CPU")
    if choice == "bf16":
        warn_if_emulated("bfloat16", what="mixed_precision")
    return choice
