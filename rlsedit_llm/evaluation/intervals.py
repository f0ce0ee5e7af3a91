"""Means, 95 % intervals and paired differences of the benchmark's per-fact scores.

Every function here is pure: it takes per-fact values (one array per stream) and an explicit
``numpy.random.Generator`` and returns numbers. Two statistics are supported:

- ``"mean"``: the mean of one metric (efficacy, generalization, specificity, ...) over facts;
  values of shape ``(n,)`` (or ``(n, 1)``);
- ``"score"``: the harmonic mean ``3 / (1/E + 1/G + 1/S)`` of the three means over facts (the
  benchmark's score, 0 when one of them is 0); values of shape ``(n, 3)``, the columns efficacy,
  generalization and specificity of each fact.

NaN marks a value that is not measured for a fact (e.g. no paraphrase); means skip it, as
:func:`.metrics.summarize_cases` does.

**One stream** (:func:`fact_interval`): the facts are resampled with replacement (rows, so the
three metrics of a fact stay together) and the interval is the percentile interval of the
statistic over ``n_resamples`` resamples (:func:`scipy.stats.bootstrap`, ``method="percentile"``,
``paired=True``). It describes the uncertainty from *which facts* were drawn, for this one stream.

**Several streams** (:func:`stream_interval`): the point estimate averages the per-stream means
(each stream weighs the same), ``m_j = (1/S) sum_s mean_s(column j)``, and applies the statistic
to ``m``. The interval is a two-level (hierarchical) bootstrap: each resample draws ``S``
streams with replacement, then, independently for each drawn stream, its facts with replacement,
and computes the same average; the interval is the percentile interval of those statistics. It
adds the variation between streams (records and their order) to the variation between facts.
With one stream it is the bootstrap over facts. With few streams (three, say) the
between-stream part rests on those few values and a bootstrap of them is narrower than the truth
by about a factor ``sqrt((S - 1) / S)``: read it as indicative.

**Paired differences** (:func:`paired_difference`): two methods run on the same streams are
compared fact by fact: each resample draws the same streams and the same facts for both, and the
statistic is ``stat(A) - stat(B)``. Its ``win`` is true only when the whole interval lies above
0 (A better), its ``loss`` only when it lies below 0; otherwise the difference is not resolved.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.stats

from rlsedit_llm.errors import HyperparameterError

__all__ = ["STATISTICS", "SCORE_METRICS", "Estimate", "Difference", "fact_interval", "stream_interval",
           "paired_difference", "case_matrix", "paired_matrices"]

#: The statistics of this module: the mean of one metric, the harmonic score of three.
STATISTICS = ("mean", "score")
#: The columns a ``"score"`` statistic takes, in order.
SCORE_METRICS = ("efficacy", "generalization", "specificity")


@dataclass(frozen=True)
class Estimate:
    """A statistic and its interval: ``value`` (the point estimate), ``low`` and ``high`` (the
    ``confidence`` percentile interval), over ``streams`` streams of ``facts`` facts in all."""

    value: float
    low: float
    high: float
    confidence: float
    streams: int
    facts: int

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies entirely on one side of 0."""
        return bool(self.low > 0 or self.high < 0)


@dataclass(frozen=True)
class Difference(Estimate):
    """A paired difference ``A - B`` with its interval; ``win``: the interval lies above 0 (A is
    better), ``loss``: below 0 (B is better); neither: not resolved at this confidence."""

    win: bool = False
    loss: bool = False


# ----------------------------------------------------------------------------------------------
# Checking the input


def _columns(statistic: str) -> int:
    if statistic not in STATISTICS:
        raise HyperparameterError(f"statistic must be one of {STATISTICS}; got {statistic!r}")
    return 1 if statistic == "mean" else len(SCORE_METRICS)


def _stream(values: Any, statistic: str, where: str) -> np.ndarray:
    """``values`` as a float array (n, k) for ``statistic``; a typed error says what is wrong."""
    k = _columns(statistic)
    try:
        x = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise HyperparameterError(f"{where}: per-fact values must be numbers; got {type(values).__name__}") from None
    if x.ndim == 1 and k == 1:
        x = x[:, None]
    if x.ndim != 2 or x.shape[1] != k:
        want = "(n,) or (n, 1)" if k == 1 else f"(n, {k}): columns {', '.join(SCORE_METRICS)}"
        raise HyperparameterError(f"{where}: statistic {statistic!r} takes per-fact values of shape {want}; "
                                  f"got shape {x.shape}")
    if x.shape[0] < 2:
        raise HyperparameterError(f"{where}: an interval needs at least 2 facts; got {x.shape[0]}")
    if np.isinf(x).any():
        raise HyperparameterError(f"{where}: per-fact values must be finite (NaN: not measured); got an infinity")
    if np.isnan(x).all(axis=0).any():
        raise HyperparameterError(f"{where}: a column has no measured value (all NaN)")
    return x


