"""Weight policies: a(t), b(t) from risk columns, checked on hand-made batches."""

from __future__ import annotations

import math

import pytest
import torch

from safekeel.train.weights import (
    AdaptiveBatchPolicy,
    LinearSchedule,
    PaperSchedule,
    RiskInputError,
    SigmoidSchedule,
    StepSchedule,
    WeightPolicyConfigError,
    expand_star_to_tokens,
    make_schedule,
    make_weight_policy,
    needs_reference,
    paper_weight_from_rating,
    star_tokens_for_batch,
)

# Three examples with 2, 3 and 1 response tokens (positions chosen by hand).
MASK = torch.tensor(
    [
        [False, True, True, False],
        [True, True, True, False],
        [False, False, False, True],
    ]
)
CRITIC = torch.tensor([0.1, 0.8, 0.5])
PROBE = torch.tensor([0.3, 0.2, 0.9])


def expected_rows(mask: torch.Tensor, row_values: list[float]) -> torch.Tensor:
    """[B, T] holding row_values[i] on row i's response positions and 0 elsewhere."""
    out = torch.zeros(mask.shape)
    for i, value in enumerate(row_values):
        out[i, mask[i]] = value
    return out


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize(("rating", "weight"), [(1.0, 0.1), (3.5, 0.5), (5.0, 0.9)])
def test_paper_preset_on_rating_scale(rating, weight):
    assert paper_weight_from_rating(rating) == pytest.approx(weight, abs=1e-12)


def test_paper_preset_rating_clips_in_between():
    # (2.3 - 2) / 3 = 0.1 exactly at the lower clip; 4.9 -> 0.9667 clipped to 0.9.
    ratings = torch.tensor([2.0, 2.3, 2.6, 4.7, 4.9])
    expected = torch.tensor([0.1, 0.1, 0.2, 0.9, 0.9])
    torch.testing.assert_close(paper_weight_from_rating(ratings), expected)


@pytest.mark.parametrize("rating", [0.5, 5.5, float("nan")])
def test_paper_preset_rejects_ratings_off_scale(rating):
    with pytest.raises(RiskInputError, match="rating"):
        paper_weight_from_rating(rating)


def test_paper_schedule_on_probabilities():
    # r = 1 + 4p: p = 0 -> r = 1 -> 0.1; p = 0.625 -> r = 3.5 -> 0.5; p = 1 -> r = 5 -> 0.9;
    # p = 0.5 -> r = 3 -> 1/3.
    p = torch.tensor([0.0, 0.625, 1.0, 0.5])
    torch.testing.assert_close(PaperSchedule()(p), torch.tensor([0.1, 0.5, 0.9, 1 / 3]))


def test_linear_schedule_ramps_between_thresholds():
    schedule = LinearSchedule(low=0.2, high=0.6, w_min=0.1, w_max=0.9)
    risk = torch.tensor([0.0, 0.2, 0.4, 0.5, 0.6, 1.0])
    expected = torch.tensor([0.1, 0.1, 0.5, 0.7, 0.9, 0.9])
    torch.testing.assert_close(schedule(risk), expected)


def test_step_schedule_switches_at_threshold():
    schedule = StepSchedule(threshold=0.5, w_low=0.0, w_high=0.8)
    risk = torch.tensor([0.0, 0.49, 0.5, 1.0])
    torch.testing.assert_close(schedule(risk), torch.tensor([0.0, 0.0, 0.8, 0.8]))


