"""Annotated shard format: round trips through pyarrow/polars/pandas, resume, merge, refusals."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from safekeel.data.shards import (
    CRITIC_COLUMN,
    MANIFEST_NAME,
    MESSAGE_TYPE,
    METADATA_KEY,
    PROBE_COLUMN,
    STAR_ENDS_COLUMN,
    STAR_VALUES_COLUMN,
    Manifest,
    ManifestError,
    Provenance,
    ShardError,
    ShardReader,
    ShardWriter,
    check_shard_schema,
    manifest_filename,
    merge_manifests,
    plan_shards,
    shard_filename,
    shard_schema,
    tokenizer_fingerprint,
)

ALL_RISK = {CRITIC_COLUMN, PROBE_COLUMN, STAR_VALUES_COLUMN, STAR_ENDS_COLUMN}

# Original corpus columns of several types, carried through untouched.
ORIGINAL_FIELDS = [
    pa.field("source", pa.string()),
    pa.field("turns", pa.int64()),
    pa.field("quality", pa.float64()),
    pa.field("is_attack", pa.bool_()),
    pa.field("tags", pa.list_(pa.string())),
    pa.field("rating", pa.int32()),  # nullable: some rows have no rating
]


def make_provenance(**changes) -> Provenance:
    values = {
        "policy_tokenizer": "tiny-policy",
        "policy_tokenizer_fingerprint": "f" * 64,
        "critic_model": "tiny-guard",
        "critic_revision": "r1",
        "critic_template": "llama_guard_3",
        "probe_file_sha256": "a" * 64,
        "probe_layers": [2, 3],
        "probe_pooling": "mean",
        "star_segment_size": 4,
        "code_version": "0.1.0",
        "config_hash": "c0ffee",
    }
    values.update(changes)
    return Provenance(**values)


def make_row(i: int) -> dict:
    """Row i of a synthetic corpus; every value is a plain function of i."""
    n_segments = 1 + i % 3
    return {
        "id": f"ex-{i:05d}",
        "messages": [
            {"role": "user", "content": f"question {i}"},
            {"role": "assistant", "content": f"answer {i} " * (1 + i % 4)},
        ],
        "source": ["alpaca", "hexphi", "gsm8k"][i % 3],
        "turns": 2 + i % 2,
        "quality": i / 7,
        "is_attack": i % 5 == 0,
        "tags": [f"t{j}" for j in range(i % 3)],
        "rating": None if i % 4 == 0 else i % 10,
        CRITIC_COLUMN: (i % 11) / 10,
        PROBE_COLUMN: (i % 7) / 6,
        STAR_VALUES_COLUMN: [((i + k) % 5) / 4 for k in range(n_segments)],
        STAR_ENDS_COLUMN: [4 * (k + 1) for k in range(n_segments)],
    }


def as_float32(x: float) -> float:
    return float(np.float32(x))


def expected_row(i: int) -> dict:
    """What reading row i back must give: the same values, risk scores rounded to float32."""
    row = make_row(i)
    row[CRITIC_COLUMN] = as_float32(row[CRITIC_COLUMN])
    row[PROBE_COLUMN] = as_float32(row[PROBE_COLUMN])
    row[STAR_VALUES_COLUMN] = [as_float32(v) for v in row[STAR_VALUES_COLUMN]]
    return row


def write_set(
    directory: Path,
    n_rows: int,
    rows_per_shard: int,
    *,
    risk=frozenset(ALL_RISK),
    provenance: Provenance | None = None,
    num_workers: int = 1,
    worker_index: int = 0,
    row_group_size: int = 2048,
) -> Manifest:
    """Run a worker's share of a fake annotation: write its shards and record them."""
    provenance = provenance or make_provenance()
    schema = shard_schema(ORIGINAL_FIELDS, risk)
    plan = plan_shards(n_rows, rows_per_shard, num_workers, worker_index)
    manifest = Manifest.open(directory, plan, provenance)
    for k in plan.pending(manifest.finished_indices()):
        start, stop = plan.row_range(k)
        batch = [
            {c: v for c, v in make_row(i).items() if c in schema.names} for i in range(start, stop)
        ]
        with ShardWriter(directory, k, schema, provenance, row_group_size=row_group_size) as w:
            w.write_rows(batch)
        manifest.record(w.info)
    return manifest


def write_bad_shard(directory: Path, rows: list[dict], risk=frozenset(ALL_RISK)) -> Path:
    """A one-shard set whose values bypass the writer's checks (as a buggy annotator would)."""
    provenance = make_provenance()
    schema = shard_schema(ORIGINAL_FIELDS, risk)
    with ShardWriter(directory, 0, schema, provenance, check_values=False) as w:
        w.write_rows([{c: v for c, v in r.items() if c in schema.names} for r in rows])
    Manifest(plan_shards(len(rows), len(rows)), provenance, [w.info]).save(
        directory / MANIFEST_NAME
    )
    return directory / shard_filename(0)


