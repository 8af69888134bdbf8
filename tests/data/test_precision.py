"""`auto` precision follows the hardware; emulated half precision is warned about.

The capability checks are replaced both ways, so these tests mean the same on any machine.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from safekeel.data import precision

AVX2_FLAGS = frozenset({"fpu", "sse2", "avx", "avx2", "fma"})
ZEN4_FLAGS = AVX2_FLAGS | {"avx512f", "avx512bw", "avx512_bf16", "avx512_vnni"}
SAPPHIRE_RAPIDS_FLAGS = AVX2_FLAGS | {"avx512f", "amx_tile", "amx_bf16", "amx_int8"}


@pytest.fixture
def cpu_only(monkeypatch):
    """A machine without CUDA whose CPU flags the test sets; the slowdown is not measured."""
    monkeypatch.setattr(precision, "cuda_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_slowdown", lambda dtype: 42.0)
    monkeypatch.setattr(precision, "_warned", set())  # each test sees its warnings

    def with_flags(flags: frozenset[str]) -> None:
        monkeypatch.setattr(precision, "cpu_flags", lambda: flags)

    return with_flags


@pytest.mark.parametrize("flags", [ZEN4_FLAGS, SAPPHIRE_RAPIDS_FLAGS, frozenset({"bf16"})],
                         ids=["avx512_bf16", "amx_bf16", "arm_bf16"])
def test_auto_is_bf16_on_a_cpu_with_native_bf16(cpu_only, flags):
    cpu_only(flags)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.resolve_dtype("auto") == "bfloat16"
        assert precision.resolve_mixed_precision("auto") == "bf16"
        # an explicit bf16 is fine there: no warning
        assert precision.resolve_dtype("bfloat16") == "bfloat16"
        assert precision.resolve_mixed_precision("bf16") == "bf16"
    assert "bf16 native" in precision.describe_capability()


def test_auto_is_float32_on_an_avx2_cpu(cpu_only):
    cpu_only(AVX2_FLAGS)
    assert precision.resolve_dtype("auto") == "float32"
    assert precision.resolve_mixed_precision("auto") == "no"
    assert "bf16 emulated" in precision.describe_capability()


def test_explicit_bf16_on_an_avx2_cpu_warns_how_much_slower(cpu_only):
    cpu_only(AVX2_FLAGS)
    with pytest.warns(precision.PrecisionWarning, match=r"42x slower than float32") as caught:
        assert precision.resolve_dtype("bfloat16") == "bfloat16"
    assert "15-80x" in str(caught[0].message) and "'auto'" in str(caught[0].message)
    with pytest.warns(precision.PrecisionWarning, match=r"mixed_precision='bfloat16'"):
        assert precision.resolve_mixed_precision("bf16") == "bf16"


def test_no_warning_when_the_measured_slowdown_is_small(cpu_only, monkeypatch):
    cpu_only(AVX2_FLAGS)
    monkeypatch.setattr(precision, "cpu_slowdown", lambda dtype: 1.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.resolve_dtype("bfloat16") == "bfloat16"
    assert precision.resolve_dtype("auto") == "float32"  # auto still goes by the flags


def test_float32_and_no_never_warn(cpu_only):
    cpu_only(AVX2_FLAGS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert precision.resolve_dtype("float32") == "float32"
        assert precision.resolve_mixed_precision("no") == "no"


def test_fp16_mixed_precision_needs_a_gpu(cpu_only):
    cpu_only(ZEN4_FLAGS)
    with pytest.raises(ValueError, match="'fp16' needs a GPU"):
        precision.resolve_mixed_precision("fp16")


def test_float16_is_judged_by_its_own_flags(cpu_only):
    cpu_only(ZEN4_FLAGS)  # native bf16 but no AVX512-FP16
    with pytest.warns(precision.PrecisionWarning, match="float16"):
        precision.resolve_dtype("float16")
    cpu_only(ZEN4_FLAGS | {"avx512_fp16"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precision.resolve_dtype("float16")


@pytest.mark.parametrize("bf16", [True, False])
def test_gpu_follows_cuda_bf16_support(monkeypatch, bf16):
    monkeypatch.setattr(precision, "cuda_available", lambda: True)
    monkeypatch.setattr(precision, "cuda_bf16_supported", lambda: bf16)
    monkeypatch.setattr(precision, "cuda_device_name", lambda: "Test GPU")
    monkeypatch.setattr(precision, "cpu_flags", lambda: AVX2_FLAGS)  # the host CPU is ignored
    assert precision.resolve_dtype("auto") == ("bfloat16" if bf16 else "float32")
    assert precision.resolve_mixed_precision("auto") == ("bf16" if bf16 else "fp16")
    assert precision.resolve_dtype("auto", device="cpu") == "float32"
    assert precision.describe_capability().startswith("GPU Test GPU: bf16 ")


def test_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="expected one of"):
        precision.resolve_dtype("float8")


def test_cpu_flags_are_read_from_cpuinfo(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\n"
                       "processor\t: 1\nflags\t\t: fpu avx2 avx512_bf16\n")
    monkeypatch.setattr(precision, "CPUINFO", cpuinfo)
    precision.cpu_flags.cache_clear()
    try:
        assert precision.cpu_flags() == {"fpu", "avx2", "avx512_bf16"}
        monkeypatch.setattr(precision, "CPUINFO", tmp_path / "missing")
        precision.cpu_flags.cache_clear()
        assert precision.cpu_flags() == frozenset()
    finally:
        precision.cpu_flags.cache_clear()


def test_matmul_rate_is_measured():
    rate = precision.matmul_flops(torch.float32, 64, 2)
    assert 1e6 < rate < 1e15  # FLOP/s, not seconds


def test_the_same_warning_shows_once_per_process(cpu_only, recwarn):
    """A run loads several models in bf16 (generation's key and engine, critic, judge)."""
    cpu_only(AVX2_FLAGS)
    for _ in range(3):
        precision.resolve_dtype("bfloat16")
    precision.resolve_mixed_precision("bf16")  # another setting: its own warning
    assert [str(w.message)[:22] for w in recwarn.list
            if w.category is precision.PrecisionWarning] == ["dtype='bfloat16' on a ",
                                                             "mixed_precision='bfloa"]