def test_sigmoid_schedule_midpoint_and_tails():
    schedule = SigmoidSchedule(center=0.4, temperature=0.02, w_min=0.2, w_max=0.6)
    risk = torch.tensor([0.4, 0.42, 0.0, 1.0])
    gate = 1 / (1 + math.exp(-1.0))  # (0.42 - 0.4) / 0.02 = 1; the tails are 20+ widths off
    expected = torch.tensor([0.4, 0.2 + 0.4 * gate, 0.2, 0.6])
    torch.testing.assert_close(schedule(risk), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("kind", "params", "message"),
    [
        ("cosine", {}, "allowed: 'paper', 'linear', 'step', 'sigmoid'"),
        ("linear", {"low": 0.7, "high": 0.3}, "low"),
        ("linear", {"slope": 2.0}, "allowed: low, high, w_min, w_max"),
        ("step", {"threshold": 1.5}, "threshold"),
        ("step", {"w_low": 0.9, "w_high": 0.1}, "must not exceed"),
        ("sigmoid", {"temperature": 0.0}, "temperature"),
        ("sigmoid", {"w_max": 1.2}, "maximum weight"),
        ("paper", {"w_min": 0.0}, "allowed: none"),
    ],
)
def test_schedule_errors_name_the_problem(kind, params, message):
    with pytest.raises(WeightPolicyConfigError, match=message):
        make_schedule(kind, **params)


# --------------------------------------------------------------------------- policies


def test_sft_policy():
    policy = make_weight_policy("sft")
    weights = policy(MASK)
    torch.testing.assert_close(weights.a, MASK.float())
    torch.testing.assert_close(weights.b, torch.zeros(MASK.shape))
    assert not needs_reference(weights)
    assert policy.required_columns == ()
    assert not policy.uses_reference
    assert weights.batch_risk is None


def test_constant_kl_policy():
    weights = make_weight_policy("constant_kl", beta=0.25)(MASK)
    torch.testing.assert_close(weights.a, MASK.float())
    torch.testing.assert_close(weights.b, 0.25 * MASK.float())
    assert needs_reference(weights)
    assert weights.mean_kl_weight.item() == pytest.approx(0.25)


def test_filter_policy_drops_flagged_examples():
    policy = make_weight_policy("filter", threshold=0.5)
    weights = policy(MASK, critic_p_unsafe=CRITIC)
    # critic 0.1 kept; 0.8 and 0.5 (>= threshold) dropped.
    torch.testing.assert_close(weights.a, expected_rows(MASK, [1.0, 0.0, 0.0]))
    torch.testing.assert_close(weights.b, torch.zeros(MASK.shape))
    assert policy.required_columns == ("critic_p_unsafe",)
    assert not policy.uses_reference and not needs_reference(weights)
    # 2 of the 6 response tokens keep weight 1.
    assert weights.mean_ce_weight.item() == pytest.approx(2 / 6)


def test_downweight_policy_with_probe_signal():
    policy = make_weight_policy("downweight", threshold=0.6, factor=0.25, signal="probe")
    weights = policy(MASK, probe_p_harmful=PROBE)
    # probe 0.3, 0.2 kept; 0.9 flagged.
    torch.testing.assert_close(weights.a, expected_rows(MASK, [1.0, 1.0, 0.25]))
    torch.testing.assert_close(weights.b, torch.zeros(MASK.shape))
    assert policy.required_columns == ("probe_p_harmful",)


def test_adaptive_batch_policy_paper_preset_mean_of_critic():
    weights = make_weight_policy("adaptive")(MASK, critic_p_unsafe=CRITIC)
    # batch risk = mean(0.1, 0.8, 0.5) = 0.4666..; r = 1 + 4p = 2.8667; w = 0.2889.
    risk = (0.1 + 0.8 + 0.5) / 3
    w = ((1 + 4 * risk) - 2) / 3
    assert weights.batch_risk.item() == pytest.approx(risk, abs=1e-6)
    torch.testing.assert_close(weights.a, (1 - w) * MASK.float())
    torch.testing.assert_close(weights.b, w * MASK.float())
    assert weights.mean_kl_weight.item() == pytest.approx(w, abs=1e-6)