# --------------------------------------------------------------------------- round trips


def test_round_trip_through_reader_pyarrow_polars_pandas(tmp_path):
    write_set(tmp_path, n_rows=23, rows_per_shard=10)
    expected = [expected_row(i) for i in range(23)]

    reader = ShardReader(tmp_path, verify_hashes=True)
    assert reader.num_rows == 23
    assert [p.name for p in reader.files] == [shard_filename(k) for k in range(3)]
    assert list(reader.iter_rows(batch_size=4)) == expected

    # pyarrow, on the files and on the directory (the manifest and temp names stay out of it)
    assert pq.read_table(reader.files).to_pylist() == expected
    table = pq.read_table(tmp_path)
    assert table.num_rows == 23
    assert table.schema.field(CRITIC_COLUMN).type == pa.float32()
    assert table.schema.field(STAR_VALUES_COLUMN).type.value_type == pa.float32()
    assert table.schema.field(STAR_ENDS_COLUMN).type.value_type == pa.int32()

    # polars, lazily over the glob
    frame = pl.scan_parquet(tmp_path / "shard-*.parquet").collect()
    assert frame.schema[CRITIC_COLUMN] == pl.Float32
    assert frame.schema[PROBE_COLUMN] == pl.Float32
    assert frame.schema[STAR_VALUES_COLUMN] == pl.List(pl.Float32)
    assert frame.schema[STAR_ENDS_COLUMN] == pl.List(pl.Int32)
    assert frame.schema["messages"] == pl.List(pl.Struct({"role": pl.String, "content": pl.String}))
    assert frame.to_dicts() == expected
    mean_critic = frame.select(pl.col(CRITIC_COLUMN).mean()).item()
    assert mean_critic == pytest.approx(np.mean([r[CRITIC_COLUMN] for r in expected]), rel=1e-6)

    # pandas, on the directory
    df = pd.read_parquet(tmp_path).sort_values("id").reset_index(drop=True)
    assert len(df) == 23
    assert df[CRITIC_COLUMN].dtype == np.float32
    assert df["turns"].dtype == np.int64
    assert df["is_attack"].dtype == bool
    assert df["id"].tolist() == [r["id"] for r in expected]
    assert [list(v) for v in df[STAR_VALUES_COLUMN]] == [r[STAR_VALUES_COLUMN] for r in expected]
    assert [list(v) for v in df[STAR_ENDS_COLUMN]] == [r[STAR_ENDS_COLUMN] for r in expected]
    assert df[STAR_VALUES_COLUMN][0].dtype == np.float32
    assert [list(v) for v in df["tags"]] == [r["tags"] for r in expected]
    assert [None if pd.isna(v) else int(v) for v in df["rating"]] == [r["rating"] for r in expected]
    assert df["messages"][5][1]["content"] == expected[5]["messages"][1]["content"]


def test_provenance_survives_in_file_metadata(tmp_path):
    provenance = make_provenance(extra={"guard_labels": ["safe", "unsafe"]})
    write_set(tmp_path, n_rows=5, rows_per_shard=5, provenance=provenance)
    path = tmp_path / shard_filename(0)

    kv = pq.read_metadata(path).metadata
    assert b"ARROW:schema" in kv  # pyarrow's own schema metadata is kept
    stored = json.loads(kv[METADATA_KEY])
    assert stored["schema_version"] == 1
    assert stored["shard_index"] == 0
    assert Provenance.from_dict(stored["provenance"]) == provenance
    assert stored["provenance"]["probe_layers"] == [2, 3]

    # the Arrow schema read back carries it too
    assert METADATA_KEY in pq.read_schema(path).metadata

    polars_kv = pl.read_parquet_metadata(path)
    assert json.loads(polars_kv["safekeel"]) == stored

    # and the manifest agrees
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert Provenance.from_dict(manifest["provenance"]) == provenance
    assert ShardReader(tmp_path).provenance == provenance


def test_files_are_zstd_with_row_groups_of_the_requested_size(tmp_path):
    schema = shard_schema(ORIGINAL_FIELDS, ALL_RISK)
    provenance = make_provenance()
    rows = [make_row(i) for i in range(10)]
    with ShardWriter(tmp_path, 0, schema, provenance, row_group_size=4) as w:
        # uneven pieces: the writer must regroup them, not write one group per call
        w.write_rows(rows[:3])
        w.write_rows(rows[3:5])
        w.write_rows(rows[5:10])
    meta = pq.read_metadata(tmp_path / shard_filename(0))
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [4, 4, 2]
    for c in range(meta.num_columns):
        assert meta.row_group(0).column(c).compression == "ZSTD"

    table = pa.Table.from_pylist(rows, schema=schema)
    with ShardWriter(tmp_path, 1, schema, provenance, row_group_size=3) as w:
        w.write_batch(table.to_batches()[0])
    meta = pq.read_metadata(tmp_path / shard_filename(1))
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [3, 3, 3, 1]

    many = [make_row(i) for i in range(5000)]
    with ShardWriter(tmp_path, 2, schema, provenance) as w:
        for start in range(0, 5000, 700):
            w.write_rows(many[start : start + 700])
    meta = pq.read_metadata(tmp_path / shard_filename(2))
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [2048, 2048, 904]
    assert w.info.num_rows == 5000
    assert (w.info.first_id, w.info.last_id) == ("ex-00000", "ex-04999")


