"""What a benchmark run records, as typed dataclasses with a versioned JSON form (``results.json``).

:class:`Results` holds the run's :class:`RunSettings` (what must match for a rerun to resume it),
its :class:`RunConfig` summary, the :class:`Session` of every invocation, the unedited model's
:class:`BaseScores` and one :class:`MethodRecord` per method: its per-batch :class:`BatchScores`,
its :class:`Checkpoint` re-scorings (with the per-layer :class:`LayerDeviation`) and its
:class:`FinalScores`. ``Results.from_json`` reads every format this package has written (see
:data:`FORMATS`); ``to_json`` writes :data:`FORMAT`. Keys a class does not know are kept in its
``extra`` dict and written back.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from rlsedit_llm.errors import StateMismatchError
from rlsedit_llm.evaluation.protocol_config import ProtocolConfig
from rlsedit_llm.evaluation.records import JsonRecord, require_object
from rlsedit_llm.files import atomic_write_text

__all__ = ["FORMAT", "FORMATS", "RESULTS", "Scores", "BatchScores", "LayerDeviation", "LeaderGap", "Checkpoint",
           "Generation", "GlueTask", "Glue", "BaseScores", "FinalScores", "MethodRecord", "Session", "RunConfig",
           "RunSettings", "Results", "read_results", "load_results", "write_results", "finite"]

#: The format this package writes; v2 records each method's settings as ``method_settings``.
FORMAT = "rlsedit-bench-v2"
#: Every format :meth:`Results.from_json` reads.
FORMATS = ("rlsedit-bench-v1", FORMAT)
#: The results file of a benchmark folder.
RESULTS = "results.json"


def finite(x: float | None) -> float | None:
    """JSON-safe float, 6 significant digits (NaN/inf -> None)."""
    return None if x is None or not math.isfinite(x) else float(f"{float(x):.6g}")


@dataclass
class Scores(JsonRecord):
    """A summary of scored cases (:func:`.metrics.summarize_cases`): ``n`` cases, the metrics'
    means (None: not measured), ``score`` their harmonic mean, ``wild`` the generation check."""

    n: int = 0
    efficacy: float | None = None
    generalization: float | None = None
    specificity: float | None = None
    score: float | None = None
    wild: float | None = None
    efficacy_magnitude: float | None = None
    generalization_magnitude: float | None = None
    specificity_magnitude: float | None = None
    efficacy_acc: float | None = None
    generalization_acc: float | None = None
    specificity_acc: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, summary: Mapping[str, Any]) -> Scores:
        """Scores from a summary dict, its floats made JSON-safe (:func:`finite`)."""
        return cls.from_json({k: (finite(v) if isinstance(v, float) else v) for k, v in summary.items()})

    def get(self, metric: str) -> float | None:
        """The value of ``metric`` (a field or an extra key), or None."""
        if metric in self.extra:
            return self.extra[metric]
        return getattr(self, metric, None) if metric != "extra" else None


@dataclass
class BatchScores(JsonRecord):
    """One batch scored right after it was written: timings, the scores of its edits, the value
    residual left and the value-norm instruments (``value_norm``, ``value_norm_ratio``,
    ``layer_value_ratio.<layer>``). JSON: one flat object."""

    _always: ClassVar[frozenset[str]] = frozenset({"seconds_update", "residual_ratio"})
    _NORMS: ClassVar[tuple[str, ...]] = ("value_norm", "layer_value_ratio")

    batch: int
    edits: int
    seconds_edit: float
    seconds_eval: float = 0.0
    seconds_update: float | None = None
    residual_ratio: float | None = None
    scores: Scores = field(default_factory=Scores)
    norms: dict[str, float | None] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], **given: Any) -> BatchScores:
        require_object(cls, data)
        own = {f.name for f in fields(cls)} - {"scores", "norms", "extra"}
        norms = {k: v for k, v in data.items() if k.startswith(cls._NORMS)}
        scores = {k: v for k, v in data.items() if k not in own and k not in norms}
        entry = super().from_json({k: v for k, v in data.items() if k in own}, **given)
        entry.scores, entry.norms = Scores.from_json(scores), norms
        return entry

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        del out["scores"], out["norms"]
        return {**out, **self.scores.to_json(), **self.norms}


@dataclass
class LayerDeviation(JsonRecord):
    """One layer at a checkpoint: ``fro = ||W_t - W0||_F``, ``anchor = ||K0 (W_t - W0)||_F``, the
    T3(a)/T3(b) right-hand sides and ``cond(G_t)`` (None: not defined for the method)."""

    fro: float | None = None
    anchor: float | None = None
    t3a: float | None = None
    t3b: float | None = None
    cond: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, deviation: Any) -> LayerDeviation:
        """From a :class:`rlsedit_llm.kernel.certificates.Deviation` (infinities become None)."""
        def ok(x):
            return None if x is None or not math.isfinite(x) else float(x)
        return cls(ok(deviation.fro), ok(deviation.anchor), ok(deviation.t3a), ok(deviation.t3b),
                   ok(deviation.condition))


@dataclass
class LeaderGap(JsonRecord):
    """A shadow's weights against its leader's on one layer: ``rel = ||W - W_leader||_F /
    ||W_leader - W0||_F`` and the largest entry gap ``max_abs``."""

    _always: ClassVar[frozenset[str]] = frozenset({"rel", "max_abs"})

    rel: float | None = None
    max_abs: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Checkpoint(JsonRecord):
    """The retention set re-scored after ``batch`` batches (``edits`` edits), every edit so far
    when it is a full checkpoint (``all``), the deviation per layer and, for a shadow
    (``has_leader``), the gap to its leader (None while the two are at different batches)."""

    _derived: ClassVar[frozenset[str]] = frozenset({"has_leader"})

    batch: int
    edits: int
    retention: Scores = field(default_factory=Scores)
    deviation: dict[int, LayerDeviation] = field(default_factory=dict)
    all: Scores | None = None
    leader_gap: dict[int, LeaderGap] | None = None
    has_leader: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], **given: Any) -> Checkpoint:
        point = super().from_json(data, **given)
        point.has_leader = "leader_gap" in data
        return point

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        if self.has_leader:
            out.setdefault("leader_gap", None)
        return out


@dataclass
class Generation(JsonRecord):
    """A fluency prompt and the model's continuation (sampled or greedy: the run's fluency protocol)."""

    prompt: str
    text: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class GlueTask(JsonRecord):
    """Zero-shot accuracy on one GLUE task, the predictions, and their agreement with the unedited
    model's."""

    _always: ClassVar[frozenset[str]] = frozenset({"accuracy"})

    accuracy: float | None
    n: int
    predictions: list[Any] = field(default_factory=list)
    agreement: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Glue(JsonRecord):
    """GLUE per task and the ``mean`` accuracy. JSON: ``{task: {...}, ..., "mean": x}``."""

    _always: ClassVar[frozenset[str]] = frozenset({"mean"})

    tasks: dict[str, GlueTask] = field(default_factory=dict)
    mean: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], **given: Any) -> Glue:
        require_object(cls, data)
        tasks = {k: GlueTask.from_json(v) for k, v in data.items() if k != "mean"}
        return cls(tasks, data.get("mean"), **given)

    def to_json(self) -> dict[str, Any]:
        return {**{k: t.to_json() for k, t in self.tasks.items()}, "mean": self.mean, **self.extra}


