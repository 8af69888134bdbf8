"""A recipe's targets: each claim read from the run's own reports, met, missed, or not
measured (never met by default)."""

from __future__ import annotations

import json

from safekeel.recipe_results import (
    Target,
    check_targets,
    last_annotate_scores,
    targets_table,
    write_results,
)

REPORT = {"checkpoints": [
    {"name": "reference", "metrics": {"eval/asr/advbench/keyword": 0.07, "eval/task/sst2": 0.5}},
    {"name": "sft", "metrics": {"eval/asr/advbench/keyword": 0.85, "eval/task/sst2": 0.86}},
    {"name": "adaptive", "metrics": {"eval/asr/advbench/keyword": 0.10, "eval/task/sst2": 0.83}},
]}
BUILD = {"guard": {"auroc_heldout": 0.97, "auroc_labelled_corpus": 0.4}}
ANNOTATE = {"scores": {"probe_p_harmful": {"auroc_vs_label": 0.91}}}


def check(*targets):
    return check_targets(list(targets), evaluate_report=REPORT, build_metrics=BUILD,
                         annotate_report=ANNOTATE)


def test_absolute_and_relative_evaluate_targets():
    (reference,) = check(Target("ref ASR", metric="eval/asr/advbench/keyword",
                                checkpoints=["reference"], at_most=0.2))
    assert (reference.met, reference.shown) == (True, "7.0%")
    raised, within = check(
        Target("sft raises", metric="eval/asr/advbench/keyword", checkpoints=["sft"],
               relative_to="reference", at_least=0.30),
        Target("adaptive within", metric="eval/asr/advbench/keyword",
               checkpoints=["adaptive"], relative_to="reference", at_most=0.05))
    assert raised.met and raised.shown == "+78.0 points vs reference"
    assert within.met is True and within.shown == "+3.0 points vs reference"
    (strict,) = check(Target("within 2", metric="eval/asr/advbench/keyword",
                             checkpoints=["adaptive"], relative_to="reference", at_most=0.02))
    assert strict.met is False


def test_a_defended_run_loses_at_most_two_points_of_utility():
    (utility,) = check(Target("sst2", metric="eval/task/sst2", checkpoints=["adaptive"],
                              relative_to="sft", at_least=-0.02))
    assert utility.met is False and utility.shown == "-3.0 points vs sft"


def test_build_and_annotate_values_by_dotted_path():
    held, flag, probe = check(
        Target("guard held out", source="build", metric="guard.auroc_heldout", at_least=0.95),
        Target("guard flag", source="build", metric="guard.auroc_labelled_corpus",
               at_least=0.9),
        Target("probe flag", source="annotate", metric="scores.probe_p_harmful.auroc_vs_label",
               at_least=0.9))
    assert [held.met, flag.met, probe.met] == [True, False, True]
    assert flag.shown == "0.400"


def test_a_value_the_run_did_not_produce_is_not_measured_never_met(tmp_path):
    missing, bad_path = check(
        Target("star", metric="eval/asr/advbench/keyword", checkpoints=["star_dss"],
               relative_to="reference", at_most=0.1),
        Target("typo", source="build", metric="guard.auroc_typo", at_least=0.9))
    assert (missing.met, missing.shown) == (None, "not measured")
    assert bad_path.met is None
    page = write_results(tmp_path / "RESULTS.md", commands=["x"], build_metrics={},
                         adapters={}, evaluate_report=None, step_seconds={},
                         checks=[missing, bad_path])
    text = page.read_text()
    assert "0 of 2 met." in text and "| star | star_dss | not measured | n/a |" in text
    assert targets_table([missing])[2] == "| star | star_dss | not measured | n/a |"


def test_the_last_annotate_run_that_scored_rows(tmp_path):
    runs = [{"scores": {"a": 1}}, {"scores": {"a": 2}}, {"scores": {}}]
    (tmp_path / "report.worker-0-of-1.json").write_text(json.dumps({"runs": runs}))
    assert last_annotate_scores(tmp_path) == {"scores": {"a": 2}}
    assert last_annotate_scores(tmp_path / "nothing") == {}
