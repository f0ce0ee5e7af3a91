"""rlsedit_llm.evaluation.intervals on synthetic numbers: coverage of a known mean, the two-level
bootstrap across streams, paired differences and their wins."""

from __future__ import annotations

import numpy as np
import pytest

from rlsedit_llm.errors import HyperparameterError
from rlsedit_llm.evaluation import intervals as iv
from rlsedit_llm.evaluation.metrics import harmonic_mean


def test_fact_interval_covers_a_known_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    p, n, trials = 0.3, 200, 200
    hits, widths = 0, []
    for t in range(trials):
        x = rng.binomial(1, p, n)
        est = iv.fact_interval(x, n_resamples=400, rng=np.random.default_rng(t))
        assert est.low <= est.value <= est.high and est.value == pytest.approx(x.mean())
        hits += est.low <= p <= est.high
        widths.append(est.high - est.low)
    assert 0.88 <= hits / trials <= 0.99
    # the width is that of the normal interval 2 * 1.96 * sqrt(p (1 - p) / n), about 0.127
    assert np.mean(widths) == pytest.approx(2 * 1.96 * np.sqrt(p * (1 - p) / n), rel=0.1)


def test_the_score_is_the_harmonic_mean_of_the_column_means_and_nan_is_not_measured():
    rng = np.random.default_rng(1)
    x = rng.binomial(1, [0.9, 0.6, 0.5], size=(300, 3)).astype(float)
    x[:20, 1] = np.nan  # facts without a paraphrase
    est = iv.fact_interval(x, statistic="score", n_resamples=500, rng=rng)
    assert est.value == pytest.approx(harmonic_mean(np.nanmean(x, axis=0)))
    assert est.low < est.value < est.high
    assert iv.fact_interval(np.zeros((5, 3)), statistic="score", rng=rng).value == 0.0
    constant = iv.fact_interval(np.ones(10), rng=rng)  # no spread: the interval is the point
    assert (constant.low, constant.value, constant.high) == (1.0, 1.0, 1.0)


def test_one_stream_is_the_bootstrap_over_facts():
    x = np.random.default_rng(2).normal(0.5, 0.2, 150)
    one = iv.stream_interval([x], n_resamples=300, rng=np.random.default_rng(7))
    facts = iv.fact_interval(x, n_resamples=300, rng=np.random.default_rng(7))
    assert one == facts and one.streams == 1 and one.facts == 150


def test_two_level_bootstrap_adds_the_variation_between_streams():
    """Streams whose means differ (a per-stream effect) make the facts of one stream correlated: an
    interval over the pooled facts is too narrow; the two-level one covers the true mean far more
    often."""
    rng = np.random.default_rng(3)
    mu, tau, sigma, n_streams, n = 0.6, 0.05, 0.3, 6, 200
    hier = pooled = 0
    trials = 60
    for t in range(trials):
        streams = [rng.normal(mu + rng.normal(0, tau), sigma, n) for _ in range(n_streams)]
        h = iv.stream_interval(streams, n_resamples=400, rng=np.random.default_rng(t))
        f = iv.fact_interval(np.concatenate(streams), n_resamples=400, rng=np.random.default_rng(t))
        assert h.value == pytest.approx(np.mean([s.mean() for s in streams]))
        assert h.high - h.low > f.high - f.low
        hier += h.low <= mu <= h.high
        pooled += f.low <= mu <= f.high
    assert hier / trials >= 0.75 and hier - pooled >= 0.25 * trials