@dataclass
class Extras(JsonRecord):
    """Fluency on a subset (its generations kept, their NLL under the unedited model once scored)
    and the GLUE accuracy."""

    fluency: float | None = None
    fluency_n: int | None = None
    generations: list[Generation] | None = None
    generation_nll: float | None = None
    generation_nll_n: int | None = None
    glue: Glue | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class BaseScores(Extras):
    """The unedited model: per-case rows of the first cases scored, the generation check per
    case, their summaries over all of them and over the retention set."""

    cases: list[dict[str, Any]] = field(default_factory=list)
    wild_cases: list[Any] = field(default_factory=list)
    all: Scores = field(default_factory=Scores)
    retention: Scores = field(default_factory=Scores)
    seconds: float = 0.0


@dataclass
class FinalScores(Extras):
    """Every edit written re-scored at the end of a method's stream (``partial``: the stream was
    stopped early), the retention set's share of them, fluency and GLUE; ``cases``: the per-case
    rows of that re-scoring (``case_id`` and each metric, in stream order), which intervals over
    facts and paired comparisons need (:mod:`.intervals`; None in runs recorded before they were
    kept, and where a stream stopped at a full checkpoint reused that checkpoint's summary)."""

    edits: int = 0
    partial: bool = False
    all: Scores = field(default_factory=Scores)
    retention: Scores = field(default_factory=Scores)
    seconds: float = 0.0
    cases: list[dict[str, Any]] | None = None


