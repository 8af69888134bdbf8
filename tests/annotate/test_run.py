"""The annotate driver: shards + manifest, resume after a crash, disjoint worker splits."""

import hashlib
import json

import polars as pl
import pytest

import safekeel.annotate.run as run_module
from safekeel.annotate.config import AnnotateConfig
from safekeel.data.config import from_dict
from safekeel.data.embedded.tiny_models import save_tiny_model
from safekeel.data.shards import PROBE_COLUMN, ManifestError, ShardReader


class HashScorer:
    """A stand-in risk scorer: a deterministic score per id, and a crash on demand."""

    columns = (PROBE_COLUMN,)

    def __init__(self, crash_on_call: int | None = None):
        self.calls, self.crash_on_call = 0, crash_on_call

    def provenance(self):
        return {"probe_file_sha256": "0" * 64, "probe_layers": [1], "probe_pooling": "last"}

    def annotate(self, examples):
        self.calls += 1
        if self.crash_on_call is not None and self.calls == self.crash_on_call:
            raise RuntimeError("simulated crash")
        return {PROBE_COLUMN: [int(hashlib.sha256(e["id"].encode()).hexdigest()[:6], 16)
                               / 0xFFFFFF for e in examples]}

    def close(self):
        pass


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("policy")))


@pytest.fixture()
def corpus_path(tmp_path):
    rows = [{"prompt": f"question {i}", "response": f"answer {i}", "n": i} for i in range(23)]
    rows[7] = {"prompt": "bad row", "response": ""}  # skipped as an empty response
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(corpus_path, policy_dir, out, **kw):
    return from_dict(AnnotateConfig, {
        "corpus": {"path": str(corpus_path), "on_bad_row": "skip"}, "policy": policy_dir,
        "output_dir": str(out), "rows_per_shard": 5, "row_group_size": 2, **kw})


def read_rows(out):
    return pl.read_parquet(str(out / "shard-*.parquet")).sort("id")


