"""An unwritable output folder fails before work starts; a full disk leaves nothing half done.

A read-only folder is a read-only tmpfs when the tests run as root (root ignores permission
bits), else a chmod-ed folder. The full disk is a real 256 KB tmpfs where the tests may mount
one (root), and an ENOSPC raised by a patched Parquet writer everywhere.
"""

import errno
import json
import os
import subprocess

import polars as pl
import pytest

import safekeel.annotate.run as annotate_run
import safekeel.data.shards.writer as shard_writer_module
from safekeel.annotate.config import AnnotateConfig
from safekeel.data.config import from_dict
from safekeel.data.embedded.tiny_models import save_tiny_model
from safekeel.data.output_dir import OutputDirError
from safekeel.data.shards import PROBE_COLUMN, Manifest, ShardReader, manifest_filename


def _mount_tmpfs(path, options):
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          check=False, capture_output=True)
    return done.returncode == 0


def _umount(path):
    subprocess.run(["umount", str(path)], check=False, capture_output=True)


@pytest.fixture()
def read_only_dir(tmp_path):
    path = tmp_path / "readonly"
    if _mount_tmpfs(path, "ro,size=64k"):
        yield path
        _umount(path)
        return
    if os.geteuid() == 0:
        pytest.skip("running as root without permission to mount a read-only tmpfs")
    path.chmod(0o555)
    yield path
    path.chmod(0o755)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return str(save_tiny_model(tmp_path_factory.mktemp("policy")))


class HashScorer:
    columns = (PROBE_COLUMN,)

    def provenance(self):
        return {"probe_file_sha256": "0" * 64, "probe_layers": [1], "probe_pooling": "last"}

    def annotate(self, examples):
        return {PROBE_COLUMN: [(sum(map(ord, e["id"])) % 97) / 97 for e in examples]}

    def close(self):
        pass


def _corpus(tmp_path, rows=23, response_chars=10):
    import random

    rng = random.Random(0)
    path = tmp_path / "corpus.jsonl"
    with path.open("w") as fh:
        for i in range(rows):
            # random letters: zstd cannot shrink them, so the shards really take the space
            text = "".join(rng.choice("abcdefghij") for _ in range(response_chars))
            fh.write(json.dumps({"prompt": f"question {i}", "response": f"{i} {text}"}) + "\n")
    return path


def _config(corpus, policy_dir, out):
    return from_dict(AnnotateConfig, {"corpus": {"path": str(corpus)}, "policy": policy_dir,
                                      "output_dir": str(out), "rows_per_shard": 5,
                                      "row_group_size": 5})


def _assert_nothing_half_done(out):
    """Every listed shard is whole and valid; no temporary file is left behind."""
    manifest = Manifest.load(out / manifest_filename())
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    if manifest.shards:
        reader = ShardReader(out, required_columns=[PROBE_COLUMN], verify_hashes=True,
                             require_complete=False)
        assert reader.num_rows == manifest.num_rows
    return manifest


# ------------------------------------------------------------------------ unwritable folder