@dataclass
class MethodRecord(JsonRecord):
    """One method's progress along the stream (resumable), with the settings it was built with."""

    _always: ClassVar[frozenset[str]] = frozenset({"final"})

    batches_done: int = 0
    edits_done: int = 0
    done: bool = False
    seconds_edit: float = 0.0
    seconds_eval: float = 0.0
    seconds_wall: float | None = None
    immediate: list[BatchScores] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    final: FinalScores | None = None
    source_final: FinalScores | None = None
    settings: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def truncate(self, n_batches: int) -> None:
        """Forget the progress after ``n_batches`` batches (to resume from a state saved then)."""
        self.immediate = [e for e in self.immediate if e.batch <= n_batches]
        self.checkpoints = [p for p in self.checkpoints if p.batch <= n_batches]
        self.batches_done = n_batches
        self.edits_done = self.immediate[-1].edits if self.immediate else 0
        self.seconds_edit = round(sum(e.seconds_edit for e in self.immediate), 3)
        self.seconds_eval = round(sum(e.seconds_eval for e in self.immediate), 3)
        self.done, self.final = False, None


@dataclass
class Session(JsonRecord):
    """One invocation of the bench on a run: when, which methods, where."""

    started: str
    methods: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)
    device: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunConfig(JsonRecord):
    """The run at a glance, for reports: model, stream, retention set, checkpoints, layers."""

    model: str
    dataset: str
    n_edits: int
    batch_size: int
    retention_size: int
    checkpoint_batches: list[int] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    stats_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunSettings(JsonRecord):
    """Everything a rerun must share to resume a run: the model, the stream and its scoring
    (``stream``, flattened in JSON), the edit hyperparameters, the stream's case ids, the shadows
    and each method's settings (``method_settings``; v1 wrote FT's as ``ft_lr``/``ft_steps`` and
    UltraEdit's as ``ultraedit``, read into it)."""

    _derived: ClassVar[frozenset[str]] = frozenset({"stream"})

    model: str
    stream: ProtocolConfig
    layers: tuple[int, ...]
    alpha: float
    beta: float
    mom2_weight: float
    stats_tokens: int
    corpus: str
    case_ids: tuple[int | str, ...]
    shadow: tuple[str, ...] = ()
    method_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    anchor_value_norms: bool = False
    value_steps: int | None = None
    extended_from: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], **given: Any) -> RunSettings:
        if not isinstance(data, Mapping) or data.get("format") not in FORMATS:
            got = data.get("format") if isinstance(data, Mapping) else data
            raise StateMismatchError(f"not an rlsedit bench run (settings format {got!r}; this version reads "
                                     f"{', '.join(FORMATS)})")
        data = dict(data)
        del data["format"]
        stream_keys = {f.name for f in fields(ProtocolConfig)}
        stream = {k: data.pop(k) for k in list(data) if k in stream_keys}
        if "full_checkpoints" in stream:
            stream["full_checkpoints"] = tuple(stream["full_checkpoints"])
        legacy = {"ft": {"lr": data.pop("ft_lr", None), "steps": data.pop("ft_steps", None)},
                  "ultraedit": dict(data.pop("ultraedit", None) or {})}
        legacy = {m: {k: v for k, v in s.items() if v is not None} for m, s in legacy.items()}
        data.setdefault("method_settings", {m: s for m, s in legacy.items() if s})
        try:
            config = ProtocolConfig(**stream)
        except TypeError as exc:
            raise StateMismatchError(f"RunSettings: {exc}") from None
        return super().from_json(data, stream=config, **given)

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        if not self.anchor_value_norms:
            del out["anchor_value_norms"]
        return {"format": FORMAT, "model": self.model, **self.stream.to_dict(), **out}


@dataclass
class Results(JsonRecord):
    """A benchmark run: settings, summary, sessions, the unedited model's scores, the methods."""

    _always: ClassVar[frozenset[str]] = frozenset({"base"})

    settings: RunSettings
    config: RunConfig | None = None
    sessions: list[Session] = field(default_factory=list)
    base: BaseScores | None = None
    methods: dict[str, MethodRecord] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], **given: Any) -> Results:
        if isinstance(data, Mapping) and data.get("config") == {}:
            data = {k: v for k, v in data.items() if k != "config"}
        return super().from_json(data, **given)

    def to_json(self) -> dict[str, Any]:
        out = super().to_json()
        out.setdefault("config", {})
        return {k: out[k] for k in ("settings", "config", "sessions", "base", "methods")} | out


def read_results(out: str | Path) -> dict[str, Any] | None:
    """The JSON object in the ``results.json`` of a benchmark folder, or None when there is none."""
    path = Path(out) / RESULTS
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def load_results(out: str | Path) -> Results | None:
    """The :class:`Results` of a benchmark folder, or None when it has no ``results.json``."""
    data = read_results(out)
    return None if data is None else Results.from_json(data)


def write_results(out: str | Path, results: Results) -> None:
    """Write ``results`` atomically as the folder's ``results.json``."""
    atomic_write_text(Path(out) / RESULTS, json.dumps(results.to_json(), indent=1))
