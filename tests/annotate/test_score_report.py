"""Annotate's report of each risk score: distribution, degenerate-scorer warning, and AUROC
against the corpus's label column (with bad labels refused before any scoring)."""

import json

import polars as pl
import pytest

import safekeel.annotate.run as run_module
from safekeel import pipeline
from safekeel.annotate.config import AnnotateConfig
from safekeel.annotate.run import DegenerateScoresWarning, _row_risk_stats
from safekeel.console import is_user_warning
from safekeel.data.config import from_dict
from safekeel.data.corpus import CorpusConfig, CorpusError, label_is_positive
from safekeel.data.embedded.tiny_models import save_tiny_model
from safekeel.data.shards import PROBE_COLUMN


class FlagScorer:
    """Scores each row from its own `flag` (unsafe high), or one constant for every row."""

    columns = (PROBE_COLUMN,)

    def __init__(self, constant: float | None = None):
        self.constant = constant

    def provenance(self):
        return {"probe_file_sha256": "0" * 64, "probe_layers": [1], "probe_pooling": "last"}

    def annotate(self, examples):
        if self.constant is not None:
            return {PROBE_COLUMN: [self.constant] * len(examples)}
        return {PROBE_COLUMN: [0.9 - 0.001 * i if e["flag"] == "unsafe" else 0.1 + 0.001 * i
                               for i, e in enumerate(examples)]}

    def close(self):
        pass


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("policy")))


def corpus(tmp_path, n, flags=None):
    flags = flags or ["unsafe" if i % 4 == 0 else "finetune" for i in range(n)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"question {i}", "response": f"answer {i}",
                                        "flag": flag}) + "\n" for i, flag in enumerate(flags)))
    return path


def config(path, policy_dir, out, **corpus_options):
    return from_dict(AnnotateConfig, {"corpus": {"path": str(path), **corpus_options},
                                      "policy": policy_dir, "output_dir": str(out),
                                      "rows_per_shard": 64})


def test_auroc_against_the_label_column_is_in_the_report(tmp_path, policy_dir, monkeypatch,
                                                          capsys):
    monkeypatch.setattr(run_module, "build_annotators", lambda cfg, tok: [FlagScorer()])
    out = tmp_path / "out"
    result = run_module.annotate(config(corpus(tmp_path, 40), policy_dir, out,
                                        label_column="flag"))
    stats = result.scores[PROBE_COLUMN]
    assert stats["auroc_vs_label"] == 1.0 and stats["rows"] == 40
    assert result.scores["label"] == {"column": "flag", "positive": 10, "negative": 30,
                                      "values": {"unsafe": 10, "finetune": 30}}
    assert stats["quantiles"]["q50"] == pytest.approx(
        pl.read_parquet(str(out / "shard-*.parquet"))[PROBE_COLUMN].median(), abs=0.002)
    report = json.loads((out / "report.worker-0-of-1.json").read_text())["runs"][-1]
    assert report["scores"][PROBE_COLUMN]["auroc_vs_label"] == 1.0
    printed = capsys.readouterr().out
    assert "AUROC vs label 1.000" in printed and "10 positive, 30 negative" in printed
    # labels the other way round: the same scores rank the classes backwards
    flipped = run_module.annotate(config(corpus(tmp_path, 40), policy_dir, tmp_path / "o2",
                                         label_column="flag", label_positive=["finetune"]))
    assert flipped.scores[PROBE_COLUMN]["auroc_vs_label"] == 0.0


def test_a_degenerate_scorer_is_warned_about_and_a_spread_one_is_not(tmp_path, policy_dir,
                                                                      monkeypatch):
    assert is_user_warning(DegenerateScoresWarning)  # so the console prints it on the terminal
    path = corpus(tmp_path, 120)
    monkeypatch.setattr(run_module, "build_annotators", lambda cfg, tok: [FlagScorer(0.001)])
    with pytest.warns(DegenerateScoresWarning, match="probe_p_harmful is degenerate on this "
                                                     "corpus: near-constant"):
        result = run_module.annotate(config(path, policy_dir, tmp_path / "constant"))
    assert result.scores[PROBE_COLUMN]["degenerate"].startswith("near-constant")

    monkeypatch.setattr(run_module, "build_annotators", lambda cfg, tok: [FlagScorer()])
    with warnings_recorded() as seen:
        result = run_module.annotate(config(path, policy_dir, tmp_path / "spread"))
    assert result.scores[PROBE_COLUMN]["degenerate"] is None
    assert not [w for w in seen if issubclass(w.category, DegenerateScoresWarning)]


def warnings_recorded():
    import warnings

    return warnings.catch_warnings(record=True)


def test_nothing_or_everything_above_the_threshold_is_degenerate_on_a_large_corpus():
    spread_low = pl.Series([i / 1000 for i in range(200)])  # 0 .. 0.199
    assert _row_risk_stats(spread_low, 0.5, None)["degenerate"] == (
        "no row of 200 at or above its threshold 0.5")
    assert _row_risk_stats(spread_low + 0.6, 0.5, None)["degenerate"].startswith("every row")
    assert _row_risk_stats(spread_low * 4, 0.5, None)["degenerate"] is None
    stats = _row_risk_stats(spread_low[:99], 0.5, None)  # too few rows to judge
    assert stats["degenerate"] is None and stats["share_at_or_above_threshold"] == 0.0


def test_label_values():
    cfg = CorpusConfig(path="x", label_column="flag")
    assert [label_is_positive(v, cfg) for v in ("unsafe", " Harmful ", 1, True, "1", "finetune",
                                                 0, False, "safe")] == [True] * 5 + [False] * 4
    for bad, message in ((None, "missing"), ("", "not a label"), (2, "numbers must be 0 or 1"),
                         ([1], "not a label")):
        with pytest.raises(ValueError, match=message):
            label_is_positive(bad, cfg)
    strict = CorpusConfig(path="x", label_column="flag", label_positive=["bad"],
                          label_negative=["good"])
    assert label_is_positive("BAD", strict) and not label_is_positive("good", strict)
    with pytest.raises(ValueError, match="in neither label_positive"):
        label_is_positive("unsafe", strict)


def test_a_bad_label_stops_annotate_before_scoring_naming_file_row_and_field(
        tmp_path, policy_dir, monkeypatch, capsys):
    flags = ["unsafe", "finetune", "finetune", None, "unsafe"]
    path = corpus(tmp_path, 5, flags)

    def no_scoring(cfg, tok):
        raise AssertionError("scorers were built before the labels were checked")

    monkeypatch.setattr(run_module, "build_annotators", no_scoring)
    with pytest.raises(CorpusError, match=r"corpus.jsonl, row 3, field 'flag': missing"):
        run_module.annotate(config(path, policy_dir, tmp_path / "out", label_column="flag"))
    code = pipeline.main(["annotate", "--corpus.path", str(path), "--corpus.label_column", "flag",
                          "--policy", policy_dir, "--output_dir", str(tmp_path / "cli")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    expected = (f"safekeel: error: {path}, row 3, field 'flag': missing: the label is absent "
                "or null")
    assert err == [expected]
