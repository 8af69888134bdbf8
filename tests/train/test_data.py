"""The training stream: rank split, seeded shuffles, tokenisation issues, padding, STAR tokens."""

from collections import Counter
from pathlib import Path

import pytest
import torch

from safekeel.data.shards import (
    CRITIC_COLUMN,
    MANIFEST_NAME,
    PROBE_COLUMN,
    STAR_ENDS_COLUMN,
    STAR_VALUES_COLUMN,
    Manifest,
    Provenance,
    ShardReader,
    ShardWriter,
    plan_shards,
    shard_schema,
    tokenizer_fingerprint,
)
from safekeel.data.tokenization import IGNORE_INDEX, TokenizationConfig, tokenize_example
from safekeel.train.data import TrainingExample, TrainingStream, collate, shuffle_buffer

ALL_RISK = (CRITIC_COLUMN, PROBE_COLUMN, STAR_VALUES_COLUMN, STAR_ENDS_COLUMN)


def make_rows(n: int, long_prompt_ids: frozenset[int] = frozenset()) -> list[dict]:
    rows = []
    for i in range(n):
        prompt = "What is the capital of France? " * (40 if i in long_prompt_ids else 1)
        rows.append({
            "id": f"ex-{i:03d}",
            "messages": [{"role": "user", "content": f"{prompt} number {i}"},
                         {"role": "assistant", "content": f"The answer is {i}. Paris."}],
            CRITIC_COLUMN: (i % 10) / 10,
            PROBE_COLUMN: ((i * 3) % 10) / 10,
            STAR_VALUES_COLUMN: [0.9, 0.2],
            STAR_ENDS_COLUMN: [2, 4],
        })
    return rows


def write_shards(directory: Path, rows: list[dict], tokenizer, *, rows_per_shard: int = 5,
                 row_group_size: int = 2, risk=ALL_RISK) -> Path:
    provenance = Provenance(
        policy_tokenizer="tiny", policy_tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        critic_model="guard", probe_file_sha256="0" * 64, probe_layers=[1], star_segment_size=2)
    schema = shard_schema([], risk)
    plan = plan_shards(len(rows), rows_per_shard)
    infos = []
    for k in plan:
        start, stop = plan.row_range(k)
        with ShardWriter(directory, k, schema, provenance, row_group_size=row_group_size) as w:
            w.write_rows([{c: v for c, v in r.items() if c in schema.names}
                          for r in rows[start:stop]])
        infos.append(w.info)
    Manifest(plan, provenance, infos).save(directory / MANIFEST_NAME)
    return directory


def stream(reader, tokenizer, **kw) -> TrainingStream:
    options = {"tokenization": TokenizationConfig(max_length=128), "batch_size": 3,
               "risk_columns": ALL_RISK, "buffer_size": 4, **kw}
    return TrainingStream(reader, tokenizer, **options)


def ids_of(s: TrainingStream, epoch: int) -> list[str]:
    return [i for batch in s.iter_batches(epoch) for i in batch.ids if i]


@pytest.fixture()
def reader(tmp_path, tiny_tokenizer):
    # 23 rows in 5 shards of <= 5 rows, row groups of <= 2: 14 row groups of unequal sizes.
    return ShardReader(write_shards(tmp_path, make_rows(23), tiny_tokenizer))


def test_two_ranks_together_see_every_row_once_per_epoch(reader, tiny_tokenizer):
    every = {f"ex-{i:03d}" for i in range(23)}
    for epoch in range(3):
        seen = [ids_of(stream(reader, tiny_tokenizer, rank=r, world_size=2), epoch)
                for r in range(2)]
        assert not set(seen[0]) & set(seen[1])
        assert Counter(seen[0] + seen[1]) == Counter(every)


