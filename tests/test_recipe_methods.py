"""`methods` of a run: the string form "method[:signal]" and the mapping form with a name
and train overrides; and resumable steps."""

from __future__ import annotations

import pytest

from safekeel.data.config import ConfigError, from_dict
from safekeel.recipe import RunConfig, method_runs, with_scale
from safekeel.recipe_steps import Steps, with_overrides
from safekeel.train.config import TrainConfig


def test_string_and_mapping_forms_give_named_runs_with_overrides():
    runs = method_runs(["sft", "adaptive:probe",
                        {"name": "adaptive_max", "method": "adaptive", "signal": "critic",
                         "risk": {"aggregate": "max"}},
                        {"method": "star_dss", "kl": {"estimator": "k2"}}])
    assert [(r.name, r.method) for r in runs] == [
        ("sft", "sft"), ("adaptive_probe", "adaptive"), ("adaptive_max", "adaptive"),
        ("star_dss", "star_dss")]
    train = with_overrides(TrainConfig(learning_rate=3e-4), runs[2].overrides)
    assert (train.risk.signal, train.risk.aggregate, train.learning_rate) == \
        ("critic", "max", 3e-4)
    assert with_overrides(TrainConfig(), runs[1].overrides).risk.signal == "probe"
    assert with_overrides(TrainConfig(), runs[3].overrides).kl.estimator == "k2"


@pytest.mark.parametrize("methods, message", [
    (["nope"], "unknown method"),
    ([{"method": "adaptive", "signal": "vibes"}], "unknown risk signal"),
    ([{"name": "x"}], "neither"),
    (["sft", {"method": "sft"}], "names repeat"),
])
def test_bad_methods_are_config_errors(methods, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(RunConfig, {"methods": methods})


def test_a_bad_train_override_is_a_config_error():
    runs = method_runs([{"method": "adaptive", "risk": {"aggregate": "median"}}])
    with pytest.raises(ConfigError, match="aggregate"):
        with_overrides(TrainConfig(), runs[0].overrides)


def test_a_scale_puts_its_options_over_the_config():
    cfg = from_dict(RunConfig, {"scale": "smoke", "train": {"max_steps": 100, "epochs": 2},
                                "scales": {"smoke": {"train": {"max_steps": 2}}}})
    scaled = with_scale(cfg)
    assert (scaled.train.max_steps, scaled.train.epochs) == (2, 2)
    with pytest.raises(ConfigError, match="scale"):
        from_dict(RunConfig, {"scale": "tiny"})


def test_a_step_is_reused_when_its_key_holds_and_redone_when_it_changes(tmp_path):
    lines, calls = [], []
    steps = Steps(tmp_path, lines.append)
    output = tmp_path / "made"

    def action(value):
        calls.append(value)
        output.mkdir(exist_ok=True)
        (output / "file").write_text(value)
        return {"value": value}

    assert steps.run("make", {"x": 1}, [output], lambda: action("a")) == {"value": "a"}
    assert steps.run("make", {"x": 1}, [output], lambda: action("b")) == {"value": "a"}
    assert calls == ["a"] and "reused" in lines[-1]
    (output / "stale").write_text("from the old settings")
    assert steps.run("make", {"x": 2}, [output], lambda: action("c")) == {"value": "c"}
    assert calls == ["a", "c"] and not (output / "stale").exists()
    # a stage that resumes itself is called again, with the same key
    steps.run("make", {"x": 2}, [output], lambda: action("d"), resumes_itself=True)
    assert calls == ["a", "c", "d"]