def test_writer_accepts_batches_in_another_column_order(tmp_path):
    schema = shard_schema(ORIGINAL_FIELDS, ALL_RISK)
    rows = [make_row(i) for i in range(6)]
    table = pa.Table.from_pylist(rows, schema=schema)
    shuffled = table.select(list(reversed(table.column_names)))
    with ShardWriter(tmp_path, 0, schema, make_provenance()) as w:
        w.write_batch(shuffled)
    assert pq.read_table(tmp_path / shard_filename(0)).to_pylist() == [
        expected_row(i) for i in range(6)
    ]


# --------------------------------------------------------------------------- crash and resume


CRASHING_RUN = """
import importlib.util, os, sys

spec = importlib.util.spec_from_file_location("shard_test_rows", sys.argv[2])
rows = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rows)
from safekeel.data.shards import Manifest, ShardWriter, plan_shards, shard_schema

out = sys.argv[1]
provenance = rows.make_provenance()
schema = shard_schema(rows.ORIGINAL_FIELDS, rows.ALL_RISK)
manifest = Manifest.open(out, plan_shards(20, 10), provenance)
with ShardWriter(out, 0, schema, provenance) as w:
    w.write_rows([rows.make_row(i) for i in range(10)])
manifest.record(w.info)
w = ShardWriter(out, 1, schema, provenance, row_group_size=2)
w.write_rows([rows.make_row(i) for i in range(10, 15)])  # two row groups reach the disk
os._exit(1)  # the process dies: no close, no cleanup, no destructor
"""


def test_crash_mid_shard_leaves_no_finished_shard_and_rerun_redoes_it(tmp_path):
    out = tmp_path / "out"
    repo = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", CRASHING_RUN, str(out), __file__],
        check=False,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stderr

    assert (out / shard_filename(0)).exists()
    assert not (out / shard_filename(1)).exists()
    assert (out / ".shard-00001.parquet.tmp").stat().st_size > 0  # the partial file, hidden
    manifest = Manifest.load(out / MANIFEST_NAME)
    assert manifest.finished_indices() == {0}
    assert list(manifest.plan.pending(manifest.finished_indices())) == [1]
    # plain readers see only the finished shard
    assert pd.read_parquet(out)["id"].tolist() == [f"ex-{i:05d}" for i in range(10)]
    assert pl.read_parquet(out / "shard-*.parquet").height == 10
    with pytest.raises(ShardError, match=r"incomplete.*shard-00001\.parquet"):
        ShardReader(out)
    assert ShardReader(out, require_complete=False).num_rows == 10

    # the rerun writes only shard 1, and the set is whole with no row twice
    before = (out / shard_filename(0)).stat().st_mtime_ns
    write_set(out, n_rows=20, rows_per_shard=10)
    assert (out / shard_filename(0)).stat().st_mtime_ns == before
    reader = ShardReader(out, verify_hashes=True)
    assert [r["id"] for r in reader.iter_rows()] == [f"ex-{i:05d}" for i in range(20)]
    assert not list(out.glob(".*.tmp"))


def test_exception_inside_writer_discards_the_temporary_file(tmp_path):
    schema = shard_schema(ORIGINAL_FIELDS, ALL_RISK)
    with (
        pytest.raises(RuntimeError, match="annotator died"),
        ShardWriter(tmp_path, 0, schema, make_provenance()) as w,
    ):
        w.write_rows([make_row(0)])
        raise RuntimeError("annotator died")
    assert list(tmp_path.iterdir()) == []


def test_shard_renamed_but_not_recorded_is_ignored_then_rewritten(tmp_path):
    """A crash between the rename and the manifest update: the file exists, unlisted."""
    write_set(tmp_path, n_rows=20, rows_per_shard=10)
    manifest = Manifest.load(tmp_path / MANIFEST_NAME)
    del manifest.shards[1]
    manifest.save()

    with pytest.warns(UserWarning, match="shard-00001.parquet"):
        reader = ShardReader(tmp_path, require_complete=False)
    assert reader.num_rows == 10
    assert list(manifest.plan.pending(manifest.finished_indices())) == [1]

    write_set(tmp_path, n_rows=20, rows_per_shard=10)
    assert ShardReader(tmp_path, verify_hashes=True).num_rows == 20


