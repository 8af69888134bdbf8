"""The report: utility used on the plot, Markdown numbers, JSON without NaN, plots, training logs."""

import json
import math

import pytest

from safekeel.evaluate.metrics import RateEstimate, attack_success_rate
from safekeel.evaluate.report import (
    CheckpointResult,
    GenerationInfo,
    HarmfulResult,
    JudgeResult,
    OverRefusalResult,
    TaskResult,
    format_rate,
    markdown_report,
    read_training_log,
    write_report,
)

INFO = GenerationInfo("gen.parquet", cached=False, backend="transformers", seconds=2.0,
                      response_tokens=100, stopped=3, key="k")


def _harmful(verdicts, categories, critic=None, name="advbench"):
    judges = {"keyword": JudgeResult("keyword", attack_success_rate(verdicts, categories))}
    if critic is not None:
        judges["critic"] = JudgeResult("critic", attack_success_rate(critic, categories),
                                       mean_p_unsafe=0.25, threshold=0.5,
                                       mean_p_unsafe_per_category={"a": 0.5, "b": None})
    return HarmfulResult(name, "none", len(verdicts), judges, empty_responses=1, generation=INFO)


def _results():
    base = CheckpointResult(
        "base", {"kind": "hf_dir", "path": "/m/base", "parameters": 1234567},
        harmful=[_harmful([False, False, True, False], ["a", "a", "b", "b"],
                          critic=[False, None, True, False])],
        over_refusal=[OverRefusalResult("benign", RateEstimate.from_counts(1, 4), INFO)],
        tasks=[TaskResult("gsm8k", "gsm8k_final_number", 4,
                          accuracy=RateEstimate.from_counts(3, 4), generation=INFO),
               TaskResult("ll", "loglikelihood", 4, mean_score=-1.5)],
    )
    tuned = CheckpointResult(
        "tuned", {"kind": "lora_adapter", "path": "/m/adapter", "train_method": "sft",
                  "base": {"parameters": 1234567}},
        harmful=[_harmful([True, True, True, False], ["a", "a", "b", "b"],
                          critic=[True, True, True, True])],
        tasks=[TaskResult("gsm8k", "gsm8k_final_number", 4,
                          accuracy=RateEstimate.from_counts(4, 4), generation=INFO)],
    )
    return [base, tuned]


def test_format_rate_in_percent_with_the_wilson_interval():
    rate = RateEstimate.from_counts(3, 4)
    assert format_rate(rate) == f"75.0% [{100 * rate.low:.1f}, {100 * rate.high:.1f}]"
    assert format_rate(RateEstimate.from_counts(0, 0)) == "–"


def test_utility_is_mean_accuracy_then_one_minus_over_refusal():
    two_tasks = CheckpointResult("m", {}, tasks=[
        TaskResult("t1", "s", 4, accuracy=RateEstimate.from_counts(1, 4)),
        TaskResult("t2", "s", 2, accuracy=RateEstimate.from_counts(2, 2)),
        TaskResult("t3", "loglikelihood", 2, mean_score=-3.0)])
    value, interval, label = two_tasks.utility()
    assert value == pytest.approx((0.25 + 1.0) / 2) and interval is None
    assert label == "mean task accuracy (t1, t2)"
    one_task = CheckpointResult("m", {}, tasks=[
        TaskResult("t1", "s", 4, accuracy=RateEstimate.from_counts(1, 4))])
    assert one_task.utility()[1] == RateEstimate.from_counts(1, 4)
    only_benign = CheckpointResult("m", {}, over_refusal=[OverRefusalResult(
        "benign", RateEstimate.from_counts(1, 8), INFO)])
    value, interval, label = only_benign.utility()
    assert value == pytest.approx(7 / 8) and interval == RateEstimate.from_counts(7, 8)
    assert label == "1 - over-refusal (benign)"
    assert CheckpointResult("m", {}).utility() is None


