"""The CLI: `safekeel run` on the embedded preset (smoke scale) runs every stage, resumes,
and keeps library logs off the terminal; a user's mistake is one line and exit code 2."""

import json
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from safekeel import pipeline
from safekeel.data.shards import CRITIC_COLUMN, PROBE_COLUMN, STAR_VALUES_COLUMN, ShardReader

REPO = Path(__file__).resolve().parents[1]
# a library's log record as vLLM / transformers / Python warnings print it
LIBRARY_LOG_LINE = re.compile(r"\b(INFO|WARNING|DEBUG)\b|Warning:|^\(\w+ pid=\d+\)")


def cli(*args: str, cwd: Path | None = None, env: dict | None = None
        ) -> subprocess.CompletedProcess:
    """The installed entry point in its own process: real file descriptors, real exit code."""
    return subprocess.run([sys.executable, "-m", "safekeel", *args], cwd=cwd,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          check=False)


def terminal_lines(done: subprocess.CompletedProcess) -> list[str]:
    text = (done.stdout + done.stderr).replace("\r", "\n")
    return [line for line in text.splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.vllm
def test_run_on_the_embedded_default_is_quiet_and_resumes(tmp_path):
    pytest.importorskip("vllm")
    out = tmp_path / "run"
    args = ["run", "--output_dir", str(out), "--embedded.scale", "smoke",
            "--methods", "[sft, adaptive:critic]", "--evaluate.backend", "transformers",
            "--evaluate.max_new_tokens", "8"]
    done = cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
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
    assert "[2/3] train 3 model(s)" in done.stdout and "[3/3] evaluate 4 model(s)" in done.stdout
    # the terminal has our bars and summaries; vLLM's engine logs went to the log file
    noisy = [line for line in terminal_lines(done) if LIBRARY_LOG_LINE.search(line)]
    assert not noisy, noisy[:5]
    log = (out / "safekeel.log").read_text()
    assert re.search(r"INFO .*vllm", log) or re.search(r"\(EngineCore pid=\d+\) INFO", log)

    # a second run resumes: the build is reused and nothing is annotated again
    done = cli(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reusing the tiny policy and guard" in done.stdout
    runs = json.loads((out / "annotate" / "report.worker-0-of-1.json").read_text())["runs"]
    assert runs[-1]["rows_written"] == 0 and runs[-1]["shards_skipped_as_finished"] == 1


def test_a_stage_given_a_run_config_reads_its_section_with_the_runs_folders(tmp_path):
    """`safekeel evaluate --config configs/smollm2.yaml` reruns one stage of a recipe: its
    section's {output_dir} and {data_dir} are the run's, as `run` fills them."""
    from safekeel.evaluate.config import EvaluateConfig
    from safekeel.train.config import TrainConfig

    config = tmp_path / "recipe.yaml"
    config.write_text(
        f"output_dir: {tmp_path}/run\ndata_dir: {tmp_path}/data\n"
        "train: {policy: '{output_dir}/models/safe_reference', output_dir: '{output_dir}/t'}\n"
        "evaluate: {harmful_prompts: {path: '{data_dir}/advbench.csv'}}\n")
    evaluate = pipeline.load_stage_config("evaluate", EvaluateConfig, str(config), {})
    assert evaluate.harmful_prompts.path == f"{tmp_path}/data/advbench.csv"
    train = pipeline.load_stage_config("train", TrainConfig, str(config),
                                       {"output_dir": str(tmp_path / "mine")})
    assert train.policy == f"{tmp_path}/run/models/safe_reference"
    assert train.output_dir == str(tmp_path / "mine")  # the command line still wins
    # a stage's own file (no sections) is read as it is
    own = tmp_path / "train.yaml"
    own.write_text("policy: '{output_dir}/x'\n")
    assert pipeline.load_stage_config("train", TrainConfig, str(own), {}).policy == \
        "{output_dir}/x"


def test_a_run_judges_with_annotates_guard_unless_evaluate_names_its_own():
    """The same guard at annotate and evaluate time: dtype, backend, eager and context are
    annotate's; only the judge's threshold comes from the evaluate section."""
    from safekeel.data.guard.settings import GuardSettings
    from safekeel.evaluate.config import EvaluateConfig
    from safekeel.recipe import RunConfig, judge_settings

    guard = GuardSettings(model="guard", template="generic", dtype="float32",
                          enforce_eager=True, max_model_len=300, backend="vllm")
    cfg = RunConfig()
    cfg = replace(cfg, annotate=replace(cfg.annotate, critic=guard),
                  evaluate=EvaluateConfig(critic=GuardSettings(threshold=0.3)))
    assert judge_settings(cfg) == replace(guard, threshold=0.3)
    own = GuardSettings(model="other-guard", dtype="bfloat16")
    assert judge_settings(replace(cfg, evaluate=EvaluateConfig(critic=own))) == own


def error_lines(capsys) -> list[str]:
    return capsys.readouterr().err.splitlines()


@pytest.fixture
def tiny_corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    return path


def user_mistakes(tmp_path: Path, corpus: Path, model: Path
                  ) -> dict[str, tuple[list[str], str]]:
    """Command lines with one mistake each, and what their one-line message names."""
    unknown_key = tmp_path / "unknown_key.yaml"
    unknown_key.write_text("train:\n  learning_rat: 0.1\n")
    return {
        "unknown key": (["train", "--config", str(unknown_key)], "learning_rat"),
        "bad value": (["train", "--epochs", "many"], "epochs"),
        # (--print-config: should the mistake go unnoticed, no run starts)
        "unknown method": (["run", "--methods", "[sft, dpo]", "--print-config"], "methods"),
        "unknown option": (["run", "--metods", "[sft]", "--print-config"], "--metods"),
        "missing config": (["run", "--config", str(tmp_path / "nope.yaml"), "--print-config"],
                           "nope.yaml"),
        "missing corpus": (["annotate", "--corpus.path", str(tmp_path / "missing.jsonl"),
                            "--policy", str(model),
                            "--output_dir", str(tmp_path / "a")], "missing.jsonl"),
        "missing model": (["annotate", "--corpus.path", str(corpus),
                           "--policy", str(tmp_path / "no_such_model"),
                           "--output_dir", str(tmp_path / "b")], "no_such_model"),
    }


@pytest.mark.parametrize("mistake", ["unknown key", "bad value", "unknown method",
                                     "unknown option", "missing config", "missing corpus",
                                     "missing model"])
def test_a_user_mistake_is_one_line_and_exit_code_2(mistake, tmp_path, tiny_corpus,
                                                     tiny_model_dir, capsys):
    argv, named = user_mistakes(tmp_path, tiny_corpus, tiny_model_dir)[mistake]
    assert pipeline.main(argv) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("safekeel: error: ") and named in line, line


def test_debug_shows_the_traceback_of_a_user_mistake(tmp_path, tiny_corpus, tiny_model_dir):
    argv, _ = user_mistakes(tmp_path, tiny_corpus, tiny_model_dir)["missing model"]
    assert pipeline.main(argv) == 2  # without --debug: the one line
    with pytest.raises(ValueError, match="no_such_model"):
        pipeline.main([*argv, "--debug"])


@pytest.mark.slow
def test_the_installed_cli_exits_2_on_a_mistake_and_traces_with_debug(tmp_path):
    done = cli("train", "--epochs", "many", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [done.stderr.strip()]
    assert done.stderr.startswith("safekeel: error: epochs")
    traced = cli("train", "--epochs", "many", "--debug", cwd=tmp_path)
    assert traced.returncode != 0 and "Traceback (most recent call last)" in traced.stderr


@pytest.mark.slow
def test_the_embedded_preset_ships_inside_the_wheel(built_wheel, tmp_path):
    wheel = built_wheel
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip install would put in site-packages
    assert (site / "safekeel" / "configs" / "embedded.yaml").is_file()
    done = cli("run", "--print-config", cwd=tmp_path, env={"PYTHONPATH": str(site)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "enabled: true" in done.stdout and "attack_mix_30.jsonl" in done.stdout
    # ... and was read from the installed package, not from a source tree
    where = subprocess.run(
        [sys.executable, "-c", "from safekeel.recipe import preset_path; print(preset_path())"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True,
        text=True, check=True)
    assert Path(where.stdout.strip()) == site / "safekeel" / "configs" / "embedded.yaml"
