"""The quiet console: the project's own warnings (bf16 on a CPU that emulates it) reach the
terminal, while library warnings go to the log file only."""

import subprocess
import sys
import textwrap
import warnings

from safekeel.console import is_user_warning, routed_output
from safekeel.data import precision
from safekeel.data.output_dir import CONSOLE_LOG_NAME

# In a process of its own, so that file descriptors 1 and 2 are real and get redirected.
SCRIPT = textwrap.dedent("""
    import sys, warnings
    from safekeel.console import routed_output
    from safekeel.data import precision
    from safekeel.data.engines import EngineSpec, engine_kwargs

    precision.cuda_available = lambda: False
    precision.cpu_flags = lambda: frozenset({"avx2"})  # no native bf16
    precision.cpu_slowdown = lambda dtype: 42.0
    with routed_output(sys.argv[1]):
        precision.resolve_dtype("bfloat16")  # e.g. generation's cache key, then its engine:
        engine_kwargs(EngineSpec(model=sys.argv[2], dtype="bfloat16"), model_limit=64,
                      cpu=True)
        warnings.warn("a library's warning")
        print("our own line")
""")


def test_bf16_on_a_cpu_without_it_is_one_line_on_the_terminal(tmp_path, tiny_model_dir):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(tiny_model_dir)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    warned = [line for line in done.stderr.splitlines() if "warning" in line.lower()]
    # once, though two loads asked for bf16; the library's warning stays off the terminal
    assert len(warned) == 1, done.stderr
    assert warned[0].startswith("safekeel: warning: dtype='bfloat16' on a CPU without native")
    assert "42x slower than float32" in warned[0]
    assert done.stdout.splitlines() == ["our own line"]
    log = (tmp_path / CONSOLE_LOG_NAME).read_text()
    assert "PrecisionWarning" in log and "a library's warning" in log


def test_only_the_projects_own_warnings_are_the_users(tmp_path, capsys, monkeypatch):
    assert is_user_warning(precision.PrecisionWarning)
    assert not is_user_warning(UserWarning) and not is_user_warning(FutureWarning)
    monkeypatch.setattr(precision, "cuda_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(precision, "cpu_slowdown", lambda dtype: 42.0)
    monkeypatch.setattr(precision, "_warned", set())
    with routed_output(tmp_path, verbose=True):  # verbose: library output is not redirected
        precision.resolve_mixed_precision("bf16")
        warnings.warn("a library's warning", stacklevel=1)
    err = capsys.readouterr().err
    assert "safekeel: warning: mixed_precision='bfloat16'" in err
    assert "a library's warning" not in err
