"""The risk column declarations drive the shard schema, its value checks, the trainer's inputs."""

from __future__ import annotations

import dataclasses
import typing

import pyarrow as pa
import pytest

from safekeel.data import risk_columns
from safekeel.data.risk_columns import (
    CRITIC,
    EXAMPLE_COLUMNS,
    RISK_COLUMNS,
    RISK_SIGNALS,
    STAR_ENDS,
    STAR_VALUES,
    signal_columns,
)
from safekeel.data.shards import (
    MESSAGE_TYPE,
    PROVENANCE_NEEDED_BY,
    Provenance,
    ShardError,
    check_batch_values,
    check_shard_schema,
    shard_schema,
)
from safekeel.data.shards import checks as shard_checks


def batch(**risk: list) -> pa.Table:
    """A two-row shard batch with the given risk columns, typed as the schema declares them."""
    n = len(next(iter(risk.values())))
    messages = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]] * n
    schema = shard_schema([], risk)
    return pa.Table.from_pydict(
        {"id": [f"ex-{i}" for i in range(n)], "messages": messages, **risk}, schema=schema
    )


def test_schema_has_every_declared_column_with_its_declared_type_in_declared_order():
    schema = shard_schema([], [c.name for c in reversed(RISK_COLUMNS)])
    assert schema.names[2:] == [c.name for c in RISK_COLUMNS]
    for column in RISK_COLUMNS:
        assert schema.field(column.name).type == column.arrow_type
    assert schema.field("messages").type == pa.list_(MESSAGE_TYPE)


def test_columns_of_one_producer_go_together_in_schema_and_in_checks():
    with pytest.raises(ShardError, match="go together"):
        shard_schema([], [STAR_VALUES.name])
    full = shard_schema([], [STAR_VALUES.name, STAR_ENDS.name])
    lone = pa.schema([f for f in full if f.name != STAR_ENDS.name])
    with pytest.raises(ShardError, match="without its partner"):
        check_shard_schema(lone, "x.parquet")


def test_declared_ranges_are_what_the_checks_enforce():
    for column in EXAMPLE_COLUMNS:
        check_batch_values(batch(**{column.name: [column.low, column.high]}), "s")
        with pytest.raises(ShardError, match=rf"column '{column.name}', row 1.*outside \[0, 1\]"):
            check_batch_values(batch(**{column.name: [column.low, column.high + 0.25]}), "s")
    good = {STAR_VALUES.name: [[0.0, 1.0], [0.5]], STAR_ENDS.name: [[1, 4], [3]]}
    check_batch_values(batch(**good), "s")
    with pytest.raises(ShardError, match="below 1"):
        check_batch_values(batch(**{**good, STAR_ENDS.name: [[1, 4], [STAR_ENDS.low - 1]]}), "s")


def test_a_changed_declaration_changes_the_range_check(monkeypatch):
    # The checks read the range from the declaration, not from a copy of their own:
    # narrowing the critic's declared range makes the same value fail.
    values = batch(**{CRITIC.name: [0.25, 0.75]})  # exact in float32
    check_batch_values(values, "s")
    narrowed = dataclasses.replace(CRITIC, high=0.5)
    monkeypatch.setattr(
        shard_checks,
        "EXAMPLE_COLUMNS",
        tuple(narrowed if c is CRITIC else c for c in EXAMPLE_COLUMNS),
    )
    with pytest.raises(ShardError, match=r"row 1.*value 0.75 is outside \[0, 0.5\]"):
        check_batch_values(values, "s")


def test_provenance_needs_come_from_the_declarations():
    assert PROVENANCE_NEEDED_BY == {c.name: c.provenance for c in RISK_COLUMNS}
    assert Provenance().missing_for([STAR_ENDS.name]) == list(STAR_ENDS.provenance)


def test_declaration_refuses_a_granularity_that_does_not_fit_its_type():
    with pytest.raises(ValueError, match="segment columns are lists"):
        dataclasses.replace(CRITIC, granularity="segment")


def test_signals_are_the_per_example_producers_and_their_combinations():
    assert RISK_SIGNALS == ("critic", "probe", "max", "mean")
    assert signal_columns("critic") == (CRITIC.name,)
    assert signal_columns("max") == tuple(c.name for c in EXAMPLE_COLUMNS)
    with pytest.raises(ValueError, match="unknown risk signal 'star'"):
        signal_columns("star")
    with pytest.raises(ValueError, match="unknown risk column"):
        risk_columns.column("critic_score")


def test_the_trainer_carries_every_declared_column():
    # TrainingExample / TrainingBatch / RiskInputs keep one typed field per column; adding a
    # declaration without the field fails here rather than silently dropping the column.
    pytest.importorskip("torch")
    from safekeel.train.config import RiskConfig
    from safekeel.train.data import RISK_COLUMNS_READ, TrainingBatch, TrainingExample
    from safekeel.train.weights import RiskInputs

    example_fields = {f.name for f in dataclasses.fields(TrainingExample)}
    assert {c.name for c in RISK_COLUMNS} <= example_fields
    assert RISK_COLUMNS_READ == tuple(c.name for c in RISK_COLUMNS)
    for cls in (TrainingBatch, RiskInputs):
        assert {c.name for c in EXAMPLE_COLUMNS} <= {f.name for f in dataclasses.fields(cls)}
    signal = typing.get_type_hints(RiskConfig)["signal"]
    assert typing.get_args(signal) == RISK_SIGNALS
