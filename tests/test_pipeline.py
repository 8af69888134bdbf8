"""`safekeel run` on the embedded default (smoke scale): every stage runs, a rerun resumes."""

import json

import pytest

from safekeel import pipeline
from safekeel.data.shards import CRITIC_COLUMN, PROBE_COLUMN, STAR_VALUES_COLUMN, ShardReader


@pytest.mark.slow
def test_run_on_the_embedded_default(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--output_dir", str(out), "--embedded_scale", "smoke",
            "--methods", "[sft, adaptive:critic]", "--evaluate.backend", "transformers"]
    assert pipeline.main(args) == 0
    reader = ShardReader(out / "annotate",
                         required_columns=[CRITIC_COLUMN, PROBE_COLUMN, STAR_VALUES_COLUMN])
    world_rows = sum(1 for _ in (out / "world" / "attack_mix_30.jsonl").open())
    assert reader.num_rows == world_rows
    for name in ("sft", "adaptive_critic", "sft_benign"):
        assert (out / "train" / name / "final" / "config.json").exists()
    # the benign baseline trains on the world's benign set, through its own shards
    benign_rows = sum(1 for _ in (out / "world" / "benign_finetune.jsonl").open())
    assert ShardReader(out / "annotate_benign").num_rows == benign_rows
    report = json.loads((out / "evaluate" / "report.json").read_text())
    assert [r["name"] for r in report["checkpoints"]] == ["reference", "sft", "adaptive_critic",
                                                          "sft_benign"]
    assert (out / "evaluate" / "report.md").exists()
    printed = capsys.readouterr().out
    assert "[2/3] train 3 model(s)" in printed and "[3/3] evaluate 4 model(s)" in printed
    # a second run resumes: nothing is annotated again
    assert pipeline.main(args) == 0
    runs = json.loads((out / "annotate" / "report.worker-0-of-1.json").read_text())["runs"]
    assert runs[-1]["rows_written"] == 0 and runs[-1]["shards_skipped_as_finished"] == 1


def test_run_config_refuses_unknown_methods(capsys):
    with pytest.raises(SystemExit):
        pipeline.main(["run", "--methods", "[sft, dpo]", "--print-config"])
    assert "methods: unknown method 'dpo'" in capsys.readouterr().err


def test_the_embedded_run_judges_with_annotates_guard_settings():
    """The same guard at annotate and evaluate time: dtype, backend, eager and context are
    annotate's; only the judge's threshold comes from the evaluate section."""
    from types import SimpleNamespace

    from safekeel.data.guard.settings import GuardSettings
    from safekeel.evaluate.config import EvaluateConfig

    critic = GuardSettings(model="guard", template="generic", dtype="float32",
                           enforce_eager=True, max_model_len=300, backend="vllm")
    default = SimpleNamespace(sets={name: f"{name}.jsonl" for name in
                                    ("eval_harmful", "eval_benign_overrefusal", "eval_tasks")})
    base = EvaluateConfig(critic=GuardSettings(threshold=0.3))
    cfg = pipeline.embedded_evaluate_config(base, default, SimpleNamespace(generation_tokens=8),
                                            critic)
    assert cfg.critic == GuardSettings(model="guard", template="generic", dtype="float32",
                                       enforce_eager=True, max_model_len=300, backend="vllm",
                                       threshold=0.3)
