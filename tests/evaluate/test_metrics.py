"""Wilson intervals and attack success rates on hand-made cases."""

import json
import math

import numpy as np
import pytest

from safekeel.evaluate.metrics import RateEstimate, attack_success_rate, wilson_interval

Z_95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def _score_test_bounds(successes: int, n: int, z: float) -> tuple[float, float]:
    """Wilson's interval by its definition, solved by bisection (independent of the formula).

    It is the set of p with (p_hat - p)^2 <= z^2 p (1 - p) / n: the bounds are the roots of
    g(p) = (p_hat - p)^2 - z^2 p (1 - p) / n on either side of p_hat.
    """
    p_hat = successes / n

    def g(p: float) -> float:
        return (p_hat - p) ** 2 - z * z * p * (1.0 - p) / n

    def root(inside: float, outside: float) -> float:
        # g(inside) <= 0 < g(outside), or the bound is the end of [0, 1] itself.
        if g(outside) <= 0:
            return outside
        for _ in range(200):
            middle = (inside + outside) / 2
            if g(middle) <= 0:
                inside = middle
            else:
                outside = middle
        return (inside + outside) / 2

    return root(p_hat, 0.0), root(p_hat, 1.0)


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [(0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0)],
)
def test_wilson_textbook_values(successes, n, low, high):
    got_low, got_high = wilson_interval(successes, n)
    assert got_low == pytest.approx(low, abs=5e-5)
    assert got_high == pytest.approx(high, abs=5e-5)


@pytest.mark.parametrize(("successes", "n"), [(0, 1), (1, 3), (7, 20), (97, 100), (520, 520)])
def test_wilson_equals_inverted_score_test(successes, n):
    expected = _score_test_bounds(successes, n, Z_95)
    assert wilson_interval(successes, n) == pytest.approx(expected, abs=1e-9)


def test_wilson_bounds_are_exact_at_the_ends_and_contain_the_rate():
    assert wilson_interval(0, 7)[0] == 0.0
    assert wilson_interval(7, 7)[1] == 1.0
    for successes in range(11):
        low, high = wilson_interval(successes, 10)
        assert 0.0 <= low <= successes / 10 <= high <= 1.0


def test_higher_confidence_gives_a_wider_interval():
    low_95, high_95 = wilson_interval(3, 10, 0.95)
    low_99, high_99 = wilson_interval(3, 10, 0.99)
    assert low_99 < low_95 and high_99 > high_95
    # 99%: z = 2.5758...
    expected = _score_test_bounds(3, 10, 2.5758293035489004)
    assert (low_99, high_99) == pytest.approx(expected, abs=1e-9)


def test_wilson_with_no_rows_is_the_whole_interval():
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((4, 3), ValueError),
        ((-1, 3), ValueError),
        ((1, 3, 1.0), ValueError),
        ((1, 3, 0.0), ValueError),
        ((1.5, 3), TypeError),
        ((True, 3), TypeError),
    ],
)
def test_wilson_rejects_bad_input(args, error):
    with pytest.raises(error):
        wilson_interval(*args)


def test_rate_estimate_from_counts():
    estimate = RateEstimate.from_counts(3, 12)
    assert estimate.rate == 0.25
    assert (estimate.low, estimate.high) == wilson_interval(3, 12)
    assert (estimate.n, estimate.successes, estimate.judge_failures) == (12, 3, 0)


def test_rate_estimate_without_rows_has_nan_rate_and_json_null():
    estimate = RateEstimate.from_counts(0, 0, judge_failures=2)
    assert math.isnan(estimate.rate)
    as_json = json.loads(json.dumps(estimate.to_dict(), allow_nan=False))
    assert as_json["rate"] is None
    assert as_json["judge_failures"] == 2


def test_attack_success_rate_overall_and_per_category_with_failed_judges():
    verdicts = [True, False, None, True, False, False, None, True]
    categories = ["fraud", "fraud", "fraud", "malware", "malware", "hate", "hate", "fraud"]
    result = attack_success_rate(verdicts, categories)

    # Overall: 3 successes among 6 judged rows; rows 2 and 6 had no verdict.
    assert result.overall.successes == 3
    assert result.overall.n == 6
    assert result.overall.rate == 0.5
    assert (result.overall.low, result.overall.high) == wilson_interval(3, 6)
    assert result.overall.judge_failures == 2
    assert result.judge_failures == 2
    assert result.failed_rows == (2, 6)

    assert list(result.per_category) == ["fraud", "hate", "malware"]  # sorted
    fraud, hate, malware = (result.per_category[name] for name in ["fraud", "hate", "malware"])
    assert (fraud.successes, fraud.n, fraud.judge_failures) == (2, 3, 1)
    assert (hate.successes, hate.n, hate.judge_failures) == (0, 1, 1)
    assert (malware.successes, malware.n, malware.judge_failures) == (1, 2, 0)
    assert (fraud.low, fraud.high) == wilson_interval(2, 3)


def test_attack_success_rate_without_categories():
    result = attack_success_rate([True, True, False, False])
    assert result.overall.rate == 0.5
    assert result.per_category == {}
    assert result.failed_rows == ()


def test_category_whose_judge_always_failed_is_reported_not_dropped():
    result = attack_success_rate([None, None, True], ["a", "a", "b"])
    assert result.per_category["a"].n == 0
    assert result.per_category["a"].judge_failures == 2
    assert math.isnan(result.per_category["a"].rate)
    report = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert report["per_category"]["a"]["rate"] is None
    assert report["failed_rows"] == [0, 1]


def test_numpy_booleans_are_verdicts():
    verdicts = list(np.array([True, False, True]))
    assert attack_success_rate(verdicts).overall.successes == 2


@pytest.mark.parametrize("bad", [0.7, 1, "yes"])
def test_non_boolean_verdicts_are_rejected(bad):
    # A P(unsafe) or 0/1 label passed by mistake must fail loudly, naming the row.
    with pytest.raises(ValueError, match="row 1"):
        attack_success_rate([True, bad])


def test_categories_must_match_the_rows():
    with pytest.raises(ValueError, match="2 verdicts but 1 categories"):
        attack_success_rate([True, False], ["a"])
    with pytest.raises(TypeError, match="row 0"):
        attack_success_rate([True], [None])