def test_resume_refuses_a_manifest_from_another_configuration(tmp_path):
    write_set(tmp_path, n_rows=10, rows_per_shard=5)
    with pytest.raises(ManifestError, match="critic_model"):
        Manifest.open(tmp_path, plan_shards(10, 5), make_provenance(critic_model="other-guard"))
    with pytest.raises(ManifestError, match="plan"):
        Manifest.open(tmp_path, plan_shards(10, 4), make_provenance())


# --------------------------------------------------------------------------- plan + merge


@pytest.mark.parametrize("n_rows", [0, 1, 9, 10, 17, 100])
@pytest.mark.parametrize("rows_per_shard", [1, 3, 10])
@pytest.mark.parametrize("num_workers", [1, 2, 3, 5])
def test_plan_shards_is_disjoint_and_complete(n_rows, rows_per_shard, num_workers):
    owned = [list(plan_shards(n_rows, rows_per_shard, num_workers, i)) for i in range(num_workers)]
    all_indices = [k for part in owned for k in part]
    assert len(all_indices) == len(set(all_indices))  # disjoint
    assert sorted(all_indices) == list(range(math.ceil(n_rows / rows_per_shard)))  # complete
    rows = []
    for k in sorted(all_indices):
        start, stop = plan_shards(n_rows, rows_per_shard).row_range(k)
        assert start == k * rows_per_shard  # shard k is a fixed row range, whoever writes it
        rows.extend(range(start, stop))
    assert rows == list(range(n_rows))


def test_plan_with_unknown_length_and_bad_arguments():
    plan = plan_shards(None, 100, num_workers=3, worker_index=2)
    it = iter(plan)
    assert [next(it) for _ in range(4)] == [2, 5, 8, 11]
    assert plan.row_range(5) == (500, 600)
    assert plan.total_shards is None
    with pytest.raises(ValueError, match="worker_index"):
        plan_shards(10, 5, num_workers=2, worker_index=2)
    with pytest.raises(ValueError, match="rows_per_shard"):
        plan_shards(10, 0)


def test_worker_manifests_merge_into_one(tmp_path):
    for i in range(3):
        write_set(tmp_path, n_rows=47, rows_per_shard=5, num_workers=3, worker_index=i)
    names = sorted(p.name for p in tmp_path.glob("_manifest*"))
    assert names == [manifest_filename(3, i) for i in range(3)]

    # the reader merges per-worker manifests on the fly...
    reader = ShardReader(tmp_path)
    assert [r["id"] for r in reader.iter_rows()] == [f"ex-{i:05d}" for i in range(47)]
    # ...and merge_manifests writes the single manifest
    merged = merge_manifests(tmp_path, write=True)
    assert merged.finished_indices() == set(range(10))
    assert merged.num_rows == 47
    assert merged.missing_indices() == []
    assert Manifest.load(tmp_path / MANIFEST_NAME).finished_indices() == set(range(10))
    assert ShardReader(tmp_path / MANIFEST_NAME, verify_hashes=True).num_rows == 47


def _two_workers(tmp_path: Path) -> tuple[Manifest, Manifest]:
    return (
        write_set(tmp_path, n_rows=40, rows_per_shard=10, num_workers=2, worker_index=0),
        write_set(tmp_path, n_rows=40, rows_per_shard=10, num_workers=2, worker_index=1),
    )


def test_merge_refuses_a_shard_listed_twice(tmp_path):
    first, second = _two_workers(tmp_path)
    first.shards[1] = second.shards[1]
    first.save()
    with pytest.raises(ManifestError) as err:
        merge_manifests(tmp_path)
    message = str(err.value)
    assert "shard 1" in message
    assert manifest_filename(2, 0) in message and manifest_filename(2, 1) in message


def test_merge_refuses_a_shard_the_worker_does_not_own(tmp_path):
    first, second = _two_workers(tmp_path)
    first.shards[3] = second.shards.pop(3)
    first.save()
    second.save()
    with pytest.raises(ManifestError, match=r"_manifest\.worker-0-of-2\.json: lists shard 3"):
        merge_manifests(tmp_path)


def test_merge_refuses_different_provenance(tmp_path):
    write_set(tmp_path, n_rows=40, rows_per_shard=10, num_workers=2, worker_index=0)
    write_set(
        tmp_path,
        n_rows=40,
        rows_per_shard=10,
        num_workers=2,
        worker_index=1,
        provenance=make_provenance(config_hash="different"),
    )
    with pytest.raises(ManifestError) as err:
        merge_manifests(tmp_path)
    message = str(err.value)
    assert "config_hash" in message
    assert manifest_filename(2, 0) in message and manifest_filename(2, 1) in message


