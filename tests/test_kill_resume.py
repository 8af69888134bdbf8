"""SIGKILL at random moments, then rerun: the result equals an uninterrupted run.

Each stage runs in a child forked from a fork server that has imported it (a start costs
milliseconds, not an import of torch). The parent kills it with SIGKILL after a seeded
random delay drawn from the length of an uninterrupted run, checks what the kill left on
disk, and starts it again, until at least five kills have landed while the stage was at
work; then it lets a rerun finish and compares:

* annotate (critic + STAR + probe, transformers backend, six shards): the shards hold the
  reference's rows with the same values, none lost or repeated, and after every kill the
  manifest lists only whole shards whose sha256 matches;
* train (save_every=1): the log and the final weights equal the uninterrupted run's;
* evaluate: report.json is the reference's (timings aside), and a set's generations that
  were finished before a kill are read from the cache, not made again (besides the random
  kills, one targeted kill lands right after the first set's generations are written).
"""

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from safekeel import pipeline
from safekeel.data.config import from_dict
from safekeel.data.embedded.world import make_world, write_jsonl
from safekeel.data.shards import (
    CRITIC_COLUMN,
    PROBE_COLUMN,
    STAR_VALUES_COLUMN,
    Manifest,
    ShardReader,
    manifest_filename,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_torch_thread")]

# A fork server imports the stages once, before any thread starts; each run is a fork of it
# (a start costs milliseconds, and no lock of a threaded parent is inherited).
FORK = multiprocessing.get_context("forkserver")
FORK.set_forkserver_preload(["torch", "transformers", "safekeel.annotate.run",
                             "safekeel.train.run", "safekeel.evaluate.run"])
KILLS = 5
SEED = 11


def _stage(name):
    from safekeel.annotate.run import annotate
    from safekeel.evaluate.run import evaluate
    from safekeel.train.run import train

    return {"annotate": annotate, "train": train, "evaluate": evaluate}[name]


def _run(stage, cfg) -> float:
    """Run to the end in a child; returns its wall time (the first run starts the server)."""
    started = time.perf_counter()
    process = FORK.Process(target=_stage(stage), args=(cfg,))
    process.start()
    process.join()
    assert process.exitcode == 0, f"{stage} failed in its child (see the captured stderr)"
    return time.perf_counter() - started


def _kill_and_rerun(stage, make_cfg, fresh_dir, work_seconds, rng, after_kill=None):
    """Kill `stage` at random moments until KILLS kills landed mid-work, then let it finish.

    A run that finishes before its kill ends the round; the next round starts in a fresh
    output folder. Returns the output folders of every round (each finished)."""
    rounds, landed = [fresh_dir()], 0
    while landed < KILLS:
        process = FORK.Process(target=_stage(stage), args=(make_cfg(rounds[-1]),))
        process.start()
        process.join(timeout=rng.uniform(0.0, work_seconds))
        if process.exitcode is None:
            _kill(process)
            landed += 1
            if after_kill is not None:
                after_kill(rounds[-1])
        else:
            assert process.exitcode == 0
            rounds.append(fresh_dir())
    _run(stage, make_cfg(rounds[-1]))
    return rounds


def _kill(process):
    os.kill(process.pid, signal.SIGKILL)
    process.join()
    assert process.exitcode == -signal.SIGKILL


def _kill_once_written(stage, cfg, written, timeout=600.0):
    """Start `stage` and SIGKILL it the moment `written()` finds its file on disk: the one
    moment a test needs, reached for sure (random delays can all fall before it on a slow
    machine). Returns False if the run finished before the file was seen."""
    process = FORK.Process(target=_stage(stage), args=(cfg,))
    process.start()
    deadline = time.monotonic() + timeout
    try:
        while process.exitcode is None and not written():
            assert time.monotonic() < deadline, f"{stage} wrote nothing in {timeout:.0f} s"
            time.sleep(0.005)
    except BaseException:
        if process.exitcode is None:  # leave no child running behind a failed test
            _kill(process)
        raise
    if process.exitcode is not None:
        assert process.exitcode == 0, f"{stage} failed in its child (see the captured stderr)"
        return False
    _kill(process)
    return True


def _counter_dirs(root: Path):
    count = {"n": 0}

    def fresh():
        count["n"] += 1
        return root / f"round-{count['n']}"

    return fresh


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def fork_server():
    """Start the fork server before any run is timed (its imports take seconds)."""
    process = FORK.Process(target=os.getpid)
    process.start()
    process.join()
    assert process.exitcode == 0


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    world = make_world(0)
    root = tmp_path_factory.mktemp("world")
    write_jsonl([{"messages": e["messages"]} for e in world.attack_mix(0.3, size=23)],
                root / "corpus.jsonl")
    harmful = [e["messages"][0]["content"] for e in world.eval_harmful[:30]]
    benign = [e["messages"][0]["content"] for e in world.eval_tasks[:30]]
    (root / "harmful.txt").write_text("\n".join(harmful) + "\n")
    (root / "benign.txt").write_text("\n".join(benign) + "\n")
    write_jsonl(world.eval_harmful[:6], root / "eval_harmful.jsonl")
    write_jsonl(world.eval_benign_overrefusal[:4], root / "eval_benign.jsonl")
    return root


@pytest.fixture(scope="module")
def probe_dir(world, tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    assert pipeline.main(["probe", "--policy", str(tiny_model_dir), "--harmful",
                          str(world / "harmful.txt"), "--benign", str(world / "benign.txt"),
                          "--layers", "[-1]", "--output_dir", str(out)]) == 0
    return out


def _annotate_cfg(world, policy, guard, probe, out):
    from safekeel.annotate.config import AnnotateConfig

    return from_dict(AnnotateConfig, {
        "corpus": {"path": str(world / "corpus.jsonl")}, "policy": str(policy),
        "output_dir": str(out), "rows_per_shard": 4, "row_group_size": 2,
        "critic": {"model": str(guard), "template": "generic", "dtype": "float32",
                   "batch_size": 8, "backend": "transformers", "progress": False,
                   "template_options": {"response_template": "Is the answer unsafe? "
                                        "Question: {prompt} Answer: {response}",
                                        "labels": ["unsafe", "safe"], "label_prefix": " "}},
        "star": {"enabled": True, "segment_tokens": 8},
        "probe": {"path": str(probe)},
        "tokenization": {"max_length": 128},
    })


def _rows(out: Path) -> pl.DataFrame:
    return pl.read_parquet(str(out / "shard-*.parquet")).sort("id")


@pytest.fixture(scope="module")
def annotated(world, tiny_model_dir, tiny_guard_dir, probe_dir, tmp_path_factory):
    """The uninterrupted annotation, and how long it took."""
    out = tmp_path_factory.mktemp("annotate") / "reference"
    seconds = _run("annotate", _annotate_cfg(world, tiny_model_dir, tiny_guard_dir, probe_dir,
                                             out))
    return out, seconds


# ---------------------------------------------------------------------------------- tests


def test_annotate_killed_at_random_moments(world, tiny_model_dir, tiny_guard_dir, probe_dir,
                                           annotated, tmp_path):
    reference, seconds = annotated
    expected = _rows(reference)
    assert expected.height == 23 and ShardReader(reference).manifest.plan.total_shards == 6

    def only_whole_shards_listed(out):
        path = out / manifest_filename()
        if not path.exists():
            return
        manifest = Manifest.load(path)
        if manifest.shards:
            reader = ShardReader(out, verify_hashes=True, require_complete=False,
                                 required_columns=[CRITIC_COLUMN, PROBE_COLUMN,
                                                   STAR_VALUES_COLUMN])
            listed = pl.read_parquet([str(f) for f in reader.files]).sort("id")
            # a listed shard already holds exactly the reference's rows and values
            ids = listed["id"].to_list()
            assert listed.equals(expected.filter(pl.col("id").is_in(ids)))

    rounds = _kill_and_rerun(
        "annotate",
        lambda out: _annotate_cfg(world, tiny_model_dir, tiny_guard_dir, probe_dir, out),
        _counter_dirs(tmp_path), seconds, random.Random(SEED), only_whole_shards_listed)
    for out in rounds:
        rows = _rows(out)
        assert rows["id"].n_unique() == rows.height == 23  # none lost, none twice
        assert rows.equals(expected)
        assert ShardReader(out, verify_hashes=True).num_rows == 23


def _train_cfg(policy, shards, out):
    from safekeel.train.config import TrainConfig

    return from_dict(TrainConfig, {
        "policy": str(policy), "shards": str(shards), "output_dir": str(out),
        "method": "adaptive", "per_device_batch_size": 2, "gradient_accumulation_steps": 1,
        "epochs": 1, "learning_rate": 1e-2, "tokenization": {"max_length": 128},
        "progress_bar": False, "save_every": 1, "seed": 3})


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _comparable_log(out):
    drop = {"seconds", "step_seconds", "tokens_per_second", "examples_per_second"}
    return [{k: v for k, v in line.items() if k not in drop} for line in _log(out)]


def test_train_killed_at_random_moments(tiny_model_dir, annotated, tmp_path):
    shards, _ = annotated
    reference = tmp_path / "reference"
    seconds = _run("train", _train_cfg(tiny_model_dir, shards, reference))
    expected_log = _comparable_log(reference)
    expected = load_file(str(reference / "final" / "model.safetensors"))
    rounds = _kill_and_rerun("train", lambda out: _train_cfg(tiny_model_dir, shards, out),
                             _counter_dirs(tmp_path), seconds, random.Random(SEED + 1))
    for out in rounds:
        assert _comparable_log(out) == expected_log
        weights = load_file(str(out / "final" / "model.safetensors"))
        assert weights.keys() == expected.keys()
        assert all(torch.equal(weights[k], expected[k]) for k in expected)


def _evaluate_cfg(world, checkpoints, out):
    from safekeel.evaluate.config import EvaluateConfig

    return from_dict(EvaluateConfig, {
        "checkpoints": [str(c) for c in checkpoints], "checkpoint_names": ["base", "other"],
        "harmful_prompts": {"path": str(world / "eval_harmful.jsonl"),
                            "category_column": "topic", "name": "harmful"},
        "benign_prompts": {"path": str(world / "eval_benign.jsonl"), "name": "benign"},
        "output_dir": str(out), "backend": "transformers", "max_new_tokens": 6,
        "batch_size": 4, "plots": False})


def _comparable_report(out: Path) -> dict:
    text = (out / "report.json").read_text().replace(str(out), "<out>")
    # timings, and the config hash (the config holds output_dir; the config itself is
    # compared with the folder replaced)
    volatile = {"created", "seconds", "tokens_per_second", "cached", "config_hash"}

    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in volatile}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return strip(json.loads(text))


def test_evaluate_killed_at_random_moments(world, tiny_model_dir, tiny_guard_dir, tmp_path):
    checkpoints = [tiny_model_dir, tiny_guard_dir]
    reference = tmp_path / "reference"
    seconds = _run("evaluate", _evaluate_cfg(world, checkpoints, reference))
    expected = _comparable_report(reference)
    finished: dict[Path, int] = {}  # generation file -> its mtime when a kill found it

    def note_finished_generations(out):
        for path in out.rglob("generations.parquet"):
            finished.setdefault(path, path.stat().st_mtime_ns)

    rounds = _kill_and_rerun("evaluate", lambda out: _evaluate_cfg(world, checkpoints, out),
                             _counter_dirs(tmp_path), seconds, random.Random(SEED + 2),
                             note_finished_generations)
    # and one kill right after the first set's generations are written (three follow it)
    targeted = tmp_path / "targeted"
    cfg = _evaluate_cfg(world, checkpoints, targeted)
    assert _kill_once_written("evaluate", cfg,
                              lambda: any(targeted.rglob("generations.parquet")))
    note_finished_generations(targeted)
    _run("evaluate", cfg)
    for out in [*rounds, targeted]:
        assert _comparable_report(out) == expected
    for path, mtime in finished.items():
        assert path.stat().st_mtime_ns == mtime, f"{path} was generated again"