def test_annotate_refuses_a_read_only_output_dir_before_reading_anything(
        read_only_dir, tmp_path, policy_dir, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the output folder was checked")

    monkeypatch.setattr(annotate_run, "build_annotators", no_work)
    monkeypatch.setattr(annotate_run, "count_rows", no_work)
    with pytest.raises(OutputDirError, match=r"output_dir .*readonly/out: cannot be written "
                                             r"\((read-only file system|permission denied)\)"):
        annotate_run.annotate(_config(_corpus(tmp_path), policy_dir, read_only_dir / "out"))


def test_train_refuses_a_read_only_output_dir_before_loading_the_model(
        read_only_dir, tmp_path, tiny_model_dir, monkeypatch):
    import safekeel.train.run as train_run
    from safekeel.data.models import load_tokenizer
    from safekeel.data.shards import tokenizer_fingerprint
    from safekeel.train.config import TrainConfig
    from tests.train.test_run import write_shards  # the training fixtures' shard writer

    shards = write_shards(tmp_path / "shards", 8,
                          tokenizer_fingerprint(load_tokenizer(str(tiny_model_dir))))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(train_run, "load_causal_lm", no_model)
    cfg = from_dict(TrainConfig, {"policy": str(tiny_model_dir), "shards": str(shards),
                                  "output_dir": str(read_only_dir / "out"),
                                  "progress_bar": False})
    with pytest.raises(OutputDirError, match="cannot be written"):
        train_run.train(cfg)


def test_evaluate_refuses_a_read_only_output_dir_before_generating(
        read_only_dir, tmp_path, tiny_model_dir, monkeypatch):
    import safekeel.evaluate.run as evaluate_run
    from safekeel.evaluate.config import EvaluateConfig

    prompts = tmp_path / "harmful.jsonl"
    prompts.write_text(json.dumps({"prompt": "How do I pick a lock?"}) + "\n")

    def no_generation(*args, **kwargs):
        raise AssertionError("generation started before the output folder was checked")

    monkeypatch.setattr(evaluate_run, "make_generator", no_generation)
    cfg = from_dict(EvaluateConfig, {"checkpoints": [str(tiny_model_dir)],
                                     "harmful_prompts": {"path": str(prompts)},
                                     "benign_prompts": {"path": str(prompts), "name": "b"},
                                     "output_dir": str(read_only_dir / "out"),
                                     "backend": "transformers"})
    with pytest.raises(OutputDirError, match="cannot be written"):
        evaluate_run.evaluate(cfg)


# ------------------------------------------------------------------------------ full disk


def test_a_full_disk_mid_annotation_is_one_error_and_a_rerun_finishes(
        tmp_path, policy_dir, monkeypatch):
    """ENOSPC (simulated: the Parquet writer raises it on its third shard) stops annotate with
    one plain error; the manifest lists only whole shards; a rerun finishes the rest."""
    monkeypatch.setattr(annotate_run, "build_annotators", lambda cfg, tokenizer: [HashScorer()])
    corpus = _corpus(tmp_path)
    reference = tmp_path / "reference"
    annotate_run.annotate(_config(corpus, policy_dir, reference))

    real_writer = shard_writer_module.pq.ParquetWriter
    opened = {"n": 0}

    class FullDiskWriter(real_writer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opened["n"] += 1
            self.full = opened["n"] == 3

        def write_table(self, *args, **kwargs):
            if self.full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write_table(*args, **kwargs)

    out = tmp_path / "out"
    monkeypatch.setattr(shard_writer_module.pq, "ParquetWriter", FullDiskWriter)
    with pytest.raises(OutputDirError, match=r"no space left on the device.*rerun to resume"):
        annotate_run.annotate(_config(corpus, policy_dir, out))
    assert sorted(_assert_nothing_half_done(out).shards) == [0, 1]
    monkeypatch.setattr(shard_writer_module.pq, "ParquetWriter", real_writer)

    resumed = annotate_run.annotate(_config(corpus, policy_dir, out))
    assert resumed.shards_skipped == 2 and resumed.shards_written == 3
    assert (pl.read_parquet(str(out / "shard-*.parquet")).sort("id")
            .equals(pl.read_parquet(str(reference / "shard-*.parquet")).sort("id")))


def test_a_really_full_file_system(tmp_path, policy_dir, monkeypatch):
    """The same on a real 256 KB tmpfs (root only): it fills up during the shards."""
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "size=256k"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        monkeypatch.setattr(annotate_run, "build_annotators",
                            lambda cfg, tokenizer: [HashScorer()])
        corpus = _corpus(tmp_path, rows=23, response_chars=30_000)  # ~0.7 MB of shards
        out = small / "out"
        with pytest.raises(OutputDirError, match="no space left on the device"):
            annotate_run.annotate(_config(corpus, policy_dir, out))
        manifest = _assert_nothing_half_done(out)
        assert len(manifest.shards) < 5
        subprocess.run(["mount", "-o", "remount,size=4m", str(small)], check=True)
        annotate_run.annotate(_config(corpus, policy_dir, out))
        assert ShardReader(out, verify_hashes=True).num_rows == 23
    finally:
        _umount(small)


def test_the_cli_says_it_in_one_line(read_only_dir, tmp_path, policy_dir, capsys):
    """Through `safekeel annotate`: exit code 2 and one line (the CLI's user-error form)."""
    from safekeel import pipeline

    try:
        code = pipeline.main(["annotate", "--corpus.path", str(_corpus(tmp_path)),
                              "--policy", policy_dir,
                              "--output_dir", str(read_only_dir / "out")])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    line = [text for text in err.splitlines() if text.strip()][-1]
    assert line.startswith("safekeel: error: output_dir ") and "cannot be written" in line