def test_paired_difference_wins_flip_with_the_sign_and_pairing_narrows_the_interval():
    rng = np.random.default_rng(4)
    b = rng.binomial(1, 0.6, 500).astype(float)
    a = b.copy()
    flip = rng.choice(500, 25, replace=False)  # A gets 25 more facts right than B
    a[flip[b[flip] == 0]] = 1
    a_over_b = iv.paired_difference([a], [b], n_resamples=1000, rng=np.random.default_rng(0))
    b_over_a = iv.paired_difference([b], [a], n_resamples=1000, rng=np.random.default_rng(0))
    assert a_over_b.value == pytest.approx(a.mean() - b.mean()) and a_over_b.value > 0
    assert a_over_b.win and not a_over_b.loss and a_over_b.excludes_zero
    assert b_over_a.loss and not b_over_a.win
    assert b_over_a.value == pytest.approx(-a_over_b.value)
    # the same difference with the facts unpaired (B's rows shuffled) is not resolved
    unpaired = iv.paired_difference([a], [rng.permutation(b)], n_resamples=1000, rng=np.random.default_rng(0))
    assert unpaired.high - unpaired.low > 3 * (a_over_b.high - a_over_b.low)
    assert not unpaired.win and not unpaired.loss
    # no difference: neither a win nor a loss
    same = iv.paired_difference([b], [b], rng=np.random.default_rng(0))
    assert (same.value, same.win, same.loss) == (0.0, False, False)


def test_paired_score_difference_over_several_streams():
    rng = np.random.default_rng(5)
    streams_b = [rng.binomial(1, [0.8, 0.7, 0.6], size=(300, 3)).astype(float) for _ in range(3)]
    streams_a = [np.clip(s + (rng.random(s.shape) < 0.1), 0, 1) for s in streams_b]  # A better everywhere
    d = iv.paired_difference(streams_a, streams_b, statistic="score", n_resamples=500, rng=rng)
    want = (harmonic_mean(np.mean([s.mean(0) for s in streams_a], axis=0))
            - harmonic_mean(np.mean([s.mean(0) for s in streams_b], axis=0)))
    assert d.value == pytest.approx(want) and d.win and d.streams == 3 and d.facts == 900
    r = iv.paired_difference(streams_b, streams_a, statistic="score", n_resamples=500, rng=rng)
    assert r.loss and not r.win


def test_paired_matrices_align_rows_by_case_id():
    rows_a = [{"case_id": i, "efficacy": float(i % 2), "specificity": None} for i in range(6)]
    rows_b = [{"case_id": i, "efficacy": 1.0 - i % 2, "specificity": 0.5} for i in (5, 3, 1, 0, 2, 4, 9)]
    a, b = iv.paired_matrices(rows_a, rows_b, ["efficacy", "specificity"])
    assert a.shape == b.shape == (6, 2)
    assert np.array_equal(a[:, 0] + b[:, 0], np.ones(6))  # case by case, B is A's complement
    assert np.isnan(a[:, 1]).all() and (b[:, 1] == 0.5).all()
    with pytest.raises(HyperparameterError, match="same stream"):
        iv.paired_matrices(rows_a, [{"case_id": 99, "efficacy": 1.0}], ["efficacy"])


@pytest.mark.parametrize("call, match", [
    (lambda r: iv.fact_interval(np.ones((4, 2)), rng=r), "shape"),
    (lambda r: iv.fact_interval(np.ones(4), statistic="median", rng=r), "statistic"),
    (lambda r: iv.fact_interval([1.0], rng=r), "at least 2"),
    (lambda r: iv.fact_interval([1.0, np.inf], rng=r), "finite"),
    (lambda r: iv.fact_interval([np.nan, np.nan], rng=r), "no measured value"),
    (lambda r: iv.fact_interval(np.ones(4), rng=0), "numpy Generator"),
    (lambda r: iv.fact_interval(np.ones(4), confidence=95, rng=r), "confidence"),
    (lambda r: iv.stream_interval([], rng=r), "non-empty list"),
    (lambda r: iv.paired_difference([np.ones(4)], [np.ones(4), np.ones(4)], rng=r), "streams"),
    (lambda r: iv.paired_difference([np.ones(4)], [np.ones(5)], rng=r), "fact by fact"),
])
def test_bad_input_gets_a_typed_error_saying_what_to_fix(call, match):
    with pytest.raises(HyperparameterError, match=match):
        call(np.random.default_rng(0))
