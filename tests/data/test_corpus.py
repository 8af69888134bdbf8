"""Corpus loading: every input shape, stable ids, and refusals that name file, row and field."""

import csv
import json
from pathlib import Path

import pytest

from safekeel.data.config import from_dict
from safekeel.data.corpus import (
    CorpusConfig,
    CorpusError,
    LoadReport,
    SeenIds,
    iter_examples,
    load_examples,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def corpus(path, **kw) -> CorpusConfig:
    return from_dict(CorpusConfig, {"path": str(path), **kw})


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


CHAT = [
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Add 2 and 3."},
                  {"role": "assistant", "content": "5"}], "source": "a"},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                  {"role": "user", "content": "Name a colour"},
                  {"role": "assistant", "content": "Blue"}], "source": "b"},
]


def test_chat_messages_jsonl_keeps_original_columns(tmp_path):
    examples = load_examples(corpus(write_jsonl(tmp_path / "c.jsonl", CHAT)))
    assert [e["messages"] for e in examples] == [r["messages"] for r in CHAT]
    assert [e["source"] for e in examples] == ["a", "b"]
    assert all(isinstance(e["id"], str) and len(e["id"]) == 20 for e in examples)


def test_sharegpt_json(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps([{"conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]}]))
    [example] = load_examples(corpus(path))
    assert example["messages"] == [{"role": "user", "content": "q"},
                                   {"role": "assistant", "content": "r"}]


def test_prompt_response_csv_with_system(tmp_path):
    path = tmp_path / "p.csv"
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, ["prompt", "response", "system"])
        writer.writeheader()
        writer.writerow({"prompt": "p1", "response": "r1", "system": "s"})
        writer.writerow({"prompt": "p2", "response": "r2", "system": ""})
    first, second = load_examples(corpus(path))
    assert first["messages"][0] == {"role": "system", "content": "s"}
    assert second["messages"] == [{"role": "user", "content": "p2"},
                                  {"role": "assistant", "content": "r2"}]


def test_alpaca_instruction_shape_from_shared_data():
    path = SHARED / "alpaca" / "alpaca_en_demo_llamafactory.json"
    if not path.exists():
        pytest.skip("shared data not present")
    raw = json.loads(path.read_text())
    examples = load_examples(corpus(path, max_rows=50))
    assert len(examples) == 50
    for row, example in zip(raw, examples):
        user, assistant = example["messages"]
        expected = row["instruction"] + (f"\n\n{row['input']}" if row["input"].strip() else "")
        assert user["content"] == expected and assistant["content"] == row["output"]
        assert example["instruction"] == row["instruction"]  # originals carried through


def test_goal_target_shape_from_advbench_prompt_only_and_full():
    path = SHARED / "advbench" / "harmful_behaviors.csv"
    if not path.exists():
        pytest.skip("shared data not present")
    full = load_examples(corpus(path))
    assert len(full) == 520
    assert full[0]["messages"][1]["role"] == "assistant"
    prompts = load_examples(corpus(path, require_response=False, shape="columns",
                                   columns={"prompt": "goal"}))
    assert [p["messages"][-1]["role"] for p in prompts] == ["user"] * 520
    assert prompts[0]["messages"][0]["content"] == full[0]["messages"][0]["content"]


def test_user_named_columns_parquet_with_id(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"uid": [10, 11], "question": ["q1", "q2"], "answer": ["a1", "a2"],
                             "score": [0.5, 0.7]}), path)
    examples = load_examples(corpus(path, shape="columns",
                                    columns={"prompt": "question", "response": "answer",
                                             "id": "uid"}))
    assert [e["id"] for e in examples] == ["10", "11"]
    assert [e["score"] for e in examples] == [0.5, 0.7]


def test_hub_style_dataset_directory(tmp_path):
    """A directory laid out like a hub dataset repo goes through load_dataset like a hub name."""
    import datasets

    repo = tmp_path / "owner_dataset"
    (repo / "data").mkdir(parents=True)
    rows = {"prompt": [f"p{i}" for i in range(6)], "completion": [f"c{i}" for i in range(6)]}
    datasets.Dataset.from_dict(rows).to_parquet(str(repo / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_dict({"prompt": ["t"], "completion": ["u"]}).to_parquet(
        str(repo / "data" / "test-00000-of-00001.parquet"))
    train = load_examples(corpus(repo))
    assert [e["messages"][1]["content"] for e in train] == rows["completion"]
    test = load_examples(corpus(repo, split="test"))
    assert test[0]["messages"][0]["content"] == "t"


def test_glob_reads_files_in_order_and_max_rows(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p3", "response": "r3"}])
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"p{i}", "response": "r"} for i in range(3)])
    examples = load_examples(corpus(tmp_path / "*.jsonl"))
    assert [e["messages"][0]["content"] for e in examples] == ["p0", "p1", "p2", "p3"]
    assert len(load_examples(corpus(tmp_path / "*.jsonl", max_rows=2))) == 2


def test_ids_are_stable_unique_and_independent_of_worker_split(tmp_path):
    rows = [{"prompt": "same", "response": "x"}, {"prompt": "other", "response": "y"},
            {"prompt": "same", "response": "x"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ids = [e["id"] for e in load_examples(corpus(path))]
    assert ids == [e["id"] for e in load_examples(corpus(path))]  # stable
    assert len(set(ids)) == 3 and ids[2] == ids[0] + "-2"
    odd = [e["id"] for e in iter_examples(corpus(path), row_filter=lambda i: i % 2 == 1)]
    even = [e["id"] for e in iter_examples(corpus(path), row_filter=lambda i: i % 2 == 0)]
    assert even == [ids[0], ids[2]] and odd == [ids[1]]


BAD_ROWS = [
    ({"prompt": "p"}, "field 'response'", "missing"),
    ({"prompt": 5, "response": "r"}, "field 'prompt'", "not a string"),
    ({"prompt": "p", "response": "  "}, "field 'messages[1].content'", "empty response"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "u"}]},
     "field 'messages[0].role'", "roles out of order"),
    ({"messages": [{"role": "user", "content": "u"}]}, "field 'messages'", "no response"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "bot", "content": "a"}]},
     "field 'messages[1].role'", "unknown role"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": None}]},
     "field 'messages[1].content'", "not a string"),
]