def test_merge_refuses_missing_or_mismatched_workers(tmp_path):
    write_set(tmp_path, n_rows=40, rows_per_shard=10, num_workers=2, worker_index=0)
    with pytest.raises(ManifestError, match=r"missing worker manifest.*worker-1-of-2"):
        merge_manifests(tmp_path)
    with pytest.raises(ManifestError, match=r"missing worker manifest.*worker-1-of-2"):
        ShardReader(tmp_path)
    other = tmp_path / "other"
    write_set(other, n_rows=40, rows_per_shard=10, num_workers=3, worker_index=1)
    (other / manifest_filename(3, 1)).rename(tmp_path / manifest_filename(3, 1))
    with pytest.raises(ManifestError, match="number of workers.*worker-0-of-2.*worker-1-of-3"):
        merge_manifests(tmp_path)


# --------------------------------------------------------------------------- reader refusals


def test_missing_column_names_shard_column_and_consumer(tmp_path):
    write_set(tmp_path, n_rows=10, rows_per_shard=5, risk={CRITIC_COLUMN})
    with pytest.raises(ShardError) as err:
        ShardReader(
            tmp_path,
            required_columns=(STAR_VALUES_COLUMN, STAR_ENDS_COLUMN),
            consumer="star_dss",
        )
    message = str(err.value)
    assert "shard-00000.parquet" in message
    assert f"column '{STAR_VALUES_COLUMN}' is missing" in message
    assert "star_dss needs star_v_safe" in message
    assert err.value.column == STAR_VALUES_COLUMN
    # the column it has is fine
    assert ShardReader(tmp_path, required_columns=(CRITIC_COLUMN,)).num_rows == 10


def _bad(i: int, **changes) -> list[dict]:
    """Eight good rows with row i changed."""
    rows = [make_row(j) for j in range(8)]
    rows[i].update(changes)
    return rows


REFUSALS = [
    # (rows, column, expected words); the bad row sits in the second batch of 4
    (_bad(5, **{CRITIC_COLUMN: float("nan")}), CRITIC_COLUMN, "NaN"),
    (_bad(5, **{CRITIC_COLUMN: None}), CRITIC_COLUMN, "null"),
    (_bad(5, **{PROBE_COLUMN: 1.5}), PROBE_COLUMN, "outside [0, 1]"),
    (_bad(5, **{PROBE_COLUMN: -0.25}), PROBE_COLUMN, "outside [0, 1]"),
    (
        _bad(5, **{STAR_VALUES_COLUMN: [0.5, 0.5], STAR_ENDS_COLUMN: [4]}),
        STAR_VALUES_COLUMN,
        "2 segment values but star_token_ends has 1",
    ),
    (
        _bad(5, **{STAR_VALUES_COLUMN: [0.5, 1.2], STAR_ENDS_COLUMN: [4, 8]}),
        STAR_VALUES_COLUMN,
        "outside",
    ),
    (
        _bad(5, **{STAR_VALUES_COLUMN: [float("nan")], STAR_ENDS_COLUMN: [4]}),
        STAR_VALUES_COLUMN,
        "NaN",
    ),
    (
        _bad(5, **{STAR_VALUES_COLUMN: [0.5, 0.5], STAR_ENDS_COLUMN: [8, 8]}),
        STAR_ENDS_COLUMN,
        "not strictly increasing",
    ),
    (
        _bad(5, **{STAR_VALUES_COLUMN: [0.5, 0.5], STAR_ENDS_COLUMN: [8, 4]}),
        STAR_ENDS_COLUMN,
        "not strictly increasing",
    ),
    (_bad(5, **{STAR_VALUES_COLUMN: [0.5], STAR_ENDS_COLUMN: [0]}), STAR_ENDS_COLUMN, "below 1"),
    (_bad(5, **{STAR_VALUES_COLUMN: [], STAR_ENDS_COLUMN: []}), STAR_ENDS_COLUMN, "empty"),
    (_bad(5, **{STAR_VALUES_COLUMN: None, STAR_ENDS_COLUMN: None}), STAR_ENDS_COLUMN, "null"),
]


@pytest.mark.parametrize(("rows", "column", "problem"), REFUSALS)
def test_reader_refuses_bad_values_naming_shard_column_and_row(tmp_path, rows, column, problem):
    write_bad_shard(tmp_path, rows)
    reader = ShardReader(tmp_path)  # metadata is fine: values are checked while streaming
    with pytest.raises(ShardError) as err:
        for _ in reader.iter_batches(batch_size=4):
            pass
    message = str(err.value)
    assert "shard-00000.parquet" in message
    assert f"column '{column}'" in message
    assert "row 5 (id 'ex-00005')" in message
    assert problem in message
    assert (err.value.row, err.value.row_id, err.value.column) == (5, "ex-00005", column)
    # the same shard is refused by the up-front check too, and by the writer's own check
    with pytest.raises(ShardError, match=column):
        reader.validate_values()
    schema = shard_schema(ORIGINAL_FIELDS, ALL_RISK)
    with (
        pytest.raises(ShardError, match="row 5"),
        ShardWriter(tmp_path / "w", 0, schema, make_provenance()) as w,
    ):
        w.write_rows([{c: v for c, v in r.items() if c in schema.names} for r in rows])


