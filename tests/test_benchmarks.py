"""Every benchmark still runs: each one's `--quick` smoke run, as a user would start it.

Slow (each starts models, the vLLM ones an engine); figures are not checked, only that the
run ends, prints its progress as it goes and prints its final line.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
NEEDS_VLLM = {"bench_critic.py", "bench_star.py", "bench_generation.py", "bench_activations.py",
              "bench_ray.py", "bench_engine_compile.py"}
NEEDS_SHARED_DATA = {"bench_critic.py", "bench_star.py", "bench_ray.py",  # Alpaca rows
                     "bench_ref_topk.py"}  # the SST-2 attack mix


def benchmark_scripts() -> list[str]:
    return sorted(p.name for p in BENCHMARKS.glob("bench_*.py"))


def test_every_benchmark_is_covered():
    assert set(benchmark_scripts()) >= {"bench_train.py", "bench_critic.py", "bench_star.py",
                                         "bench_generation.py", "bench_annotate_memory.py"}


def fixed_dtypes(tree: ast.AST) -> list[str]:
    """String constants given as a `dtype` (keyword argument or dict key) anywhere."""
    found = []
    for node in ast.walk(tree):
        pairs = []
        if isinstance(node, ast.Call):
            pairs = [(k.arg, k.value) for k in node.keywords]
        elif isinstance(node, ast.Dict):
            pairs = [(k.value if isinstance(k, ast.Constant) else None, v)
                     for k, v in zip(node.keys, node.values, strict=True)]
        found += [v.value for k, v in pairs
                  if k == "dtype" and isinstance(v, ast.Constant) and isinstance(v.value, str)
                  and v.value != "auto"]
    return found


def test_no_benchmark_hard_codes_its_precision():
    """Precision comes from --dtype through `pick_dtype` (auto: bf16 only where native)."""
    for name in benchmark_scripts():
        text = (BENCHMARKS / name).read_text()
        assert not fixed_dtypes(ast.parse(text)), name
        # a script without a model opts out of --dtype, and says so
        if "add_common_arguments(parser, dtype=False)" not in text:
            assert "pick_dtype(args.dtype)" in text, name


def test_fixed_dtypes_finds_a_hard_coded_one():
    tree = ast.parse('f(dtype="bfloat16"); g(dtype=d); x = {"dtype": "float32", "a": 1}')
    assert fixed_dtypes(tree) == ["bfloat16", "float32"]


@pytest.mark.slow
@pytest.mark.parametrize("script", [
    pytest.param(name, marks=[pytest.mark.vllm] if name in NEEDS_VLLM else [])
    for name in benchmark_scripts()
])
def test_benchmark_quick_run(script, request):
    if script in NEEDS_SHARED_DATA:
        request.getfixturevalue("shared_data")  # skips without the shared data folder
    if script in NEEDS_VLLM and importlib.util.find_spec("vllm") is None:
        pytest.skip("needs vllm")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
           "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
                          check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    progress = [line for line in done.stdout.splitlines() if line.startswith("[")]
    assert len(progress) >= 3, done.stdout  # progress lines as it goes, not only at the end
    assert progress[-1].endswith("] done"), done.stdout
