"""The sequential editing protocol: one model, one stream of N edits in batches of b, per method.

For each method the stream is written batch after batch on the same model (starting from the
pristine base weights). The protocol keeps three kinds of scores apart:

- **immediate**: each batch scored right after it is written (the edit as first applied);
- **retention**: the first ``retention_fraction`` of the stream (whole batches; 10 % by default)
  re-scored at every checkpoint, which gives the retention curve of early edits;
- **final** (retained): every edit of the stream re-scored after the last batch, plus fluency on
  a subset (its generations kept; :func:`score_generations` adds their NLL under the unedited
  model once the caller has it back), the generation check and the zero-shot GLUE accuracy.

Checkpoints also record, per edited layer, the weight deviation ``||W_t - W0||_F``, the anchor
drift ``||K0 (W_t - W0)||_F`` and, for the methods whose weights minimise the cumulative
objective, the theory's bounds T3(a) and T3(b): the method's editor reports them
(:meth:`.runners.MethodRunner.deviations`).

The progress of a method is one :class:`.results.MethodRecord`: :func:`run_method` starts at its
``batches_done`` and calls ``on_batch`` after every batch, so a caller can persist the record
together with the method's state and resume after an interruption.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rlsedit_llm.errors import HyperparameterError
from rlsedit_llm.evaluation import metrics
from rlsedit_llm.evaluation.data import case_scores
from rlsedit_llm.evaluation.protocol_config import ProtocolConfig
from rlsedit_llm.evaluation.results import (
    BaseScores,
    BatchScores,
    Checkpoint,
    Extras,
    FinalScores,
    Generation,
    Glue,
    GlueTask,
    MethodRecord,
    Scores,
    finite,
)
from rlsedit_llm.evaluation.runners import (
    MethodRunner,
    ShadowRunner,
    load_runner,
    make_runner,
    norm_summary,
    restore_weights,
    snapshot_weights,
)
from rlsedit_llm.pipeline.facts import Fact
from rlsedit_llm.pipeline.moment_pass import progress_bar

__all__ = [
    "ProtocolConfig",
    "MethodRunner",
    "ShadowRunner",
    "make_runner",
    "load_runner",
    "norm_summary",
    "restore_weights",
    "snapshot_weights",
    "base_report",
    "extend_base",
    "base_summary",
    "fluency_prompts",
    "fluency_prompt_groups",
    "score_generations",
    "new_record",
    "run_method",
    "immediate_summary",
    "SHADOW_LEADER",
]

log = logging.getLogger(__name__)

#: The method whose keys and values a :class:`ShadowRunner` writes in the benchmark.
SHADOW_LEADER = "rlsedit"


def _clean(row: Mapping[str, Any]) -> dict[str, Any]:
    """A dict with its floats JSON-safe (:func:`.results.finite`)."""
    return {k: (finite(v) if isinstance(v, float) else v) for k, v in row.items()}


def score_cases(model: torch.nn.Module, tokenizer: Any, facts: Sequence[Fact],
                cfg: ProtocolConfig) -> tuple[list[dict], Scores]:
    """Per-case rows of ``facts`` on the model as it is and their summary (with the generation
    check when ``cfg.wild``)."""
    rows = case_scores(cfg.dataset, model, tokenizer, facts, batch_size=cfg.score_batch_size)
    summary = Scores.of(metrics.summarize_cases(rows))
    if cfg.wild:
        summary.wild = finite(float(np.mean(metrics.generation_check(model, tokenizer, facts))))
    return rows, summary


# ----------------------------------------------------------------------------------------------
# The unedited model, fluency and GLUE


def base_report(model: torch.nn.Module, tokenizer: Any, facts: Sequence[Fact], cfg: ProtocolConfig,
                glue: Mapping[str, list], *, n_cases: int | None = None) -> BaseScores:
    """Scores of the unedited model: the first ``n_cases`` cases (default: the retention set;
    extend later with :func:`extend_base`), fluency, GLUE predictions (for before/after)."""
    tic = time.perf_counter()
    base = BaseScores()
    extend_base(base, model, tokenizer, facts, cfg, n_cases or cfg.retention_size)
    _add_extras(base, model, tokenizer, facts, cfg, glue, None)
    base.seconds = round(time.perf_counter() - tic, 2)
    return base


def extend_base(base: BaseScores, model: torch.nn.Module, tokenizer: Any, facts: Sequence[Fact],
                cfg: ProtocolConfig, n_cases: int) -> None:
    """Score the unedited ``model`` on ``facts[:n_cases]`` not scored yet (in place), and update
    ``base.all`` (all scored cases) and ``base.retention``. The model must be unedited."""
    done = len(base.cases)
    if n_cases > done:
        new = list(facts[done:n_cases])
        base.cases += [_clean(r) for r in case_scores(cfg.dataset, model, tokenizer, new,
                                                      batch_size=cfg.score_batch_size)]
        if cfg.wild:
            base.wild_cases += metrics.generation_check(model, tokenizer, new)
    base.all = base_summary(base, len(base.cases))
    base.retention = base_summary(base, cfg.retention_size)


def base_summary(base: BaseScores, n_cases: int) -> Scores:
    """Summary of the unedited model over its first ``n_cases`` scored cases."""
    out = Scores.of(metrics.summarize_cases(base.cases[:n_cases]))
    wild = base.wild_cases[:n_cases]
    if wild:
        out.wild = finite(float(np.mean(wild)))
    return out


def fluency_prompts(facts: Sequence[Fact], n_cases: int) -> list[str]:
    """The prompts fluency is measured on: the first generation prompt of each of the first
    ``n_cases`` cases that have one (full CounterFact); for a data set without any (simplified
    CounterFact, zsRE), their rewrite prompts."""
    cases = facts[:n_cases]
    if not any(f.generation_prompts for f in facts):
        return [f.text() for f in cases]
    return [f.generation_prompts[0] for f in cases if f.generation_prompts]


def fluency_prompt_groups(facts: Sequence[Fact], n_cases: int, protocol: str) -> list[list[str]]:
    """The fluency prompts of the first ``n_cases`` cases, one list per case that has any:
    ``rome``: every generation prompt of the case (ROME generates once from each of a
    CounterFact record's ten); ``greedy-eos``: its first (:func:`fluency_prompts`). A data set
    without generation prompts (simplified CounterFact, zsRE) gives each case its rewrite prompt."""
    if protocol != "rome":
        return [[p] for p in fluency_prompts(facts, n_cases)]
    cases = facts[:n_cases]
    if not any(f.generation_prompts for f in facts):
        return [[f.text()] for f in cases]
    return [list(f.generation_prompts) for f in cases if f.generation_prompts]


def _add_extras(part: Extras, model: torch.nn.Module, tokenizer: Any, facts: Sequence[Fact],
                cfg: ProtocolConfig, glue: Mapping[str, list], base_glue: Glue | None) -> None:
    """Fluency on the subset (with its generations) and GLUE accuracy (with agreement with the
    base predictions), set on ``part``. Fluency follows ``cfg.fluency_protocol``
    (:func:`.metrics.fluency_texts`); it is the mean over cases of the mean statistic of each
    case's generations (ROME's aggregation; one generation per case under ``greedy-eos``), and
    ``fluency_n`` counts the generations."""
    groups = fluency_prompt_groups(facts, cfg.fluency_cases, cfg.fluency_protocol)
    prompts = [p for g in groups for p in g]
    if prompts:
        texts = metrics.fluency_texts(model, tokenizer, prompts, cfg.fluency_protocol, cfg.fluency_tokens,
                                      seed=cfg.stream_seed)
        stats = iter([metrics.fluency_entropy(p, t, cfg.fluency_protocol) for p, t in zip(prompts, texts, strict=True)])
        part.fluency = finite(float(np.mean([np.mean([next(stats) for _ in g]) for g in groups])))
        part.fluency_n = len(prompts)
        # Kept for reading and for score_generations, which needs the unedited model.
        part.generations = [Generation(p, t) for p, t in zip(prompts, texts, strict=False)]
    if glue:
        tasks = {}
        for task, items in glue.items():
            g = metrics.glue_accuracy(model, tokenizer, task, items)
            tasks[task] = GlueTask(finite(g["accuracy"]), g["n"], g["predictions"])
            if base_glue is not None and task in base_glue.tasks:
                before = base_glue.tasks[task].predictions
                same = [a == b for a, b in zip(before, g["predictions"], strict=False)]
                tasks[task].agreement = finite(float(np.mean(same)))
        part.glue = Glue(tasks, finite(float(np.mean([t.accuracy for t in tasks.values()]))))


def score_generations(part: Extras, model: torch.nn.Module, tokenizer: Any, *, batch_size: int = 8) -> bool:
    """Set ``part.generation_nll``: the mean per-token NLL (nats) under ``model``, which must be
    the unedited model, of the fluency generations kept in ``part.generations`` (a base report or
    a method's final scores; :func:`metrics.continuation_nll`). Returns whether it scored
    anything (not when there are no generations or they are scored already)."""
    gens = part.generations or []
    if not gens or part.generation_nll is not None:
        return False
    nll = metrics.continuation_nll(model, tokenizer, [g.prompt for g in gens], [g.text for g in gens],
                                   batch_size=batch_size)
    scored = [x for x in nll if math.isfinite(x)]  # an empty generation (immediate EOS) has no tokens
    part.generation_nll = finite(float(np.mean(scored))) if scored else None
    part.generation_nll_n = len(scored)
    return True


# ----------------------------------------------------------------------------------------------
# Running a stream


def new_record() -> MethodRecord:
    """An empty progress record of one method."""
    return MethodRecord()


@dataclass
class _Stream:
    """One method's stream on the model, with what scoring it needs."""

    runner: MethodRunner
    model: torch.nn.Module
    tokenizer: Any
    facts: Sequence[Fact]
    cfg: ProtocolConfig
    W0: Mapping[int, torch.Tensor]
    grams: Mapping[int, torch.Tensor] | None
    progress: bool = True  # bars of long scoring passes (metrics.scoring_progress)

    def scored(self, written: Sequence[Fact]) -> tuple[list[dict], Scores]:
        with metrics.scoring_progress(self.progress):
            return score_cases(self.model, self.tokenizer, written, self.cfg)

    def checkpoint(self, batch: int, edits: int) -> Checkpoint:
        """The retention set (and at a full checkpoint every edit so far) re-scored, the deviation."""
        point = Checkpoint(batch, edits, self.scored(list(self.facts[:self.cfg.retention_size][:edits]))[1])
        if batch in self.cfg.full_checkpoint_batches():  # every edit so far, to compare with shorter streams
            point.all = self.scored(list(self.facts[:edits]))[1]
        point.deviation = self.runner.deviations(self.W0, self.grams)
        if isinstance(self.runner, ShadowRunner):
            point.has_leader, point.leader_gap = True, self.runner.leader_gap()
        return point

    def write_batch(self, b: int, record: MethodRecord, checkpoints: set[int]) -> BatchScores:
        """Write batch ``b`` (0-based), score it, checkpoint if due; update ``record``."""
        cfg = self.cfg
        batch = list(self.facts[b * cfg.batch_size:(b + 1) * cfg.batch_size])
        tic = time.perf_counter()
        stages = self.runner.edit(batch) or {}
        t_edit = time.perf_counter() - tic
        tic = time.perf_counter()
        entry = BatchScores(b + 1, b * cfg.batch_size + len(batch), round(t_edit, 3),
                            seconds_update=finite(stages.get("update")),
                            residual_ratio=finite(stages.get("residual_ratio")),
                            scores=self.scored(batch)[1],
                            norms={k: finite(v) for k, v in stages.items()
                                   if k.startswith(("value_norm", "layer_value_ratio"))})
        if entry.seconds_update is not None:
            entry.seconds_update = round(entry.seconds_update, 4)
        if b + 1 in checkpoints:
            record.checkpoints.append(self.checkpoint(b + 1, entry.edits))
        t_eval = time.perf_counter() - tic
        entry.seconds_eval = round(t_eval, 3)
        record.immediate.append(entry)
        record.batches_done, record.edits_done = b + 1, entry.edits
        record.seconds_edit = round(record.seconds_edit + t_edit, 3)
        record.seconds_eval = round(record.seconds_eval + t_eval, 3)
        return entry

    def final(self, record: MethodRecord, complete: bool, glue: Mapping[str, list],
              base: BaseScores | None) -> FinalScores:
        """Every edit written re-scored (a stream stopped at a full checkpoint reuses its scores),
        the retention set's share, fluency and GLUE."""
        tic = time.perf_counter()
        written = list(self.facts[:record.edits_done])
        point = record.checkpoints[-1] if record.checkpoints else None
        rows: list[dict] | None = None
        if point is not None and point.batch == record.batches_done and point.all is not None:
            summary = point.all  # a stream stopped at a full checkpoint: already every edit so far
            retention = Scores.from_json({k: v for k, v in point.retention.to_json().items() if k != "wild"})
        else:
            rows, summary = self.scored(written)
            retention = Scores.of(metrics.summarize_cases(rows[:self.cfg.retention_size]))
        final = FinalScores(edits=record.edits_done, partial=not complete, all=summary, retention=retention,
                            cases=None if rows is None else [_clean(r) for r in rows])
        with metrics.scoring_progress(self.progress):
            _add_extras(final, self.model, self.tokenizer, written, self.cfg, glue,
                        None if base is None else base.glue)
        final.seconds = round(time.perf_counter() - tic, 2)
        return final


def run_method(runner: MethodRunner, model: torch.nn.Module, tokenizer: Any, facts: Sequence[Fact],
               cfg: ProtocolConfig, record: MethodRecord, *, W0: Mapping[int, torch.Tensor],
               grams: Mapping[int, torch.Tensor] | None = None, glue: Mapping[str, list] | None = None,
               base: BaseScores | None = None, on_batch: Callable[[MethodRecord], None] | None = None,
               progress: bool = True, until: int | None = None, finish: bool = False) -> MethodRecord:
    """Write the stream ``facts`` with ``runner`` batch by batch, scoring as the protocol says.

    Continues from ``record.batches_done`` (``runner`` must then hold the state after that many
    batches) and updates ``record`` in place; ``on_batch(record)`` is called after every batch and
    after the final scoring. ``W0`` (the base weights) and ``grams`` (the anchor Grams
    ``N E[kk^T]``) measure the deviation of editor-level methods. With ``until``, stops after that
    many batches; the final scoring runs once the whole stream is written, or, with ``finish``,
    on the edits written so far (a stream stopped early: ``record.final.partial`` is true,
    ``record.done`` stays false and a later call continues the stream). Returns ``record``.
    ``progress``: a bar over the batches, and bars over long scoring passes
    (:func:`.metrics.scoring_progress`); ``TQDM_DISABLE`` in the environment switches them off too.
    """
    cfg.validate()
    if len(facts) != cfg.n_edits:
        raise HyperparameterError(f"got {len(facts)} facts for a stream of {cfg.n_edits} edits")
    stream = _Stream(runner, model, tokenizer, facts, cfg, W0, grams, progress)
    checkpoints = set(cfg.checkpoint_batches())
    start = record.batches_done
    stop = cfg.n_batches if until is None else min(until, cfg.n_batches)
    bar = progress_bar(progress, iterable=range(start, stop), desc=runner.name, unit="batch", initial=start,
                       total=cfg.n_batches)
    for b in bar:
        entry = stream.write_batch(b, record, checkpoints)
        bar.set_postfix(edit=f"{entry.seconds_edit:.1f}s", es=entry.scores.efficacy)
        if on_batch is not None:
            on_batch(record)
    bar.close()

    complete = record.batches_done == cfg.n_batches
    stopped = finish and not complete and record.batches_done > 0
    if stopped and (not record.checkpoints or record.checkpoints[-1].batch != record.batches_done):
        tic = time.perf_counter()
        record.checkpoints.append(stream.checkpoint(record.batches_done, record.edits_done))
        record.seconds_eval = round(record.seconds_eval + time.perf_counter() - tic, 3)
    have = record.final
    if (complete and not record.done) or (stopped and (have is None or have.edits != record.edits_done)):
        record.final = stream.final(record, complete, glue or {}, base)
        record.done = complete
        record.seconds_eval = round(record.seconds_eval + record.final.seconds, 3)
        if on_batch is not None:
            on_batch(record)
    return record


def immediate_summary(record: MethodRecord) -> Scores:
    """Case-weighted mean of the per-batch immediate scores, and their harmonic ``score``."""
    entries = record.immediate
    if not entries:
        return Scores()
    rows = [e.scores.to_json() for e in entries]
    keys = [k for k in rows[0] if k not in ("n", "score")]
    out: dict[str, Any] = {"n": sum(e.scores.n for e in entries)}
    for k in keys:
        pairs = [(row[k], e.scores.n) for row, e in zip(rows, entries, strict=False) if row.get(k) is not None]
        w = sum(n for _, n in pairs)
        out[k] = finite(sum(v * n for v, n in pairs) / w) if w else None
    parts = [out[k] for k in ("efficacy", "generalization", "specificity") if out.get(k) is not None]
    if len(parts) == 3:
        out["score"] = finite(metrics.harmonic_mean(parts))
    return Scores.from_json(out)