@pytest.mark.parametrize("bad, field, reason", BAD_ROWS)
def test_bad_row_is_named_by_file_row_and_field(tmp_path, bad, field, reason):
    good = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    if "prompt" in bad:
        good = {"prompt": "u", "response": "a"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good | {"x": 1}, bad])
    with pytest.raises(CorpusError) as err:
        load_examples(corpus(path))
    message = str(err.value)
    assert str(path) in message and "row 2" in message and field in message
    assert reason in message


def test_skip_mode_counts_by_reason_and_keeps_the_rest(tmp_path):
    rows = [{"prompt": "a", "response": "b"}, {"prompt": "c"}, {"prompt": 1, "response": "x"},
            {"prompt": "d", "response": ""}, {"prompt": "e", "response": "f"}, {"prompt": "g"}]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    report = LoadReport()
    kept = load_examples(corpus(path, on_bad_row="skip"), report)
    assert [e["messages"][0]["content"] for e in kept] == ["a", "e"]
    summary = report.to_dict()
    assert summary["rows_read"] == 6 and summary["rows_kept"] == 2
    assert summary["skipped_by_reason"] == {"missing": 2, "not a string": 1, "empty response": 1}
    assert any("row 1" in line and "'response'" in line for line in summary["skip_examples"])


def test_duplicate_source_ids_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "i.jsonl", [{"id": "x", "prompt": "a", "response": "b"},
                                              {"id": "x", "prompt": "c", "response": "d"}])
    with pytest.raises(CorpusError, match=r"row 1, field 'id': duplicate id: 'x' was first seen"):
        load_examples(corpus(path))


def test_a_duplicate_id_names_where_it_first_appeared_across_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"id": f"r{i}", "prompt": "p", "response": "q"}
                                       for i in range(5)])
    write_jsonl(tmp_path / "b.jsonl", [{"id": "new", "prompt": "p", "response": "q"},
                                       {"id": "r3", "prompt": "p", "response": "q"}])
    with pytest.raises(CorpusError, match=r"b.jsonl, row 1, field 'id': duplicate id: 'r3' "
                                          r"was first seen at .*a.jsonl, row 3"):
        load_examples(corpus(tmp_path / "*.jsonl"))


def test_seen_ids_answer_the_same_before_and_after_merging():
    import random

    rng = random.Random(0)
    digests = list({rng.getrandbits(64) for _ in range(50)})
    seen = SeenIds(merge_every=7)  # several merges, and some entries still unmerged
    for row, digest in enumerate(digests):
        assert seen.row_of(digest) is None
        seen.add(digest, row)
    assert len(seen) == len(digests) == 50
    assert [seen.row_of(d) for d in digests] == list(range(50))
    assert seen.row_of(2**64 - 1) is None and seen.row_of(0) is None


def test_file_level_errors(tmp_path):
    with pytest.raises(CorpusError, match="missing.jsonl: file not found"):
        load_examples(corpus(tmp_path / "missing.jsonl"))
    (tmp_path / "x.xlsx").write_text("nope")
    with pytest.raises(CorpusError, match=r"unknown file format '.xlsx'"):
        load_examples(corpus(tmp_path / "x.xlsx"))
    with pytest.raises(CorpusError, match="no file matches"):
        load_examples(corpus(tmp_path / "*.parquet"))
    with pytest.raises(CorpusError, match="no corpus path"):
        load_examples(CorpusConfig())


def test_non_utf8_and_broken_json_name_the_row(tmp_path):
    path = tmp_path / "enc.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    with pytest.raises(CorpusError, match=r"enc.jsonl, row 1: not valid UTF-8"):
        load_examples(corpus(path))
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"\n')
    with pytest.raises(CorpusError, match=r"broken.jsonl, row 1: invalid JSON"):
        load_examples(corpus(path))