def test_markdown_tables_carry_the_numbers():
    text = markdown_report(_results(), [], "abc123")
    assert "## Attack success rate: advbench" in text
    base_keyword = format_rate(RateEstimate.from_counts(1, 4))
    base_critic = format_rate(RateEstimate.from_counts(1, 3))  # one critic failure left out
    assert f"| base | {base_keyword} | 1 | {base_critic} | 0.250 | 1 |" in text
    assert f"| tuned | {format_rate(RateEstimate.from_counts(3, 4))} |" in text
    assert f"| base | benign | {format_rate(RateEstimate.from_counts(1, 4))} |" in text
    assert "| checkpoint | gsm8k | ll |" in text
    assert f"| tuned | {format_rate(RateEstimate.from_counts(4, 4))} | – |" in text
    assert "-1.5 (mean, n=4)" in text
    # per category, a table per judge: category a has 2 prompts; base's critic failed on one
    assert "### ASR per category: advbench, refusal keywords" in text
    assert (f"| a | 2 | {format_rate(RateEstimate.from_counts(0, 2))} | "
            f"{format_rate(RateEstimate.from_counts(2, 2))} |") in text
    assert (f"| a | 2 | {format_rate(RateEstimate.from_counts(0, 1))} (1 failed) | "
            f"{format_rate(RateEstimate.from_counts(2, 2))} |") in text
    assert "| tuned | lora_adapter | `/m/adapter` | 1,234,567 | sft |" in text


def test_write_report_json_is_strict_and_complete(tmp_path):
    results = _results()
    results[1].tasks.append(TaskResult("empty", "s", 0, accuracy=RateEstimate.from_counts(0, 0)))
    files = write_report(results, tmp_path, config={"a": 1}, config_hash="h",
                         sets=[{"name": "advbench"}], judges={"keyword": {}}, plots=False)

    def no_nan(value):
        raise AssertionError(f"non-JSON constant {value} in report.json")

    document = json.loads(files.json.read_text(), parse_constant=no_nan)
    assert document["config"] == {"a": 1} and document["config_hash"] == "h"
    assert document["versions"]["torch"] and document["plots"] == []
    base = document["checkpoints"][0]
    critic = base["harmful"][0]["judges"]["critic"]
    assert critic["asr"]["overall"]["successes"] == 1 and critic["asr"]["overall"]["n"] == 3
    assert critic["asr"]["judge_failures"] == 1 and critic["asr"]["failed_rows"] == [1]
    assert critic["mean_p_unsafe_per_category"] == {"a": 0.5, "b": None}
    assert base["utility"]["value"] == pytest.approx(0.75)
    assert base["metrics"] == {
        "eval/asr/advbench/keyword": 0.25, "eval/asr/advbench/critic": pytest.approx(1 / 3),
        "eval/mean_p_unsafe/advbench": 0.25, "eval/over_refusal/benign": 0.25,
        "eval/task/gsm8k": 0.75, "eval/task/ll": -1.5, "eval/utility": 0.75}
    assert base["harmful"][0]["generation"]["tokens_per_second"] == pytest.approx(50.0)
    assert document["checkpoints"][1]["tasks"][-1]["accuracy"]["rate"] is None
    assert files.markdown.read_text().startswith("# Evaluation report")


def test_training_log_reading(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text("\n".join([
        json.dumps({"step": 1, "loss": 2.0, "ce": 2.0, "kl": None, "kl_weight": 0.0}),
        "not json",
        json.dumps({"step": 2, "loss": 1.5, "ce": 1.4, "kl": 0.1, "kl_weight": 0.5}),
        json.dumps({"step": 2, "loss": 1.2, "ce": 1.1, "kl": 0.2, "kl_weight": 0.5}),  # resumed
        json.dumps({"train/step": 3, "train/loss": 1.0, "train/kl": 0.3}),
        '{"step": 4, "loss": 0.9',  # cut off mid-write
    ]) + "\n")
    series = read_training_log(log)
    assert series["step"] == [1.0, 2.0, 3.0]
    assert series["loss"] == [2.0, 1.2, 1.0]
    assert math.isnan(series["kl"][0]) and series["kl"][1:] == [0.2, 0.3]
    assert math.isnan(series["ce"][2]) and math.isnan(series["kl_weight"][2])


def test_plots_are_written_as_png(tmp_path):
    import matplotlib.image

    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1 / s, "ce": 1 / s, "kl": 0.01 * s,
                                       "kl_weight": 0.5}) + "\n" for s in range(1, 40)))
    results = _results()
    results[0].training_log = results[1].training_log = str(log)  # one run, one plot
    files = write_report(results, tmp_path / "out", config={}, config_hash="h")
    names = sorted(path.name for path in files.plots)
    assert names == ["asr_per_category_advbench.png", "asr_vs_utility.png", "training_base.png"]
    for path in files.plots:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = matplotlib.image.imread(path).shape
        assert width > 400 and height > 250
    assert "![asr_vs_utility](asr_vs_utility.png)" in files.markdown.read_text()


def test_no_plot_without_utility_or_categories(tmp_path):
    result = CheckpointResult("m", {}, harmful=[_harmful([True, False], None)])
    files = write_report([result], tmp_path, config={}, config_hash="h")
    assert files.plots == []