@pytest.mark.parametrize(
    ("signal", "aggregate", "risk"),
    [
        ("critic", "max", 0.8),
        ("probe", "mean", (0.3 + 0.2 + 0.9) / 3),
        ("max", "mean", (0.3 + 0.8 + 0.9) / 3),
        ("mean", "max", (0.5 + 0.9) / 2),
    ],
)
def test_adaptive_batch_policy_signals_and_aggregates(signal, aggregate, risk):
    policy = make_weight_policy(
        "adaptive",
        schedule={"kind": "linear", "low": 0.0, "high": 1.0},
        signal=signal,
        aggregate=aggregate,
    )
    weights = policy(MASK, critic_p_unsafe=CRITIC, probe_p_harmful=PROBE)
    # The identity ramp makes w equal to the batch risk.
    assert weights.batch_risk.item() == pytest.approx(risk, abs=1e-6)
    torch.testing.assert_close(weights.b, risk * MASK.float())
    torch.testing.assert_close(weights.a, (1 - risk) * MASK.float())


def test_adaptive_batch_ignores_rows_without_response_tokens():
    mask = MASK.clone()
    mask[1] = False  # a padding row: its risk 0.8 must not move the batch risk
    weights = make_weight_policy("adaptive", aggregate="max")(mask, critic_p_unsafe=CRITIC)
    assert weights.batch_risk.item() == pytest.approx(0.5)


def test_adaptive_step_schedule_can_skip_reference():
    policy = make_weight_policy("adaptive", schedule=StepSchedule(threshold=0.9))
    low = policy(MASK, critic_p_unsafe=torch.tensor([0.1, 0.2, 0.3]))
    high = policy(MASK, critic_p_unsafe=torch.tensor([0.95, 0.92, 0.99]))
    assert not needs_reference(low)
    torch.testing.assert_close(low.a, MASK.float())
    assert needs_reference(high)
    torch.testing.assert_close(high.b, MASK.float())
    torch.testing.assert_close(high.a, torch.zeros(MASK.shape))


def test_adaptive_example_policy_weights_each_example():
    policy = make_weight_policy("adaptive_example", schedule="paper", signal="critic")
    weights = policy(MASK, critic_p_unsafe=torch.tensor([0.0, 0.625, 1.0]))
    torch.testing.assert_close(weights.b, expected_rows(MASK, [0.1, 0.5, 0.9]))
    torch.testing.assert_close(weights.a, expected_rows(MASK, [0.9, 0.5, 0.1]))
    # mean b over the 6 tokens: (2 * 0.1 + 3 * 0.5 + 0.9) / 6
    assert weights.mean_kl_weight.item() == pytest.approx((0.2 + 1.5 + 0.9) / 6)


def test_star_dss_policy_per_token():
    star = torch.full(MASK.shape, float("nan"))  # padding may hold anything
    star[0, 1], star[0, 2] = 1.0, 0.25
    star[1, 0], star[1, 1], star[1, 2] = 0.5, 0.5, 0.0
    star[2, 3] = 0.75
    policy = make_weight_policy("star_dss", lam=2.0)
    weights = policy(MASK, star_v_safe_tokens=star)
    expected_a = torch.zeros(MASK.shape)
    expected_a[MASK] = torch.tensor([1.0, 0.25, 0.5, 0.5, 0.0, 0.75])
    torch.testing.assert_close(weights.a, expected_a)
    torch.testing.assert_close(weights.b, 2.0 * (MASK.float() - expected_a))
    assert policy.required_columns == ("star_v_safe", "star_token_ends")
    # mean of 1 - V over response tokens
    assert weights.batch_risk.item() == pytest.approx((0 + 0.75 + 0.5 + 0.5 + 1 + 0.25) / 6)


def test_star_dss_all_safe_needs_no_reference():
    weights = make_weight_policy("star_dss", lam=1.0)(MASK, star_v_safe_tokens=MASK.float())
    assert not needs_reference(weights)
    torch.testing.assert_close(weights.a, MASK.float())


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("sft", {}),
        ("constant_kl", {"beta": 0.3}),
        ("filter", {"threshold": 0.4}),
        ("downweight", {"factor": 0.5}),
        ("adaptive", {}),
        ("adaptive_example", {"schedule": "sigmoid"}),
        ("star_dss", {"lam": 0.5}),
    ],
)
def test_every_policy_is_zero_outside_the_mask(name, params):
    star = torch.rand(MASK.shape)
    weights = make_weight_policy(name, **params)(
        MASK, critic_p_unsafe=CRITIC, probe_p_harmful=PROBE, star_v_safe_tokens=star
    )
    for tensor in (weights.a, weights.b):
        assert tensor.dtype == torch.float32 and tensor.shape == MASK.shape
        assert (tensor[~MASK] == 0).all()
        assert ((tensor >= 0) & torch.isfinite(tensor)).all()