def test_unknown_shape_is_explained(tmp_path):
    path = write_jsonl(tmp_path / "u.jsonl", [{"foo": "a", "bar": "b"}])
    with pytest.raises(CorpusError, match="cannot tell the shape from columns bar, foo"):
        load_examples(corpus(path))


# --------------------------------------------------------------------------- bad input (issue 11)
# Each defect through every reader: the same message, the right row, nothing valid lost.

def _chat(content):
    return {"messages": [{"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": content}]}


def _write_empty(tmp_path, fmt):
    """An empty corpus in format `fmt`, and the path to give as corpus.path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt == "jsonl":
        path = tmp_path / "empty.jsonl"
        path.write_text("")
    elif fmt == "json":
        path = tmp_path / "empty.json"
        path.write_text("[]")
    elif fmt == "csv":
        path = tmp_path / "empty.csv"
        path.write_text("prompt,response\n")
    elif fmt == "parquet":
        path = tmp_path / "empty.parquet"
        pq.write_table(pa.table({"prompt": pa.array([], pa.string()),
                                 "response": pa.array([], pa.string())}), path)
    else:  # a hub-style dataset directory whose one data file is empty
        (tmp_path / "repo" / "data").mkdir(parents=True)
        (tmp_path / "repo" / "data" / "train-00000-of-00001.jsonl").write_text("")
        return tmp_path / "repo", tmp_path / "repo" / "data" / "train-00000-of-00001.jsonl"
    return path, path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "hub_dir"])
def test_an_empty_corpus_is_one_error_naming_the_file(tmp_path, fmt):
    from safekeel.data.corpus import count_rows

    path, named = _write_empty(tmp_path, fmt)
    for read in (load_examples, count_rows):
        with pytest.raises(CorpusError) as err:
            read(corpus(path))
        assert str(named) in str(err.value) and "no rows" in str(err.value)


def _write_typed_mix(tmp_path, fmt):
    """Row 0 valid (the response is the string "4"), row 1 and 2 bad, row 3 valid."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if fmt in ("jsonl", "json", "hub_dir"):
        rows = [_chat("4"), _chat(5), _chat(None), _chat("6")]
        if fmt == "json":
            path = tmp_path / "mix.json"
            path.write_text(json.dumps(rows))
            return path, path, "not a string"
        folder = tmp_path / "repo" / "data" if fmt == "hub_dir" else tmp_path
        folder.mkdir(parents=True, exist_ok=True)
        path = write_jsonl(folder / ("train-00000-of-00001.jsonl" if fmt == "hub_dir"
                                     else "mix.jsonl"), rows)
        return (tmp_path / "repo" if fmt == "hub_dir" else path), path, "not a string"
    if fmt == "csv":
        # CSV holds text only: a number-like cell stays text, an empty cell is missing
        path = tmp_path / "mix.csv"
        path.write_text('prompt,response\n2+2?,4\n2+3?,\n2+4?,\n2+5?,6\n')
        return path, path, "missing"
    path = tmp_path / "mix.parquet"  # a Parquet column has one type: nulls are the defect
    pq.write_table(pa.table({"prompt": ["2+2?"] * 4, "response": ["4", None, None, "6"]}), path)
    return path, path, "missing"


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "hub_dir"])
def test_values_reach_validation_as_the_file_holds_them(tmp_path, fmt):
    path, named, reason = _write_typed_mix(tmp_path, fmt)
    with pytest.raises(CorpusError) as err:
        load_examples(corpus(path))
    message = str(err.value)
    assert message.startswith(f"{named}, row 1, field '") and reason in message
    report = LoadReport()
    kept = load_examples(corpus(path, on_bad_row="skip"), report)
    assert [e["messages"][-1]["content"] for e in kept] == ["4", "6"]
    assert report.to_dict()["rows_skipped"] == 2 and report.rows_kept == 2


def test_csv_cells_are_text_as_written(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('id,prompt,response\n007,NA,null\n8,None,1e3\n')
    first, second = load_examples(corpus(path))
    assert first["id"] == "007" and first["messages"][0]["content"] == "NA"
    assert first["messages"][1]["content"] == "null" and second["messages"][1]["content"] == "1e3"


def test_unparsable_and_non_object_lines_are_bad_rows_that_skip_counts(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": \n[1, 2]\n'
                     b'{"prompt": "caf\xe9", "response": "x"}\n\n{"prompt": "c", "response": "d"}\n')
    with pytest.raises(CorpusError, match=r"m.jsonl, row 1: invalid JSON"):
        load_examples(corpus(path))
    report = LoadReport()
    kept = load_examples(corpus(path, on_bad_row="skip"), report)
    assert [e["messages"][0]["content"] for e in kept] == ["a", "c"]
    assert report.to_dict()["skipped_by_reason"] == {
        "invalid JSON": 1, "not an object": 1, "not valid UTF-8": 1}
