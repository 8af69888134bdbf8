"""Config: YAML defaults, command-line overrides, validation that names keys and values."""

import pytest
import yaml

from safekeel import pipeline
from safekeel.annotate.config import AnnotateConfig
from safekeel.data.config import ConfigError, config_hash, from_dict, load_config, save_resolved
from safekeel.evaluate.config import EvaluateConfig
from safekeel.train.config import TrainConfig


def test_defaults_validate_for_every_stage():
    for cls in (AnnotateConfig, TrainConfig, EvaluateConfig, pipeline.RunConfig):
        assert from_dict(cls, {}) == cls()


def test_yaml_then_command_line_override(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({
        "train": {"method": "constant_kl", "kl": {"beta": 0.3}, "learning_rate": 2e-5},
        "annotate": {"rows_per_shard": 7},
    }))
    cfg = load_config(TrainConfig, path, {"kl": {"estimator": "k3"}}, section="train")
    assert (cfg.method, cfg.kl.beta, cfg.kl.estimator, cfg.learning_rate) == (
        "constant_kl", 0.3, "k3", 2e-5)
    # the command line wins over the file, and values arrive as text
    assert pipeline.main(["train", "--config", str(path), "--kl.beta", "0.7",
                          "--max_steps", "5", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["kl"] == {"beta": 0.7, "estimator": "forward"}
    assert printed["max_steps"] == 5 and printed["method"] == "constant_kl"


def test_run_config_takes_stage_qualified_flags(capsys):
    assert pipeline.main(["run", "--train.method", "star_dss", "--annotate.corpus.columns",
                          "{prompt: q, response: a}", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["method"] == "star_dss"
    assert printed["annotate"]["corpus"]["columns"] == {"prompt": "q", "response": "a"}


def test_command_line_text_is_typed():
    cfg = from_dict(EvaluateConfig, {"checkpoints": "a,b", "temperature": "1e-1",
                                     "max_new_tokens": "16"})
    assert cfg.checkpoints == ["a", "b"] and cfg.temperature == 0.1 and cfg.max_new_tokens == 16
    assert from_dict(EvaluateConfig, {"checkpoints": "[x, y]"}).checkpoints == ["x", "y"]
    assert from_dict(TrainConfig, {"max_steps": "null"}).max_steps is None
    assert from_dict(AnnotateConfig, {"trust_remote_code": "yes"}).trust_remote_code is True


def test_enforce_eager_takes_auto_true_or_false_from_yaml_and_the_command_line(capsys):
    assert EvaluateConfig().enforce_eager == "auto"
    assert AnnotateConfig().critic.enforce_eager == "auto"
    for given, expected in (("auto", "auto"), ("true", True), ("False", False), (True, True),
                            (False, False)):
        for value in (from_dict(EvaluateConfig, {"enforce_eager": given}).enforce_eager,
                      from_dict(AnnotateConfig, {"critic": {"enforce_eager": given}}
                                ).critic.enforce_eager):
            assert value == expected and type(value) is type(expected)
    for bad in ("sometimes", 1, 0):  # 1 == True in Python, but not a boolean setting
        with pytest.raises(ConfigError, match="enforce_eager"):
            from_dict(EvaluateConfig, {"enforce_eager": bad})
    assert pipeline.main(["evaluate", "--enforce_eager", "true", "--critic.enforce_eager",
                          "auto", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["enforce_eager"], printed["critic"]["enforce_eager"]) == (True, "auto")


@pytest.mark.parametrize("values, key_named, allowed", [
    ({"methd": "sft"}, "methd", "method"),
    ({"kl": {"bta": 1}}, "kl.bta", "beta"),
    ({"method": "dpo"}, "method", "'adaptive_example'"),
    ({"kl": {"estimator": "k9"}}, "kl.estimator", "'k3'"),
    ({"learning_rate": "fast"}, "learning_rate", "number"),
    ({"epochs": 1.5}, "epochs", "integer"),
    ({"epochs": 0}, "epochs", "at least 1"),
    ({"kl": {"beta": -1}}, "kl.beta", ">= 0"),
    ({"tokenization": {"max_length": 1}}, "tokenization.max_length", "at least 2"),
])
def test_bad_values_name_key_and_allowed(values, key_named, allowed):
    with pytest.raises(ConfigError) as err:
        from_dict(TrainConfig, values)
    assert key_named in str(err.value) and allowed in str(err.value)


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="worker_index: must be in \\[0, 1\\]"):
        from_dict(AnnotateConfig, {"num_workers": 2, "worker_index": 2})
    with pytest.raises(ConfigError, match="corpus.columns: shape=columns needs"):
        from_dict(AnnotateConfig, {"corpus": {"shape": "columns", "columns": {"prompt": "q"}}})
    with pytest.raises(ConfigError, match="unknown target 'answer'"):
        from_dict(AnnotateConfig, {"corpus": {"columns": {"answer": "a"}}})


def test_cli_errors_exit_2_with_one_line_message(capsys):
    for argv, expected in (
        (["train", "--method", "bogus"], "method: 'bogus' is not allowed"),
        (["train", "--kl.bta", "1"], "did you mean --kl.beta"),
        (["train", "--config", "/nonexistent.yaml"], "config file /nonexistent.yaml does not exist"),
    ):
        assert pipeline.main(argv) == 2
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("safekeel: error: ") and expected in line, line


def test_help_documents_every_option(capsys):
    from safekeel.data.config import leaf_fields

    for name, verb in pipeline.VERBS.items():
        with pytest.raises(SystemExit):
            pipeline.main([name, "--help"])
        text = capsys.readouterr().out
        for dotted, field, _ in leaf_fields(verb.config):
            assert f"--{dotted}" in text, (name, dotted)
            assert field.metadata.get("help"), f"{name}: option {dotted} has no help text"


def test_resolved_config_round_trips(tmp_path):
    cfg = from_dict(TrainConfig, {"method": "filter", "kl": {"beta": 0.2}})
    path = save_resolved(cfg, tmp_path / "resolved.yaml")
    again = load_config(TrainConfig, path)
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert config_hash(from_dict(TrainConfig, {"seed": 1})) != config_hash(cfg)