def test_bad_value_is_reported_with_its_id_even_when_id_is_not_read(tmp_path):
    write_bad_shard(tmp_path, _bad(6, **{CRITIC_COLUMN: 2.0}))
    reader = ShardReader(tmp_path)
    with pytest.raises(ShardError, match=r"row 6 \(id 'ex-00006'\).*outside"):
        list(reader.iter_batches(columns=[CRITIC_COLUMN], batch_size=3))
    # good columns of the same shard still stream, without the id they did not ask for
    batches = list(reader.iter_batches(columns=["source"], batch_size=3))
    assert all(b.schema.names == ["source"] for b in batches)


def test_tokenizer_fingerprint_mismatch_is_refused(tmp_path):
    write_set(tmp_path, n_rows=10, rows_per_shard=5)
    assert ShardReader(tmp_path, expected_tokenizer_fingerprint="f" * 64).num_rows == 10
    with pytest.raises(ShardError) as err:
        ShardReader(tmp_path, expected_tokenizer_fingerprint="0" * 64)
    message = str(err.value)
    assert "shard-00000.parquet" in message
    assert "policy_tokenizer_fingerprint" in message
    assert "tiny-policy" in message


def test_shard_from_another_run_is_refused(tmp_path):
    write_set(tmp_path, n_rows=10, rows_per_shard=5)
    other = tmp_path / "other"
    write_set(other, n_rows=10, rows_per_shard=5, provenance=make_provenance(critic_revision="r2"))
    (other / shard_filename(1)).replace(tmp_path / shard_filename(1))
    with pytest.raises(
        ShardError, match=r"shard-00001\.parquet: provenance differs.*critic_revision"
    ):
        ShardReader(tmp_path)


def test_empty_shard_sets_are_refused(tmp_path):
    with pytest.raises(ShardError, match="empty shard set"):
        ShardReader(tmp_path)
    with pytest.raises(ShardError, match="no such shard directory"):
        ShardReader(tmp_path / "nowhere")

    Manifest(plan_shards(None, 10), make_provenance()).save(tmp_path / MANIFEST_NAME)
    with pytest.raises(ShardError, match="empty shard set"):
        ShardReader(tmp_path)

    stray = tmp_path / "stray"
    write_set(stray, n_rows=5, rows_per_shard=5)
    (stray / MANIFEST_NAME).unlink()
    with pytest.raises(ShardError, match="no manifest"):
        ShardReader(stray)


def test_hash_mismatch_is_refused_when_asked(tmp_path):
    write_set(tmp_path, n_rows=10, rows_per_shard=5)
    # replace shard 1 by one with the same rows count but one changed score
    schema = shard_schema(ORIGINAL_FIELDS, ALL_RISK)
    rows = [make_row(i) for i in range(5, 10)]
    rows[2][CRITIC_COLUMN] = 0.123
    with ShardWriter(tmp_path, 1, schema, make_provenance()) as w:
        w.write_rows(rows)

    assert ShardReader(tmp_path).num_rows == 10  # footers alone cannot tell
    with pytest.raises(ShardError, match=r"shard-00001\.parquet: sha256 .* does not match"):
        ShardReader(tmp_path, verify_hashes=True)


def test_listed_shard_missing_or_truncated_is_refused(tmp_path):
    write_set(tmp_path, n_rows=10, rows_per_shard=5)
    path = tmp_path / shard_filename(1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardError, match=r"shard-00001\.parquet: not a readable Parquet file"):
        ShardReader(tmp_path)
    path.unlink()
    with pytest.raises(
        ShardError, match=r"shard-00001\.parquet: listed in the manifest but missing"
    ):
        ShardReader(tmp_path)


def test_shard_without_provenance_or_with_wrong_types_is_refused(tmp_path):
    write_set(tmp_path, n_rows=10, rows_per_shard=5)
    path = tmp_path / shard_filename(1)
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata(None), path)
    manifest = Manifest.load(tmp_path / MANIFEST_NAME)
    with pytest.raises(ShardError, match=r"shard-00001\.parquet: no provenance"):
        ShardReader(tmp_path)

    # a score stored as float64 is not the contract's float32
    retyped = table.set_column(
        table.schema.get_field_index(CRITIC_COLUMN),
        pa.field(CRITIC_COLUMN, pa.float64()),
        table.column(CRITIC_COLUMN).cast(pa.float64()),
    )
    pq.write_table(retyped.replace_schema_metadata(table.schema.metadata), path)
    assert manifest.shards[1].num_rows == 5
    with pytest.raises(
        ShardError, match=r"shard-00001\.parquet: column 'critic_p_unsafe' has type double"
    ):
        ShardReader(tmp_path)


def test_shards_with_different_columns_are_refused(tmp_path):
    write_set(tmp_path, n_rows=10, rows_per_shard=5)
    other = tmp_path / "other"
    write_set(other, n_rows=10, rows_per_shard=5, risk={CRITIC_COLUMN, PROBE_COLUMN})
    (other / shard_filename(1)).replace(tmp_path / shard_filename(1))
    with pytest.raises(ShardError, match=r"shard-00001\.parquet: schema differs from shard-00000"):
        ShardReader(tmp_path)