def test_writes_shards_manifest_report_and_config(corpus_path, policy_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(run_module, "build_annotators", lambda cfg, tokenizer: [HashScorer()])
    out = tmp_path / "out"
    result = run_module.annotate(config(corpus_path, policy_dir, out))
    assert result.shards_written == 5 and result.rows_written == 22
    reader = ShardReader(out, required_columns=[PROBE_COLUMN])
    assert reader.num_rows == 22
    rows = read_rows(out)
    assert rows["n"].null_count() == 0 and sorted(rows["n"].to_list()) == [
        i for i in range(23) if i != 7]
    report = json.loads((out / "report.worker-0-of-1.json").read_text())["runs"][-1]
    assert report["corpus"]["skipped_by_reason"] == {"empty response": 1}
    assert (out / "config.worker-0-of-1.yaml").exists()


def test_rerun_after_crash_gives_exactly_the_uninterrupted_result(
        corpus_path, policy_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(run_module, "build_annotators", lambda cfg, tokenizer: [HashScorer()])
    reference = tmp_path / "reference"
    run_module.annotate(config(corpus_path, policy_dir, reference))

    crashed = tmp_path / "crashed"
    monkeypatch.setattr(run_module, "build_annotators", lambda cfg, tokenizer: [HashScorer(crash_on_call=3)])
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_module.annotate(config(corpus_path, policy_dir, crashed))
    assert len(ShardReader(crashed, require_complete=False).shards) == 2  # work kept

    monkeypatch.setattr(run_module, "build_annotators", lambda cfg, tokenizer: [HashScorer()])
    resumed = run_module.annotate(config(corpus_path, policy_dir, crashed))
    assert resumed.shards_skipped == 2 and resumed.shards_written == 3
    assert read_rows(crashed).equals(read_rows(reference))
    assert ShardReader(crashed).num_rows == 22


def test_workers_write_disjoint_parts_that_merge(corpus_path, policy_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(run_module, "build_annotators", lambda cfg, tokenizer: [HashScorer()])
    single, split = tmp_path / "single", tmp_path / "split"
    run_module.annotate(config(corpus_path, policy_dir, single))
    for worker in range(2):
        run_module.annotate(config(corpus_path, policy_dir, split, num_workers=2,
                                   worker_index=worker))
    assert (split / "_manifest.json").exists()  # the last worker merged the manifests
    assert ShardReader(split).num_rows == 22
    assert read_rows(split).equals(read_rows(single))


def test_tokenization_issues_are_counted(corpus_path, policy_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "question 0"}],
                                         add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = tmp_path / "out"
    # room for one response token after the shortest prompts: every row is cut or refused
    result = run_module.annotate(config(corpus_path, policy_dir, out,
                                        tokenization={"max_length": len(prompt) + 1}))
    issues = result.tokenization_issues
    assert issues["response_truncated"] > 0
    assert issues["response_truncated"] + issues.get("prompt_too_long", 0) == 22
    assert result.rows_written == 22  # annotation keeps every row; the trainer decides


GENERIC_GUARD = {
    "template": "generic", "dtype": "float32", "batch_size": 8, "backend": "transformers",
    "template_options": {"response_template": "Is the answer unsafe? Question: {prompt} "
                         "Answer: {response}", "labels": ["unsafe", "safe"], "label_prefix": " "},
}


def test_critic_and_star_columns_from_a_real_guard(corpus_path, policy_dir, tiny_guard_dir,
                                                   tmp_path):
    from safekeel.data.guard.critic import GuardSettings, make_critic
    from safekeel.data.shards import CRITIC_COLUMN, STAR_ENDS_COLUMN, STAR_VALUES_COLUMN

    out = tmp_path / "out"
    critic_cfg = {"model": str(tiny_guard_dir), **GENERIC_GUARD}
    run_module.annotate(config(corpus_path, policy_dir, out, critic=critic_cfg,
                               star={"enabled": True, "segment_tokens": 2}))
    reader = ShardReader(out, required_columns=[CRITIC_COLUMN, STAR_VALUES_COLUMN,
                                                STAR_ENDS_COLUMN])
    assert reader.provenance.critic_model == str(tiny_guard_dir)
    assert reader.provenance.star_segment_size == 2
    rows = read_rows(out).to_dicts()
    # the shard holds what the critic gives for the same conversations, scored on their own
    with make_critic(GuardSettings(**{**critic_cfg, "progress": False})) as critic:
        expected = critic.score([r["messages"] for r in rows]).p_unsafe
    assert [r[CRITIC_COLUMN] for r in rows] == pytest.approx(expected.tolist(), abs=1e-6)
    for row in rows:
        assert len(row[STAR_VALUES_COLUMN]) == len(row[STAR_ENDS_COLUMN]) >= 2
        # the last prefix is the whole response: its value is 1 - the critic's score
        assert row[STAR_VALUES_COLUMN][-1] == pytest.approx(1 - row[CRITIC_COLUMN], abs=1e-5)


def test_critic_and_star_get_the_guard_settings_unchanged(corpus_path, policy_dir,
                                                         tiny_guard_dir, tmp_path, monkeypatch):
    """One settings object serves the critic column and STAR; the engine is asked for the
    STAR role (prefix caching) instead of the settings being rewritten."""
    from transformers import AutoTokenizer

    from safekeel.annotate.star import StarAnnotator
    from safekeel.data.guard import critic as critic_module

    built = []
    real_make_critic = critic_module.make_critic

    def recording_make_critic(settings, *, star=False):
        built.append((settings, star))
        return real_make_critic(settings, star=star)

    monkeypatch.setattr(critic_module, "make_critic", recording_make_critic)
    guard = {"model": str(tiny_guard_dir), **GENERIC_GUARD, "enforce_eager": True,
             "max_model_len": 200}
    cfg = config(corpus_path, policy_dir, tmp_path, critic=guard,
                 star={"enabled": True, "segment_tokens": 2})
    annotators = run_module.build_annotators(cfg, AutoTokenizer.from_pretrained(policy_dir))
    try:
        critic, star = annotators
        (settings, for_star), = built
        assert settings is cfg.critic and for_star
        assert critic.settings is cfg.critic and isinstance(star, StarAnnotator)
        assert star.critic is critic
        assert (critic.settings.enable_prefix_caching, critic.settings.block_size) == (None, None)
    finally:
        for annotator in annotators:
            annotator.close()


def test_star_needs_a_critic(corpus_path, policy_dir, tmp_path):
    from safekeel.data.config import ConfigError

    with pytest.raises(ConfigError, match="star.enabled: STAR scores prefixes with the critic"):
        config(corpus_path, policy_dir, tmp_path, star={"enabled": True})


_KILLABLE_RUN = """
import sys, yaml
from safekeel.annotate.config import AnnotateConfig
from safekeel.annotate.run import annotate
from safekeel.data.config import from_dict
annotate(from_dict(AnnotateConfig, yaml.safe_load(open(sys.argv[1]))))
"""


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(policy_dir, tiny_guard_dir, tmp_path):
    """Kill a real annotate process after its first shard, rerun, compare with a clean run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml

    from safekeel.data.shards import MANIFEST_NAME

    rows = [{"prompt": f"question number {i}", "response": f"answer {i} " * (1 + i % 7)}
            for i in range(400)]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    settings = {"corpus": {"path": str(corpus)}, "policy": policy_dir, "rows_per_shard": 40,
                "critic": {"model": str(tiny_guard_dir), **GENERIC_GUARD, "batch_size": 4}}
    script = tmp_path / "run.py"
    script.write_text(_KILLABLE_RUN)
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}

    def launch(out):
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump({**settings, "output_dir": str(out)}))
        return subprocess.Popen([sys.executable, str(script), str(path)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    killed = tmp_path / "killed"
    process = launch(killed)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait until the first shard is recorded
        manifest = killed / MANIFEST_NAME
        if manifest.exists() and json.loads(manifest.read_text())["shards"]:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = json.loads((killed / MANIFEST_NAME).read_text())["shards"]
    assert 1 <= len(finished) < 10, "the kill should land in the middle of the run"

    assert launch(killed).wait(timeout=300) == 0
    clean = tmp_path / "clean"
    assert launch(clean).wait(timeout=300) == 0
    resumed, reference = read_rows(killed), read_rows(clean)
    assert resumed.height == 400 and resumed["id"].n_unique() == 400
    assert resumed.equals(reference)
    report = json.loads((killed / "report.worker-0-of-1.json").read_text())
    assert report["runs"][-1]["shards_skipped_as_finished"] == len(finished)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_backend_gives_the_transformers_scores(corpus_path, policy_dir, tiny_guard_dir,
                                                   tmp_path):
    """The default backend end to end (critic + STAR through one vLLM engine, prefix caching
    on) matches the reference backend. Runs in a subprocess: an in-process engine changes
    process-wide state (threads, torch.distributed) that later tests must not inherit."""
    import os
    import subprocess
    import sys

    import yaml

    pytest.importorskip("vllm")
    from safekeel.data.shards import CRITIC_COLUMN, STAR_VALUES_COLUMN

    outputs = {}
    for backend in ("transformers", "vllm"):
        out = tmp_path / backend
        critic = {"model": str(tiny_guard_dir), **GENERIC_GUARD, "backend": backend}
        if backend == "vllm":
            critic.update(distributed_executor_backend="uni", enforce_eager=True,
                          gpu_memory_utilization=0.1, max_model_len=512)
        settings = {"corpus": {"path": str(corpus_path), "on_bad_row": "skip"},
                    "policy": policy_dir, "output_dir": str(out), "rows_per_shard": 5,
                    "critic": critic, "star": {"enabled": True, "segment_tokens": 2}}
        path = tmp_path / f"{backend}.yaml"
        path.write_text(yaml.safe_dump(settings))
        script = tmp_path / "run.py"
        script.write_text(_KILLABLE_RUN)
        env = {**os.environ, "PYTHONPATH": os.getcwd(), "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
               "VLLM_CPU_KVCACHE_SPACE": "1"}
        done = subprocess.run([sys.executable, str(script), str(path)], env=env,
                              capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[backend] = read_rows(out)
    ref, got = outputs["transformers"], outputs["vllm"]
    assert got["id"].to_list() == ref["id"].to_list()
    assert got[CRITIC_COLUMN].to_list() == pytest.approx(ref[CRITIC_COLUMN].to_list(), abs=1e-5)
    for a, b in zip(got[STAR_VALUES_COLUMN].to_list(), ref[STAR_VALUES_COLUMN].to_list()):
        assert a == pytest.approx(b, abs=1e-5)


def test_summary_reports_mean_and_histogram_of_each_score(corpus_path, policy_dir, tmp_path,
                                                          monkeypatch, capsys):
    monkeypatch.setattr(run_module, "build_annotators", lambda cfg, tokenizer: [HashScorer()])
    out = tmp_path / "out"
    result = run_module.annotate(config(corpus_path, policy_dir, out))
    scores = read_rows(out)[PROBE_COLUMN].to_list()
    stats = result.scores[PROBE_COLUMN]
    assert stats["count"] == 22 and stats["mean"] == pytest.approx(sum(scores) / 22, abs=1e-6)
    expected = [0] * 10
    for value in scores:
        expected[min(int(value * 10), 9)] += 1
    assert stats["histogram"]["counts"] == expected
    assert "probe_p_harmful  mean" in capsys.readouterr().out


def test_a_resume_on_changed_corpus_content_is_refused(corpus_path, policy_dir, tmp_path,
                                                       monkeypatch):
    """Same path, same row count, other content: the crashed run's shards are not continued."""
    monkeypatch.setattr(run_module, "build_annotators",
                        lambda cfg, tokenizer: [HashScorer(crash_on_call=3)])
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_module.annotate(config(corpus_path, policy_dir, out))
    lines = corpus_path.read_text().splitlines()
    corpus_path.write_text("\n".join(line.replace("answer", "reply") for line in lines) + "\n")
    monkeypatch.setattr(run_module, "build_annotators", lambda cfg, tokenizer: [HashScorer()])
    with pytest.raises(ManifestError, match=r"written from other content of the corpus .*"
                                            r"corpus.jsonl .*resuming would mix"):
        run_module.annotate(config(corpus_path, policy_dir, out))
    assert len(ShardReader(out, require_complete=False).shards) == 2  # nothing added


def test_a_resume_with_changed_settings_is_refused(corpus_path, policy_dir, tmp_path,
                                                   monkeypatch):
    monkeypatch.setattr(run_module, "build_annotators",
                        lambda cfg, tokenizer: [HashScorer(crash_on_call=3)])
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_module.annotate(config(corpus_path, policy_dir, out))
    monkeypatch.setattr(run_module, "build_annotators", lambda cfg, tokenizer: [HashScorer()])
    with pytest.raises(ManifestError, match="different provenance.*config_hash"):
        run_module.annotate(config(corpus_path, policy_dir, out,
                                   tokenization={"max_length": 100}))


class StandInCritic:
    """A guard that answers 'safe' at once and records what it was asked to read."""

    from safekeel.data.shards import CRITIC_COLUMN as _column

    columns = (_column,)

    def __init__(self):
        self.star_queries = []

    def provenance(self):
        return {"critic_model": "stand-in"}

    def score(self, conversations, sources=None):
        from types import SimpleNamespace

        import numpy as np

        self.star_queries.extend(conversations)
        return SimpleNamespace(p_unsafe=np.zeros(len(conversations)))

    def annotate(self, examples):
        return {self._column: [0.0] * len(examples)}

    def close(self):
        pass


def _annotate_peak_bytes(response, policy_dir, out_dir):
    """Peak Python memory of annotating three rows, the middle one with `response`."""
    import tracemalloc

    rows = [{"prompt": "short", "response": "fine"}, {"prompt": "long", "response": response},
            {"prompt": "again", "response": "ok"}]
    out_dir.mkdir()
    corpus = out_dir / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = from_dict(AnnotateConfig, {
        "corpus": {"path": str(corpus)}, "policy": policy_dir, "output_dir": str(out_dir / "o"),
        "critic": {"model": "stand-in"}, "star": {"enabled": True, "segment_tokens": 32},
        "tokenization": {"max_length": 256}})
    tracemalloc.start()
    try:
        result = run_module.annotate(cfg)
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("response_bytes",
                         [50_000, pytest.param(1_000_000, marks=pytest.mark.slow)])
def test_a_huge_response_costs_a_bounded_multiple_of_its_size(
        response_bytes, policy_dir, tmp_path, monkeypatch):
    """A 1 MB response is truncated (and reported) like any long one; STAR scores only the
    tokens training keeps, so memory grows by a small multiple of the row, not quadratically."""
    import safekeel.data.guard.critic as critic_module

    critic = StandInCritic()
    monkeypatch.setattr(critic_module, "make_critic", lambda settings, star=False: critic)
    _annotate_peak_bytes("warm up", policy_dir, tmp_path / "warm")
    _, base = _annotate_peak_bytes("a short answer", policy_dir, tmp_path / "base")
    critic.star_queries.clear()
    words = " ".join(f"w{i % 1000}" for i in range(response_bytes // 5))[:response_bytes]
    result, peak = _annotate_peak_bytes(words, policy_dir, tmp_path / "huge")
    assert result.rows_written == 3
    assert result.tokenization_issues == {"response_truncated": 1}
    longest = max(len(q[-1]["content"]) for q in critic.star_queries)
    assert len(critic.star_queries) <= 3 * (256 // 32) and longest < 256 * 8
    grown = peak - base
    assert grown < 40 * response_bytes, f"{grown / 1e6:.1f} MB more for a {response_bytes} B row"