def test_ranks_yield_the_same_number_of_batches(reader, tiny_tokenizer):
    # 14 row groups (shards of 5 rows split 2+2+1, the last of 3 rows 2+1) of unequal
    # sizes: the rank with more rows decides, and the other tops up with empty batches.
    for epoch in range(3):
        streams = [stream(reader, tiny_tokenizer, rank=r, world_size=2) for r in range(2)]
        batches = [list(s.iter_batches(epoch)) for s in streams]
        rows = [sum(1 for b in bs for i in b.ids if i) for bs in batches]
        assert sum(rows) == 23
        assert [len(bs) for bs in batches] == [-(-max(rows) // 3)] * 2
        fillers = [sum(b.is_empty for b in bs) for bs in batches]
        assert min(fillers) == 0


def test_orders_depend_on_seed_and_epoch_only(reader, tiny_tokenizer):
    first = ids_of(stream(reader, tiny_tokenizer, seed=5), 0)
    assert ids_of(stream(reader, tiny_tokenizer, seed=5), 0) == first
    assert ids_of(stream(reader, tiny_tokenizer, seed=5), 1) != first
    assert ids_of(stream(reader, tiny_tokenizer, seed=6), 0) != first
    assert sorted(first) == sorted(ids_of(stream(reader, tiny_tokenizer, seed=5), 1))


def test_shuffle_buffer_yields_every_item_once():
    import numpy as np

    items = list(range(50))
    out = list(shuffle_buffer(items, 7, np.random.default_rng(0)))
    assert sorted(out) == items and out != items


def test_tokenisation_issues_are_counted_and_rows_skipped(tmp_path, tiny_tokenizer):
    long = frozenset({1, 4, 9})
    reader = ShardReader(write_shards(tmp_path, make_rows(12, long), tiny_tokenizer))
    s = stream(reader, tiny_tokenizer)
    seen = ids_of(s, 0)
    assert sorted(seen) == [f"ex-{i:03d}" for i in range(12) if i not in long]
    assert s.issues == Counter({"prompt_too_long": 3})


def test_batch_matches_independent_tokenisation(tmp_path, tiny_tokenizer):
    rows = make_rows(6)
    reader = ShardReader(write_shards(tmp_path, rows, tiny_tokenizer))
    cfg = TokenizationConfig(max_length=128)
    by_id = {r["id"]: r for r in rows}
    for batch in stream(reader, tiny_tokenizer).iter_batches(0):
        for i, example_id in enumerate(batch.ids):
            expected = tokenize_example(tiny_tokenizer, by_id[example_id]["messages"], cfg)
            n = len(expected.input_ids)
            assert batch.input_ids[i, :n].tolist() == expected.input_ids
            assert batch.attention_mask[i].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
            assert batch.labels[i, :n].tolist() == expected.labels
            # the logit at t predicts token t+1: the mask is the shifted label mask
            shifted = [label != IGNORE_INDEX for label in expected.labels[1:]]
            assert batch.response_mask[i, : n - 1].tolist() == shifted
            assert not batch.response_mask[i, n - 1:].any()
            assert batch.critic_p_unsafe[i].item() == pytest.approx(by_id[example_id][CRITIC_COLUMN])
            assert batch.probe_p_harmful[i].item() == pytest.approx(by_id[example_id][PROBE_COLUMN])
            # STAR ends [2, 4] with values [0.9, 0.2]: tokens 0-1 get 0.9, tokens 2.. get 0.2
            star = batch.star_v_safe_tokens[i][batch.response_mask[i]]
            k = expected.response_tokens
            want = torch.tensor([0.9, 0.9] + [0.2] * (k - 2))
            assert torch.allclose(star, want)


def test_collate_right_pads():
    a = TrainingExample("a", [5, 6, 7, 8], [IGNORE_INDEX, IGNORE_INDEX, 7, 8], 0.5, None)
    b = TrainingExample("b", [5, 9], [IGNORE_INDEX, 9], 0.1, None)
    batch = collate([a, b], pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [5, 9, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.response_mask.tolist() == [[False, True, True], [True, False, False]]
    assert batch.target_ids[batch.response_mask].tolist() == [7, 8, 9]
    assert batch.probe_p_harmful is None and batch.star_v_safe_tokens is None
    assert batch.num_response_tokens == 3


def test_empty_batch_has_no_response_tokens(reader, tiny_tokenizer):
    filler = stream(reader, tiny_tokenizer).empty_batch()
    assert filler.is_empty and filler.ids == [""]
    assert filler.star_v_safe_tokens is not None and not filler.star_v_safe_tokens.any()


# --------------------------------------------------------------------------- length grouping


def padded_and_real(batches) -> tuple[int, int]:
    return (sum(b.input_ids.numel() for b in batches if not b.is_empty),
            sum(int(b.attention_mask.sum()) for b in batches if not b.is_empty))


@pytest.fixture()
def uneven_reader(tmp_path, tiny_tokenizer):
    # 40 rows whose prompts repeat 1-12 times: lengths spread over a wide range
    rows = make_rows(40)
    for i, row in enumerate(rows):
        row["messages"][0]["content"] = "Tell me more. " * (1 + (i * 7) % 12) + f"number {i}"
    return ShardReader(write_shards(tmp_path, rows, tiny_tokenizer))


def test_length_grouping_keeps_every_row_once_and_equal_batch_counts(uneven_reader,
                                                                     tiny_tokenizer):
    every = {f"ex-{i:03d}" for i in range(40)}
    for epoch in range(2):
        streams = [stream(uneven_reader, tiny_tokenizer, rank=r, world_size=2,
                          group_by_length=True, group_window=2) for r in range(2)]
        batches = [list(s.iter_batches(epoch)) for s in streams]
        seen = [[i for b in bs for i in b.ids if i] for bs in batches]
        assert not set(seen[0]) & set(seen[1])
        assert Counter(seen[0] + seen[1]) == Counter(every)
        assert len(batches[0]) == len(batches[1]) == streams[0].batches_per_epoch(epoch)


def test_length_grouping_pads_less_and_is_deterministic(uneven_reader, tiny_tokenizer):
    def grouped(seed=0, epoch=0):
        return stream(uneven_reader, tiny_tokenizer, seed=seed, group_by_length=True)

    plain = list(stream(uneven_reader, tiny_tokenizer).iter_batches(0))
    by_length = list(grouped().iter_batches(0))
    padded, real = padded_and_real(by_length)
    plain_padded, plain_real = padded_and_real(plain)
    assert real == plain_real
    assert padded / real < 1.05 < plain_padded / plain_real
    assert sorted(ids_of(grouped(), 0)) == sorted(ids_of(stream(uneven_reader, tiny_tokenizer), 0))
    assert ids_of(grouped(), 0) == ids_of(grouped(), 0)  # same seed, same order
    assert ids_of(grouped(), 1) != ids_of(grouped(), 0)
    assert ids_of(grouped(seed=1), 0) != ids_of(grouped(), 0)
    # the step groups are shuffled, not served shortest first
    lengths = [b.input_ids.shape[1] for b in by_length]
    assert lengths != sorted(lengths) and lengths != sorted(lengths, reverse=True)


def test_length_grouped_steps_do_not_depend_on_the_micro_batch_split(uneven_reader,
                                                                     tiny_tokenizer):
    # 2 micro-batches of 2 rows and 1 of 4 make the same optimizer steps
    def steps(batch_size, accumulation):
        s = stream(uneven_reader, tiny_tokenizer, batch_size=batch_size,
                   accumulation_steps=accumulation, group_by_length=True, group_window=3)
        ids = [b.ids for b in s.iter_batches(0)]
        return [sorted(i for b in ids[k:k + accumulation] for i in b)
                for k in range(0, len(ids), accumulation)]

    assert steps(2, 2) == steps(4, 1) == steps(1, 4)


def test_group_by_length_puts_a_short_group_last():
    import numpy as np

    from safekeel.train.data import group_by_length

    examples = [TrainingExample(str(n), [0] * n, [0] * n) for n in (5, 1, 9, 3, 7, 2, 8)]
    out = list(group_by_length(examples, 2, 10, np.random.default_rng(0)))
    assert sorted(e.id for e in out) == sorted(e.id for e in examples)
    assert [len(e.input_ids) for e in out][-1] == 9  # the 7th, longest, is the short group
    pairs = [sorted(len(e.input_ids) for e in out[k:k + 2]) for k in (0, 2, 4)]
    assert sorted(pairs) == [[1, 2], [3, 5], [7, 8]]