@pytest.mark.parametrize(
    ("signal", "columns"),
    [
        ("critic", ("critic_p_unsafe",)),
        ("probe", ("probe_p_harmful",)),
        ("max", ("critic_p_unsafe", "probe_p_harmful")),
        ("mean", ("critic_p_unsafe", "probe_p_harmful")),
    ],
)
def test_required_columns_follow_the_signal(signal, columns):
    for name in ("filter", "downweight", "adaptive", "adaptive_example"):
        assert make_weight_policy(name, signal=signal).required_columns == columns


def test_uses_reference_flags():
    assert not make_weight_policy("sft").uses_reference
    assert not make_weight_policy("filter").uses_reference
    assert not make_weight_policy("downweight").uses_reference
    for name in ("constant_kl", "adaptive", "adaptive_example", "star_dss"):
        assert make_weight_policy(name).uses_reference


def test_policy_objects_can_be_built_directly():
    policy = AdaptiveBatchPolicy(schedule=LinearSchedule(low=0.5, high=1.0), aggregate="max")
    weights = policy(MASK, critic_p_unsafe=CRITIC)
    # max risk 0.8 on the ramp 0.5..1.0 -> w = 0.6
    torch.testing.assert_close(weights.b, 0.6 * MASK.float())


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("dpo", {}, "allowed: 'sft', 'constant_kl', 'filter', 'downweight', 'adaptive'"),
        ("adaptive", {"signal": "judge"}, "allowed: 'critic', 'probe', 'max', 'mean'"),
        ("adaptive", {"aggregate": "median"}, "allowed: 'mean', 'max'"),
        ("adaptive", {"schedule": "cosine"}, "allowed: 'paper', 'linear'"),
        ("adaptive", {"schedule": {"low": 0.1}}, "'kind' key"),
        ("adaptive", {"beta": 0.1}, "allowed: schedule, signal, aggregate"),
        ("constant_kl", {"beta": -0.1}, "beta must be >= 0"),
        ("constant_kl", {"beta": float("nan")}, "beta must be finite"),
        ("constant_kl", {"beta": "0.1"}, "beta must be a number"),
        ("filter", {"threshold": 2.0}, "threshold must be <= 1"),
        ("downweight", {"factor": 1.5}, "factor must be <= 1"),
        ("star_dss", {"lam": -1.0}, "lam must be >= 0"),
        ("sft", {"beta": 0.1}, "allowed: none"),
    ],
)
def test_config_errors_name_what_is_allowed(name, params, message):
    with pytest.raises(WeightPolicyConfigError, match=message):
        make_weight_policy(name, **params)


@pytest.mark.parametrize(
    ("name", "params", "inputs", "message"),
    [
        ("adaptive", {}, {}, "critic_p_unsafe"),
        ("adaptive", {"signal": "probe"}, {"critic_p_unsafe": CRITIC}, "probe_p_harmful"),
        ("adaptive_example", {"signal": "max"}, {"critic_p_unsafe": CRITIC}, "probe_p_harmful"),
        ("filter", {}, {"critic_p_unsafe": torch.tensor([0.1, float("nan"), 0.2])}, "NaN"),
        ("adaptive", {}, {"critic_p_unsafe": torch.tensor([0.1, 1.2, 0.2])}, r"\[0, 1\]"),
        ("adaptive", {}, {"critic_p_unsafe": torch.tensor([-0.1, 0.2, 0.2])}, r"\[0, 1\]"),
        ("adaptive", {}, {"critic_p_unsafe": torch.tensor([0.1, 0.2])}, "shape"),
        ("star_dss", {}, {}, "star_v_safe_tokens"),
        ("star_dss", {}, {"star_v_safe_tokens": torch.ones(3, 5)}, "shape"),
    ],
)
def test_bad_risk_inputs_are_refused(name, params, inputs, message):
    with pytest.raises(RiskInputError, match=message):
        make_weight_policy(name, **params)(MASK, **inputs)