# --------------------------------------------------------------------------- writer refusals


def test_schema_and_writer_refusals(tmp_path):
    with pytest.raises(ShardError, match="unknown risk column 'critic_score'"):
        shard_schema([], {"critic_score"})
    with pytest.raises(ShardError, match="go together"):
        shard_schema([], {STAR_VALUES_COLUMN})
    with pytest.raises(ShardError, match="original column 'messages' collides"):
        shard_schema([pa.field("messages", pa.string())], set())

    schema = shard_schema([], {STAR_VALUES_COLUMN, STAR_ENDS_COLUMN})
    with pytest.raises(ShardError, match="policy_tokenizer_fingerprint"):
        ShardWriter(tmp_path, 0, schema, Provenance(critic_model="g", star_segment_size=4))
    assert list(tmp_path.iterdir()) == []

    schema = shard_schema([], {CRITIC_COLUMN})
    with ShardWriter(tmp_path, 0, schema, Provenance(critic_model="g")) as w:
        with pytest.raises(ShardError, match=r"row 1 has column\(s\) \['critic_p_unsafee'\]"):
            w.write_rows(
                [
                    {"id": "a", "messages": [], CRITIC_COLUMN: 0.5},
                    {"id": "b", "messages": [], "critic_p_unsafee": 0.5},
                ]
            )
        with pytest.raises(ShardError, match=r"missing \['critic_p_unsafe'\]"):
            w.write_batch(
                pa.table({"id": ["a"], "messages": pa.array([[]], pa.list_(MESSAGE_TYPE))})
            )
        with pytest.raises(ShardError, match=r"column 'id', row 0: is null"):
            w.write_rows([{"id": None, "messages": [], CRITIC_COLUMN: 0.5}])
    # nothing valid was written, but the shard is finished (and empty)
    assert w.info.num_rows == 0


def test_provenance_from_dict_refuses_unknown_or_mistyped_fields():
    with pytest.raises(ShardError, match="unknown provenance field 'critic'"):
        Provenance.from_dict({"critic": "x"})
    with pytest.raises(ShardError, match="star_segment_size"):
        Provenance.from_dict({"star_segment_size": 0})
    with pytest.raises(ShardError, match="probe_layers"):
        Provenance.from_dict({"probe_layers": ["12"]})
    assert Provenance(probe_layers=(1, 2)) == Provenance.from_dict({"probe_layers": [1, 2]})


# --------------------------------------------------------------------------- streaming


def test_large_shard_streams_in_bounded_batches(tmp_path):
    n = 200_000
    provenance = make_provenance()
    schema = shard_schema([], {CRITIC_COLUMN})
    roles = pa.array(["user", "assistant"] * n)
    contents = pa.array([f"q{i}" if j == 0 else "ok" for i in range(n) for j in range(2)])
    messages = pa.ListArray.from_arrays(
        pa.array(np.arange(0, 2 * n + 1, 2, dtype=np.int32)),
        pa.StructArray.from_arrays([roles, contents], fields=list(MESSAGE_TYPE)),
    )
    scores = (np.arange(n) % 1000 / 999).astype(np.float32)
    table = pa.table(
        {
            "id": pa.array([f"r{i:06d}" for i in range(n)]),
            "messages": messages,
            CRITIC_COLUMN: scores,
        }
    )
    with ShardWriter(tmp_path, 0, schema, provenance) as w:
        for batch in table.to_batches(max_chunksize=30_000):
            w.write_batch(batch)
    Manifest(plan_shards(n, n), provenance, [w.info]).save(tmp_path / MANIFEST_NAME)
    del table, messages

    reader = ShardReader(tmp_path)
    assert reader.num_rows == n
    groups = reader.row_groups()
    assert len(groups) == math.ceil(n / 2048)
    assert all(g.num_rows <= 2048 for g in groups)

    seen = 0
    total = 0.0
    for batch in reader.iter_batches(batch_size=1000):
        assert batch.num_rows <= 1000
        ids = batch.column("id")
        assert ids[0].as_py() == f"r{seen:06d}"  # in order, nothing skipped or repeated
        seen += batch.num_rows
        total += float(np.sum(batch.column(CRITIC_COLUMN).to_numpy(), dtype=np.float64))
    assert seen == n
    assert total == pytest.approx(float(np.sum(scores, dtype=np.float64)), rel=1e-9)