def _check(confidence: float, n_resamples: int, rng: Any) -> None:
    if not (isinstance(confidence, float) and 0 < confidence < 1):
        raise HyperparameterError(f"confidence must be a float in (0, 1), e.g. 0.95; got {confidence!r}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 100:
        raise HyperparameterError(f"n_resamples must be an int >= 100; got {n_resamples!r}")
    if not isinstance(rng, np.random.Generator):
        raise HyperparameterError(f"rng must be a numpy Generator, e.g. np.random.default_rng(0); "
                                  f"got {type(rng).__name__}")


# ----------------------------------------------------------------------------------------------
# The statistics, on column means of shape (..., k)


def _harmonic(means: np.ndarray) -> np.ndarray:
    """The harmonic mean over the last axis; 0 where any entry is <= 0 (as metrics.harmonic_mean)."""
    positive = (means > 0).all(axis=-1)
    safe = np.where(means > 0, means, 1.0)
    return np.where(positive, means.shape[-1] / (1.0 / safe).sum(axis=-1), 0.0)


def _stat(statistic: str) -> Callable[[np.ndarray], np.ndarray]:
    return (lambda m: m[..., 0]) if statistic == "mean" else _harmonic


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():  # a resample may draw no measured value of a sparse column
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


# ----------------------------------------------------------------------------------------------
# The bootstraps


def _rng_keyword() -> str:
    return "rng" if "rng" in inspect.signature(scipy.stats.bootstrap).parameters else "random_state"


def _fact_bootstrap(x: np.ndarray, stat: Callable[[np.ndarray], np.ndarray], confidence: float,
                    n_resamples: int, rng: np.random.Generator) -> tuple[float, float]:
    """The percentile interval of ``stat(column means)`` over resamples of the rows of ``x``."""
    if np.all(np.nan_to_num(x) == np.nan_to_num(x[0])):  # every fact the same: no spread to resample
        value = float(stat(_nanmean(x, 0)))
        return value, value

    def statistic(*cols: np.ndarray, axis: int = -1) -> np.ndarray:
        return stat(np.stack([_nanmean(c, axis) for c in cols], axis=-1))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = scipy.stats.bootstrap(tuple(x.T), statistic, paired=True, vectorized=True, n_resamples=n_resamples,
                                    batch=250, confidence_level=confidence, method="percentile",
                                    **{_rng_keyword(): rng})
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _resampled_means(x: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Column means (size, k) of ``size`` resamples of the rows of ``x`` (NaN skipped): each
    resample's row counts are one multinomial draw."""
    n = x.shape[0]
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(float)  # (size, n)
    measured = ~np.isnan(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (counts @ np.where(measured, x, 0.0)) / (counts @ measured)


def _two_level(streams: Sequence[np.ndarray], stat: Callable[[np.ndarray], np.ndarray], confidence: float,
               n_resamples: int, rng: np.random.Generator) -> tuple[float, float]:
    """The percentile interval of the hierarchical bootstrap: streams, then facts in each."""
    n_streams, k = len(streams), streams[0].shape[1]
    picks = rng.integers(0, n_streams, size=(n_resamples, n_streams))  # which stream is the j-th draw
    total = np.zeros((n_resamples, k))
    for j in range(n_streams):
        for s, x in enumerate(streams):
            rows = picks[:, j] == s
            if rows.any():  # each draw resamples its stream's facts afresh
                total[rows] += _resampled_means(x, int(rows.sum()), rng)
    values = stat(total / n_streams)
    values = values[~np.isnan(values)]
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _estimate(streams: Sequence[np.ndarray], stat: Callable[[np.ndarray], np.ndarray], confidence: float,
              n_resamples: int, rng: np.random.Generator) -> tuple[float, float, float]:
    value = float(stat(np.mean([_nanmean(x, 0) for x in streams], axis=0)))
    if len(streams) == 1:
        low, high = _fact_bootstrap(streams[0], stat, confidence, n_resamples, rng)
    else:
        low, high = _two_level(streams, stat, confidence, n_resamples, rng)
    return value, low, high


def fact_interval(values: Any, *, statistic: str = "mean", confidence: float = 0.95, n_resamples: int = 2000,
                  rng: np.random.Generator) -> Estimate:
    """The statistic of one stream's per-fact ``values`` and its interval by a bootstrap over
    facts (see the module docstring; ``values``: (n,) for ``"mean"``, (n, 3) for ``"score"``)."""
    _check(confidence, n_resamples, rng)
    x = _stream(values, statistic, "fact_interval")
    value, low, high = _estimate([x], _stat(statistic), confidence, n_resamples, rng)
    return Estimate(value, low, high, confidence, 1, x.shape[0])


def stream_interval(streams: Sequence[Any], *, statistic: str = "mean", confidence: float = 0.95,
                    n_resamples: int = 2000, rng: np.random.Generator) -> Estimate:
    """The statistic over several streams (each stream's per-fact values, as for
    :func:`fact_interval`) and its interval by the two-level bootstrap, streams then facts; one
    stream gives :func:`fact_interval`."""
    _check(confidence, n_resamples, rng)
    if isinstance(streams, np.ndarray) or not isinstance(streams, Sequence) or not streams:
        raise HyperparameterError("stream_interval takes a non-empty list with one array of per-fact values per "
                                  "stream")
    xs = [_stream(v, statistic, f"stream {i}") for i, v in enumerate(streams)]
    value, low, high = _estimate(xs, _stat(statistic), confidence, n_resamples, rng)
    return Estimate(value, low, high, confidence, len(xs), sum(x.shape[0] for x in xs))


def paired_difference(a: Sequence[Any], b: Sequence[Any], *, statistic: str = "mean", confidence: float = 0.95,
                      n_resamples: int = 2000, rng: np.random.Generator) -> Difference:
    """``statistic(A) - statistic(B)`` of two methods on the same streams, paired by fact: ``a[s]``
    and ``b[s]`` hold the per-fact values of stream ``s``, row ``i`` the same fact in both
    (:func:`paired_matrices` aligns them by case id). The interval resamples the same streams and
    facts for both (two-level; over facts only with one stream); ``win`` / ``loss`` are set only
    when it excludes 0."""
    _check(confidence, n_resamples, rng)
    for name, arg in (("a", a), ("b", b)):
        if isinstance(arg, np.ndarray) or not isinstance(arg, Sequence) or not arg:
            raise HyperparameterError(f"paired_difference: {name} must be a non-empty list of per-stream arrays")
    if len(a) != len(b):
        raise HyperparameterError(f"paired_difference: {len(a)} streams of A but {len(b)} of B; pair the same "
                                  "streams")
    xa = [_stream(v, statistic, f"A, stream {i}") for i, v in enumerate(a)]
    xb = [_stream(v, statistic, f"B, stream {i}") for i, v in enumerate(b)]
    for i, (p, q) in enumerate(zip(xa, xb, strict=True)):
        if p.shape != q.shape:
            raise HyperparameterError(f"paired_difference: stream {i} has {p.shape[0]} facts of A and {q.shape[0]} "
                                      "of B; pair them fact by fact (paired_matrices)")
    k = xa[0].shape[1]
    base = _stat(statistic)

    def diff(means: np.ndarray) -> np.ndarray:
        return base(means[..., :k]) - base(means[..., k:])

    joined = [np.concatenate([p, q], axis=1) for p, q in zip(xa, xb, strict=True)]
    value, low, high = _estimate(joined, diff, confidence, n_resamples, rng)
    return Difference(value, low, high, confidence, len(joined), sum(x.shape[0] for x in joined),
                      win=bool(low > 0), loss=bool(high < 0))


# ----------------------------------------------------------------------------------------------
# From the benchmark's per-case rows


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def case_matrix(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> np.ndarray:
    """The per-fact values (n, len(metrics)) of a run's per-case rows (``FinalScores.cases``);
    a missing or null value is NaN."""
    return np.array([[_number(r.get(m)) for m in metrics] for r in rows], dtype=float).reshape(len(rows),
                                                                                                len(metrics))


def paired_matrices(rows_a: Sequence[Mapping[str, Any]], rows_b: Sequence[Mapping[str, Any]],
                    metrics: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The per-fact values of two methods' rows on the facts both scored, row ``i`` the same
    ``case_id`` in both (in A's order). A case id repeated within one method's rows (a question
    asked again later in the stream) pairs occurrence by occurrence."""
    def keyed(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[Any, int], Mapping[str, Any]]:
        seen: dict[Any, int] = {}
        out: dict[tuple[Any, int], Mapping[str, Any]] = {}
        for r in rows:
            cid = r.get("case_id")
            seen[cid] = seen.get(cid, 0) + 1
            out[(cid, seen[cid])] = r
        return out

    ka, kb = keyed(rows_a), keyed(rows_b)
    common = [key for key in ka if key in kb]
    if len(common) < 2:
        raise HyperparameterError(f"the two methods share {len(common)} scored facts (by case id); a paired "
                                  "comparison needs runs on the same stream")
    return case_matrix([ka[c] for c in common], metrics), case_matrix([kb[c] for c in common], metrics)