def test_star_values_out_of_range_at_response_tokens_are_refused():
    star = torch.full(MASK.shape, 0.5)
    star[2, 3] = 1.5
    with pytest.raises(RiskInputError, match=r"\[0, 1\]"):
        make_weight_policy("star_dss")(MASK, star_v_safe_tokens=star)


def test_mask_must_be_a_bool_matrix():
    with pytest.raises(RiskInputError, match="bool"):
        make_weight_policy("sft")(MASK.float())
    with pytest.raises(RiskInputError, match=r"\[batch, seq\]"):
        make_weight_policy("sft")(MASK[0])


# --------------------------------------------------------------------------- STAR tokens


@pytest.mark.parametrize(
    ("v_safe", "ends", "n", "expected"),
    [
        ([0.9, 0.2], [2, 5], 5, [0.9, 0.9, 0.2, 0.2, 0.2]),
        ([0.9, 0.2], [2, 5], 7, [0.9, 0.9, 0.2, 0.2, 0.2, 0.2, 0.2]),  # past the end
        ([0.9, 0.2], [2, 5], 3, [0.9, 0.9, 0.2]),  # truncated response
        ([0.9, 0.2, 0.4], [1, 2, 3], 3, [0.9, 0.2, 0.4]),
        ([0.7], [4], 4, [0.7, 0.7, 0.7, 0.7]),
        ([0.7], [4], 0, []),
        ([], [], 0, []),
    ],
)
def test_expand_star_to_tokens(v_safe, ends, n, expected):
    out = expand_star_to_tokens(v_safe, ends, n)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float32))


@pytest.mark.parametrize(
    ("v_safe", "ends", "n", "message"),
    [
        ([0.9, 0.2], [2], 5, "2 values but star_token_ends has 1"),
        ([0.9, 0.2], [3, 3], 5, "strictly increasing"),
        ([0.9, 0.2], [4, 2], 5, "strictly increasing"),
        ([0.9], [0], 5, ">= 1"),
        ([], [], 3, "empty"),
        ([1.2], [3], 3, r"\[0, 1\]"),
        ([float("nan")], [3], 3, "NaN"),
        ([0.5], [3], -1, ">= 0"),
    ],
)
def test_expand_star_to_tokens_rejects_bad_segments(v_safe, ends, n, message):
    with pytest.raises(RiskInputError, match=message):
        expand_star_to_tokens(v_safe, ends, n)


def test_star_tokens_for_batch_places_values_on_response_positions():
    out = star_tokens_for_batch([[0.9, 0.2], [0.1, 0.6], [0.3]], [[1, 2], [2, 3], [1]], MASK)
    expected = torch.zeros(MASK.shape)
    expected[0, 1], expected[0, 2] = 0.9, 0.2
    expected[1, 0], expected[1, 1], expected[1, 2] = 0.1, 0.1, 0.6
    expected[2, 3] = 0.3
    torch.testing.assert_close(out, expected)


def test_star_tokens_for_batch_names_the_bad_row():
    with pytest.raises(RiskInputError, match="row 1"):
        star_tokens_for_batch([[0.9], [0.1, 0.6], [0.3]], [[2], [2, 1], [1]], MASK)


def test_config_choices_are_the_policies_schedules_and_aggregates_that_exist():
    # The names are listed once in train.config (torch-free); the implementations must match.
    from safekeel.train.config import BATCH_AGGREGATES, METHODS, SCHEDULE_KINDS
    from safekeel.train.weights import POLICIES, SCHEDULES, aggregate_batch_risk

    assert tuple(POLICIES) == METHODS
    assert tuple(SCHEDULES) == SCHEDULE_KINDS
    mask = torch.ones(2, 1, dtype=torch.bool)
    for how in BATCH_AGGREGATES:
        aggregate_batch_risk(torch.tensor([0.2, 0.6]), mask, how)