def test_row_groups_split_across_ranks_cover_every_row_once(tmp_path):
    write_set(tmp_path, n_rows=50, rows_per_shard=20, row_group_size=6)
    reader = ShardReader(tmp_path)
    groups = reader.row_groups()
    world = 3
    seen: list[str] = []
    for rank in range(world):
        for ref in groups[rank::world]:
            table = reader.read_row_group(ref, columns=["id", CRITIC_COLUMN])
            assert table.num_rows == ref.num_rows
            seen.extend(table.column("id").to_pylist())
    assert sorted(seen) == [f"ex-{i:05d}" for i in range(50)]
    assert len(seen) == len(set(seen))
    only_second = [r["id"] for r in reader.iter_rows()][20:40]
    assert [
        i
        for b in reader.iter_batches(columns=["id"], shard_indices=[1])
        for i in b["id"].to_pylist()
    ] == only_second


def test_single_shard_file_can_be_read_alone(tmp_path):
    write_set(tmp_path, n_rows=12, rows_per_shard=6)
    reader = ShardReader(tmp_path / shard_filename(1), required_columns=(CRITIC_COLUMN,))
    assert [r["id"] for r in reader.iter_rows()] == [f"ex-{i:05d}" for i in range(6, 12)]
    assert reader.provenance == make_provenance()


# --------------------------------------------------------------------------- tokenizer fingerprint


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(words=("hello", "world", "how", "are", "you"), **kwargs):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {token: i for i, token in enumerate([*specials, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    options = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "chat_template": CHAT_TEMPLATE,
    }
    options.update(kwargs)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **options)


def test_tokenizer_fingerprint_is_stable_across_save_and_load(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = build_tokenizer()
    fingerprint = tokenizer_fingerprint(tokenizer)
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0

    tokenizer.save_pretrained(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert tokenizer_fingerprint(reloaded) == fingerprint
    assert tokenizer_fingerprint(build_tokenizer()) == fingerprint  # built again, same result

    # padding side is a runtime setting, not part of how text becomes ids
    reloaded.padding_side = "left"
    assert tokenizer_fingerprint(reloaded) == fingerprint


def test_tokenizer_fingerprint_changes_with_vocab_specials_or_template():
    base = tokenizer_fingerprint(build_tokenizer())
    assert tokenizer_fingerprint(build_tokenizer(words=("hello", "world", "how", "are"))) != base
    # same tokens, different ids
    assert (
        tokenizer_fingerprint(build_tokenizer(words=("world", "hello", "how", "are", "you")))
        != base
    )
    assert tokenizer_fingerprint(build_tokenizer(eos_token="<pad>")) != base
    assert tokenizer_fingerprint(build_tokenizer(chat_template=CHAT_TEMPLATE + " ")) != base
    added = build_tokenizer()
    added.add_tokens(["<|tool|>"], special_tokens=True)
    assert tokenizer_fingerprint(added) != base


def test_schema_check_tolerates_large_types_but_not_other_numbers():
    """Arrow writers that use 64-bit offsets (polars) give large_string / large_list: same data."""
    large = pa.schema(
        [
            pa.field("id", pa.large_string()),
            pa.field(
                "messages",
                pa.large_list(
                    pa.struct([pa.field("role", pa.large_string()), ("content", pa.string())])
                ),
            ),
            pa.field(STAR_VALUES_COLUMN, pa.large_list(pa.float32())),
            pa.field(STAR_ENDS_COLUMN, pa.list_(pa.int32())),
        ]
    )
    check_shard_schema(large, "shard-00000.parquet")
    wrong_ends = large.set(3, pa.field(STAR_ENDS_COLUMN, pa.list_(pa.int64())))
    with pytest.raises(ShardError, match="'star_token_ends' has type list<item: int64>"):
        check_shard_schema(wrong_ends, "shard-00000.parquet")
    swapped = large.set(
        1,
        pa.field(
            "messages", pa.list_(pa.struct([("content", pa.string()), ("role", pa.string())]))
        ),
    )
    with pytest.raises(ShardError, match="'messages' has type"):
        check_shard_schema(swapped, "shard-00000.parquet")
    with pytest.raises(ShardError, match="column 'id' is missing"):
        check_shard_schema(pa.schema([pa.field("messages", pa.string())]), "x.parquet")


def test_resume_accepts_provenance_set_with_tuples(tmp_path):
    """Annotators may fill provenance fields after construction; JSON turns tuples into lists."""
    provenance = make_provenance()
    provenance.probe_layers = (2, 3)  # set as an annotator would, bypassing __post_init__
    provenance.extra = {"labels": ("safe", "unsafe")}
    write_set(tmp_path, n_rows=10, rows_per_shard=5, provenance=provenance)

    again = make_provenance()
    again.probe_layers = (2, 3)
    again.extra = {"labels": ("safe", "unsafe")}
    assert Manifest.open(tmp_path, plan_shards(10, 5), again).finished_indices() == {0, 1}
    assert ShardReader(tmp_path).provenance.extra == {"labels": ["safe", "unsafe"]}
    again.extra = {"labels": ("unsafe", "safe")}
    with pytest.raises(ManifestError, match="extra"):
        Manifest.open(tmp_path, plan_shards(10, 5), again)
