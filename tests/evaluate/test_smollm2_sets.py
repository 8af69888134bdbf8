"""The SmolLM2 recipe's evaluation sets (configs/smollm2.yaml, `evaluate:`) load as intended."""

from dataclasses import replace
from pathlib import Path

import pytest

from safekeel.data.config import load_config
from safekeel.evaluate.run import plan_evaluation
from safekeel.recipe import RunConfig, preset_path, with_output_dir, with_scale


def test_every_set_loads_with_its_size(tiny_model_dir):
    run = with_output_dir(with_scale(load_config(RunConfig, preset_path("smollm2.yaml"), {})))
    cfg = replace(run.evaluate, checkpoints=[str(tiny_model_dir)])
    paths = [s.path for s in [cfg.harmful_prompts, *cfg.extra_harmful_prompts,
                              cfg.benign_prompts, *cfg.extra_benign_prompts]]
    paths += [t.path for t in cfg.tasks]
    if not all(Path(p).is_file() for p in paths):
        pytest.skip("the shared data sets are not on this machine")
    plan = plan_evaluation(cfg)
    assert {s.name: len(s) for s in plan.harmful} == {
        "advbench": 100, "jailbreakbench": 100, "harmbench_val": 80}
    assert {s.name: len(s) for s in plan.benign} == {"i_alpaca": 50, "harmless_test": 50}
    (sst2,) = plan.tasks
    assert len(sst2.prompts) == 300
    first = sst2.prompts.prompts[0]
    # the Alpaca template of the fine-tuning rows, with instruction and input in one user turn
    assert first.prompt.startswith("Below is an instruction that describes a task, paired")
    assert "respond only positive or negative" in first.prompt
    assert "charming and often affecting journey" in first.prompt
    assert first.prompt.endswith("### Response:")
    assert first.reference == "positive"
    assert {p.reference for p in sst2.prompts.prompts} == {"positive", "negative"}
    harmbench = next(s for s in plan.harmful if s.name == "harmbench_val")
    assert harmbench.has_categories
