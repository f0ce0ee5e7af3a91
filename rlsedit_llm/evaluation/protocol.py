"""The sequential editing protocol: one model, one stream of N edits in batches of b, per method.

For each method the stream is written batch after batch on the same model (starting from the
pristine base weights). The protocol keeps three kinds of scores apart:

- **immediate**: each batch scored right after it is written (the edit as first applied);
- **retention**: the first ``retention_fraction`` of the stream (whole batches; 10 % by default)
  re-scored at every checkpoint, which gives the retention curve of early edits;
- **final** (retained): every edit of the stream re-scored after the last batch, plus fluency on
  a subset (its generations kept; :func:`score_generations` adds their NLL under the unedited
  model once the caller has it back), the generation check and the zero-shot GLUE accuracy.

Checkpoints also record, per edited layer, the weight deviation ``||W_t - W0||_F`` and the anchor
drift ``||K0 (W_t - W0)||_F = sqrt(tr(D^T N E[kk^T] D))``, and for the methods whose weights are
the minimiser of the cumulative objective (RLSEdit, MEMIT-seq) the theory's bounds T3(a) and T3(b)
(:mod:`rlsedit_theory.bounds`) computed from the stream's keys and values.

The progress of a method is one JSON-serialisable dict (its *record*): :func:`run_method` starts
at ``record["batches_done"]`` and calls ``on_batch`` after every batch, so a caller can persist
the record together with the method's state and resume after an interruption.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from rlsedit_llm.editing.editor import EditConfig
from rlsedit_llm.editing.methods import load_editor, make_editor
from rlsedit_llm.kernel.registry import capabilities, is_layer_method
from rlsedit_llm.errors import HyperparameterError
from rlsedit_llm.pipeline.facts import Fact
from rlsedit_llm.adapters.spec import get_module, read_weight, write_weight
from rlsedit_llm.evaluation import metrics
from rlsedit_llm.evaluation.data import DATASETS, case_scores

__all__ = [
    "ProtocolConfig",
    "MethodRunner",
    "ShadowRunner",
    "make_runner",
    "load_runner",
    "deviation_report",
    "base_report",
    "run_method",
]

log = logging.getLogger(__name__)

#: The method whose keys and values a :class:`ShadowRunner` writes in the benchmark.
SHADOW_LEADER = "rlsedit"


@dataclass(frozen=True)
class ProtocolConfig:
    """What one benchmark stream is and how it is scored.

    Attributes
    ----------
    dataset : one of :data:`rlsedit_llm.evaluation.data.DATASETS`
    n_edits, batch_size : the stream: the first ``n_edits`` records, ``batch_size`` per edit call
    checkpoints : number of evenly spaced re-scoring points (the last batch is always one)
    retention_fraction : share of the stream (rounded up to whole batches) tracked by the
        retention curve
    fluency_cases : cases whose first generation prompt is used for fluency (CounterFact; 0 = off)
    fluency_tokens : greedy tokens generated per fluency prompt
    glue_items : items per GLUE task for the zero-shot accuracy (0 = off)
    wild : also run the generation check (greedy decoding, no teacher forcing)
    score_batch_size : sequences per scoring forward pass
    full_checkpoints : edit counts after which (rounded up to whole batches) *every* edit so far
        is re-scored, so that a long stream can be compared with shorter ones at equal length
    """

    dataset: str = "counterfact"
    n_edits: int = 100
    batch_size: int = 10
    checkpoints: int = 5
    retention_fraction: float = 0.1
    fluency_cases: int = 50
    fluency_tokens: int = 100
    glue_items: int = 0
    wild: bool = True
    score_batch_size: int = 32
    full_checkpoints: tuple[int, ...] = ()

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise HyperparameterError(f"dataset must be one of {DATASETS}; got {self.dataset!r}")
        for name in ("n_edits", "batch_size", "checkpoints", "fluency_tokens", "score_batch_size"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise HyperparameterError(f"{name} must be an int >= 1; got {getattr(self, name)!r}")
        if not 0 < self.retention_fraction <= 1:
            raise HyperparameterError(f"retention_fraction must lie in (0, 1]; got {self.retention_fraction}")
        if self.fluency_cases < 0 or self.glue_items < 0:
            raise HyperparameterError("fluency_cases and glue_items must be >= 0")
        bad = [e for e in self.full_checkpoints if not (isinstance(e, int) and 1 <= e <= self.n_edits)]
        if bad:
            raise HyperparameterError(f"full_checkpoints must be edit counts in [1, {self.n_edits}]; got {bad}")

    @property
    def n_batches(self) -> int:
        return math.ceil(self.n_edits / self.batch_size)

    @property
    def retention_batches(self) -> int:
        """Number of leading batches whose edits form the retention set."""
        return min(self.n_batches, math.ceil(math.ceil(self.retention_fraction * self.n_edits) / self.batch_size))

    @property
    def retention_size(self) -> int:
        return min(self.n_edits, self.retention_batches * self.batch_size)

    def checkpoint_batches(self) -> list[int]:
        """Batch counts after which the retention set is re-scored (1-based, ascending): the end
        of the retention set, ``checkpoints`` evenly spaced points, the full checkpoints and the
        last batch."""
        n = self.n_batches
        points = {self.retention_batches, n} | set(self.full_checkpoint_batches())
        points |= {max(1, round(n * (j + 1) / self.checkpoints)) for j in range(self.checkpoints)}
        return sorted(points)

    def full_checkpoint_batches(self) -> list[int]:
        """Batch counts after which every edit so far is re-scored (before the last batch)."""
        return sorted({math.ceil(e / self.batch_size) for e in self.full_checkpoints} - {self.n_batches})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["full_checkpoints"] = list(self.full_checkpoints)
        return d


# ----------------------------------------------------------------------------------------------
# Methods behind one interface


class MethodRunner:
    """One method's editor on a model: ``edit(facts)``, ``weights()``, ``save(dir)``.

    Wraps the editor of any registered method (:func:`rlsedit_llm.editing.methods.make_editor`):
    an :class:`~rlsedit_llm.Editor` for layer-solver methods (same keys, values, statistics and
    templates; only the solver differs) or an editor-level method such as fine-tuning.
    """

    def __init__(self, name: str, editor):
        self.name, self.editor = name, editor

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(self.editor.layers_)

    def edit(self, facts: Sequence[Fact]) -> dict[str, float]:
        """Write one batch; return the seconds spent per stage (values, keys, update, ...)."""
        report = self.editor.edit(list(facts))
        out = dict(report.seconds)
        # What the write left of the value residual ||z* - h|| at the last edited layer (T2's shrink).
        ratios = [f.residual_after / f.residual_before for f in report.facts if f.residual_before > 0]
        out["residual_ratio"] = sum(ratios) / len(ratios) if ratios else float("nan")
        out.update(norm_summary(report.norms))
        return out

    def weights(self) -> dict[int, torch.Tensor]:
        """Current weights of the edited modules, ``(d_k, d_v)`` float64 on CPU (the solver's
        master copy for layer-solver methods, the module's weight for editor-level ones)."""
        return {l: W.detach().to("cpu", torch.float64) for l, W in self.editor.weights().items()}

    def condition_number(self, layer: int) -> float | None:
        """``cond(G_t)`` of ``layer``'s solver (None for methods without an information matrix)."""
        if not is_layer_method(self.name):
            return None
        return self.editor.solvers_[layer].condition_number()

    @property
    def n_batches(self) -> int:
        """Batches the editor has written."""
        return self.editor.n_batches_

    def edits(self, layer: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (keys, absolute values) batches the solver of ``layer`` has absorbed (layer-solver
        methods; empty for editor-level ones, which keep no journal)."""
        if not is_layer_method(self.name):
            return []
        return [(r.keys[layer], r.values[layer]) for r in self.editor.journal_]

    def save(self, directory) -> None:
        self.editor.save(directory)


class ShadowRunner(MethodRunner):
    """An Editor method that writes its *leader's* keys and values instead of computing its own.

    Batch ``j`` of the shadow absorbs the leader's journal entry ``j``
    (:meth:`~rlsedit_llm.Editor.absorb`): both solvers see one stream of keys and absolute values,
    so any difference between their weights is the solvers' alone, and the value optimisation
    (the expensive part) runs once for both. For ``memit_seq`` shadowing ``rlsedit`` with the same
    ``alpha, beta`` this is also the stream the shadow would compute itself, since the two are the
    same estimator (their weights agree; :meth:`leader_gap` measures by how much). For other
    solvers it is a solver-only comparison, not their own sequential run.
    """

    def __init__(self, name: str, editor, leader: MethodRunner):
        if not (is_layer_method(name) and is_layer_method(leader.name)):
            raise HyperparameterError("a shadow and its leader must both be layer-solver methods: an "
                                      "editor-level method (e.g. 'ft') computes no keys or values")
        if leader.editor.config.replace and leader.editor.capabilities.retracts:
            raise HyperparameterError("the leader must not retract facts (EditConfig.replace=False)")
        super().__init__(name, editor)
        self.leader = leader

    def edit(self, facts: Sequence[Fact]) -> dict[str, float]:
        j = len(self.editor.journal_)
        journal = self.leader.editor.journal_
        if j >= len(journal):
            raise HyperparameterError(f"{self.name} shadows {self.leader.name}, which has written {len(journal)} "
                                      f"batch(es); write batch {j + 1} with the leader first")
        record = journal[j]
        if list(record.facts) != list(facts):
            raise HyperparameterError(f"batch {j + 1} of {self.name} differs from its leader's batch {j + 1}")
        report = self.editor.absorb(record.facts, record.keys, record.values)
        return {"update": report.seconds["update"], "residual_ratio": float("nan")}

    def leader_gap(self) -> dict[str, dict] | None:
        """Per layer ``rel = ||W - W_leader||_F / ||W_leader - W0||_F`` and the largest entry-wise
        gap ``max_abs`` (float64 master copies), or None if the two are at different batches."""
        if len(self.leader.editor.journal_) != len(self.editor.journal_):
            return None
        mine, theirs = self.weights(), self.leader.weights()
        out = {}
        for layer, W in mine.items():
            W0 = self.editor.solvers_[layer].W0_.to("cpu", torch.float64)
            edit = torch.linalg.norm(theirs[layer] - W0)
            gap = W - theirs[layer]
            out[str(layer)] = {"rel": _finite(float(torch.linalg.norm(gap) / edit)) if edit > 0 else None,
                               "max_abs": _finite(float(gap.abs().max()))}
        return out


def norm_summary(norms: dict[str, list[float]]) -> dict[str, float]:
    """Batch means of the value-norm instruments of an :class:`~rlsedit_llm.EditReport`: the
    written value's norm ``value_norm`` and its ratio to the model's norm there before the edit
    ``value_norm_ratio``; per edited layer ``l`` the written outputs' norm over the unedited
    module's output at the same keys, ``layer_value_ratio.l``."""
    if not norms:
        return {}
    z, h0 = torch.tensor(norms["z"]), torch.tensor(norms["h0"])
    out = {"value_norm": float(z.mean()), "value_norm_ratio": float((z / h0.clamp_min(1e-30)).mean())}
    for key in norms:
        if key.startswith("V"):
            v, ref = torch.tensor(norms[key]), torch.tensor(norms["KW0" + key[1:]])
            out[f"layer_value_ratio.{key[1:]}"] = float((v / ref.clamp_min(1e-30)).mean())
    return out


def make_runner(name: str, model, tokenizer, *, edit_config: EditConfig | None = None,
                method_options: dict | None = None, leader: MethodRunner | None = None) -> MethodRunner:
    """A fresh runner of the registered method ``name`` on ``model`` (which must hold the
    pristine base weights). ``edit_config`` (its ``method`` is overridden) sets the layers,
    statistics and hyperparameters shared by the layer-solver methods; ``method_options[name]``
    go to an editor-level method (e.g. ``{"ft": {"lr": 5e-4, "steps": 10}}``). With ``leader``, a
    :class:`ShadowRunner` that writes the leader's keys and values."""
    options = (method_options or {}).get(name, {}) if not is_layer_method(name) else {}
    if leader is not None and not is_layer_method(name):
        raise HyperparameterError(f"{name!r} computes no keys or values, so it cannot shadow a method")
    if edit_config is not None and not is_layer_method(name):
        # the bench's value-norm anchoring applies to the methods that solve values only
        edit_config = replace(edit_config, anchor_value_norms=False)
    editor = make_editor(name, model, tokenizer, edit_config, **options)
    return MethodRunner(name, editor) if leader is None else ShadowRunner(name, editor, leader)


def load_runner(name: str, model, tokenizer, directory, *, leader: MethodRunner | None = None) -> MethodRunner:
    """Restore a runner saved by :meth:`MethodRunner.save` onto the pristine ``model``
    (a :class:`ShadowRunner` of ``leader`` if given)."""
    if leader is not None and not is_layer_method(name):
        raise HyperparameterError(f"{name!r} computes no keys or values, so it cannot shadow a method")
    editor = load_editor(name, model, tokenizer, directory)
    return MethodRunner(name, editor) if leader is None else ShadowRunner(name, editor, leader)


# ----------------------------------------------------------------------------------------------
# Weight deviation and the theory's bounds


def deviation_report(runner: MethodRunner, W0: dict[int, torch.Tensor], grams: dict[int, torch.Tensor] | None,
                     *, alpha: float, beta: float) -> dict[str, dict]:
    """Per edited layer: ``fro = ||W_t - W0||_F`` and ``anchor = ||K0 (W_t - W0)||_F`` with
    ``K0^T K0 = grams[layer]`` (``N E[k k^T]``); for methods that minimise ``J_t``
    (``capabilities.cumulative_objective``) also the bounds
    ``t3a = ||R0|| / (2 sqrt(lambda_min(A)))`` and ``t3b = ||R0|| / (2 sqrt(beta))`` of
    :mod:`rlsedit_theory.bounds` for the stream absorbed so far (``inf`` when undefined); and
    ``cond``, the condition number of the state's information matrix, for methods that keep one.
    """
    from rlsedit_theory import bounds
    from rlsedit_theory.problem import Problem

    out: dict[str, dict] = {}
    weights = runner.weights()
    for layer, W in weights.items():
        D = (W - W0[layer].to(torch.float64)).numpy()  # (d_k, d_v)
        row = {"fro": float(np.linalg.norm(D))}
        gram = grams.get(layer) if grams else None
        if gram is not None:
            G = gram.to("cpu", torch.float64).numpy()
            row["anchor"] = math.sqrt(max(float(np.sum(D * (G @ D))), 0.0))
            edits = runner.edits(layer)
            if capabilities(runner.name).cumulative_objective and edits:
                problem = Problem(W0[layer].to(torch.float64).numpy(), alpha, beta, gram0=G)
                stacked = [(torch.cat([K for K, _ in edits]).to("cpu", torch.float64).numpy(),
                            torch.cat([V for _, V in edits]).to("cpu", torch.float64).numpy())]
                t3a = bounds.t3a_deviation_bound(problem, stacked, W.numpy())
                row["t3a"] = t3a.rhs
                if beta > 0:
                    row["t3b"] = bounds.t3b_anchor_bound(problem, stacked, W.numpy()).rhs
        cond = runner.condition_number(layer)
        if cond is not None:
            row["cond"] = cond
        out[str(layer)] = row
    return out


# ----------------------------------------------------------------------------------------------
# Running a stream


def _finite(x):
    """JSON-safe float (NaN/inf -> None)."""
    return None if x is None or not math.isfinite(x) else float(f"{float(x):.6g}")


def _clean(summary: dict) -> dict:
    return {k: (_finite(v) if isinstance(v, float) else v) for k, v in summary.items()}


def _compact(row: dict) -> dict:
    return {k: (_finite(v) if isinstance(v, float) else v) for k, v in row.items()}


def base_report(model, tokenizer, facts: Sequence[Fact], cfg: ProtocolConfig, glue: dict[str, list], *,
                n_cases: int | None = None) -> dict:
    """Scores of the unedited model: the first ``n_cases`` cases (default: the retention set;
    extend later with :func:`extend_base`), fluency, GLUE predictions (for before/after)."""
    tic = time.perf_counter()
    out = {"cases": [], "wild_cases": []}
    extend_base(out, model, tokenizer, facts, cfg, n_cases or cfg.retention_size)
    out.update(_extras(model, tokenizer, facts, cfg, glue, None))
    out["seconds"] = round(time.perf_counter() - tic, 2)
    return out


def extend_base(base: dict, model, tokenizer, facts: Sequence[Fact], cfg: ProtocolConfig, n_cases: int) -> None:
    """Score the unedited ``model`` on ``facts[:n_cases]`` not scored yet (in place), and update
    ``base["all"]`` (all scored cases) and ``base["retention"]``. The model must be unedited."""
    done = len(base["cases"])
    if n_cases > done:
        new = list(facts[done:n_cases])
        base["cases"] += [_compact(r) for r in case_scores(cfg.dataset, model, tokenizer, new,
                                                           batch_size=cfg.score_batch_size)]
        if cfg.wild:
            base["wild_cases"] += metrics.generation_check(model, tokenizer, new)
    base["all"] = base_summary(base, len(base["cases"]))
    base["retention"] = base_summary(base, cfg.retention_size)


def base_summary(base: dict, n_cases: int) -> dict:
    """Summary of the unedited model over its first ``n_cases`` scored cases."""
    rows = base["cases"][:n_cases]
    out = _clean(metrics.summarize_cases(rows))
    wild = base.get("wild_cases")[:n_cases] if base.get("wild_cases") else []
    if wild:
        out["wild"] = _finite(float(np.mean(wild)))
    return out


def fluency_prompts(facts: Sequence[Fact], n_cases: int) -> list[str]:
    """The prompts fluency is measured on: the first generation prompt of each of the first
    ``n_cases`` cases that have one (full CounterFact); for a data set without any (simplified
    CounterFact, zsRE), their rewrite prompts."""
    cases = facts[:n_cases]
    if not any(f.generation_prompts for f in facts):
        return [f.text() for f in cases]
    return [f.generation_prompts[0] for f in cases if f.generation_prompts]


def _extras(model, tokenizer, facts, cfg: ProtocolConfig, glue: dict[str, list], base_glue: dict | None) -> dict:
    """Fluency on the subset (with its generations) and GLUE accuracy (with agreement with the
    base predictions)."""
    out: dict = {}
    prompts = fluency_prompts(facts, cfg.fluency_cases)
    if prompts:
        texts = metrics.generate_texts(model, tokenizer, prompts, cfg.fluency_tokens)
        out["fluency"] = _finite(metrics.text_fluency(prompts, texts))
        out["fluency_n"] = len(prompts)
        # Kept for reading and for score_generations, which needs the unedited model.
        out["generations"] = [{"prompt": p, "text": t} for p, t in zip(prompts, texts)]
    if glue:
        res = {}
        for task, items in glue.items():
            g = metrics.glue_accuracy(model, tokenizer, task, items)
            res[task] = {"accuracy": _finite(g["accuracy"]), "n": g["n"], "predictions": g["predictions"]}
            if base_glue and task in base_glue:
                before = base_glue[task]["predictions"]
                res[task]["agreement"] = _finite(float(np.mean([a == b for a, b in zip(before, g["predictions"])])))
        res["mean"] = _finite(float(np.mean([res[t]["accuracy"] for t in glue])))
        out["glue"] = res
    return out


def score_generations(part: dict, model, tokenizer, *, batch_size: int = 8) -> bool:
    """Set ``part["generation_nll"]``: the mean per-token NLL (nats) under ``model``, which must be
    the unedited model, of the fluency generations kept in ``part["generations"]`` (a base report
    or a method's final scores; :func:`metrics.continuation_nll`). Returns whether it scored
    anything (not when there are no generations or they are scored already)."""
    gens = part.get("generations") or []
    if not gens or part.get("generation_nll") is not None:
        return False
    nll = metrics.continuation_nll(model, tokenizer, [g["prompt"] for g in gens], [g["text"] for g in gens],
                                   batch_size=batch_size)
    scored = [x for x in nll if math.isfinite(x)]  # an empty generation (immediate EOS) has no tokens
    part["generation_nll"] = _finite(float(np.mean(scored))) if scored else None
    part["generation_nll_n"] = len(scored)
    return True


def new_record() -> dict:
    """An empty progress record of one method."""
    return {"batches_done": 0, "edits_done": 0, "done": False, "seconds_edit": 0.0, "seconds_eval": 0.0,
            "immediate": [], "checkpoints": [], "final": None}


def run_method(runner: MethodRunner, model, tokenizer, facts: Sequence[Fact], cfg: ProtocolConfig,
               record: dict, *, W0: dict[int, torch.Tensor], grams: dict[int, torch.Tensor] | None = None,
               alpha: float = 0.0, beta: float = 1.0, glue: dict[str, list] | None = None,
               base: dict | None = None, on_batch: Callable[[dict], None] | None = None,
               progress: bool = True, until: int | None = None, finish: bool = False) -> dict:
    """Write the stream ``facts`` with ``runner`` batch by batch, scoring as the protocol says.

    Continues from ``record["batches_done"]`` (``runner`` must then hold the state after that
    many batches) and updates ``record`` in place; ``on_batch(record)`` is called after every
    batch and after the final scoring. With ``until``, stops after that many batches; the final
    scoring runs once the whole stream is written, or, with ``finish``, on the edits written so
    far (a stream stopped early: ``record["final"]["partial"]`` is true, ``record["done"]`` stays
    false and a later call continues the stream). Returns ``record``.
    """
    cfg.validate()
    if len(facts) != cfg.n_edits:
        raise HyperparameterError(f"got {len(facts)} facts for a stream of {cfg.n_edits} edits")
    checkpoints = set(cfg.checkpoint_batches())
    full = set(cfg.full_checkpoint_batches())
    retention = list(facts[: cfg.retention_size])

    def scored(written: Sequence[Fact]) -> tuple[list[dict], dict]:
        """Per-case rows and their summary (with the generation check) of ``written``."""
        rows = case_scores(cfg.dataset, model, tokenizer, written, batch_size=cfg.score_batch_size)
        summary = _clean(metrics.summarize_cases(rows))
        if cfg.wild:
            summary["wild"] = _finite(float(np.mean(metrics.generation_check(model, tokenizer, written))))
        return rows, summary

    def checkpoint(batch: int, edits: int) -> dict:
        point = {"batch": batch, "edits": edits, "retention": scored(retention[:edits])[1]}
        if batch in full:  # every edit so far, for comparisons with shorter streams
            point["all"] = scored(list(facts[:edits]))[1]
        point["deviation"] = deviation_report(runner, W0, grams, alpha=alpha, beta=beta)
        if isinstance(runner, ShadowRunner):
            point["leader_gap"] = runner.leader_gap()
        return point

    start = record["batches_done"]
    stop = cfg.n_batches if until is None else min(until, cfg.n_batches)
    bar = tqdm(range(start, stop), desc=runner.name, unit="batch", initial=start,
               total=cfg.n_batches, disable=not progress)
    for b in bar:
        batch = list(facts[b * cfg.batch_size:(b + 1) * cfg.batch_size])
        tic = time.perf_counter()
        stages = runner.edit(batch) or {}
        t_edit = time.perf_counter() - tic

        tic = time.perf_counter()
        entry = {"batch": b + 1, "edits": b * cfg.batch_size + len(batch), "seconds_edit": round(t_edit, 3),
                 "seconds_update": round(float(stages.get("update", float("nan"))), 4),
                 "residual_ratio": _finite(stages.get("residual_ratio")), **scored(batch)[1],
                 **{k: _finite(v) for k, v in stages.items() if k.startswith(("value_norm", "layer_value_ratio"))}}
        if b + 1 in checkpoints:
            record["checkpoints"].append(checkpoint(b + 1, entry["edits"]))
        t_eval = time.perf_counter() - tic
        entry["seconds_eval"] = round(t_eval, 3)
        record["immediate"].append(entry)
        record["batches_done"], record["edits_done"] = b + 1, entry["edits"]
        record["seconds_edit"] = round(record["seconds_edit"] + t_edit, 3)
        record["seconds_eval"] = round(record["seconds_eval"] + t_eval, 3)
        bar.set_postfix(edit=f"{t_edit:.1f}s", es=entry.get("efficacy"))
        if on_batch is not None:
            on_batch(record)
    bar.close()

    complete = record["batches_done"] == cfg.n_batches
    stopped = finish and not complete and record["batches_done"] > 0
    if stopped and (not record["checkpoints"] or record["checkpoints"][-1]["batch"] != record["batches_done"]):
        tic = time.perf_counter()
        record["checkpoints"].append(checkpoint(record["batches_done"], record["edits_done"]))
        record["seconds_eval"] = round(record["seconds_eval"] + time.perf_counter() - tic, 3)
    have = record.get("final") or {}
    if (complete and not record["done"]) or (stopped and have.get("edits") != record["edits_done"]):
        tic = time.perf_counter()
        written = list(facts[: record["edits_done"]])
        point = record["checkpoints"][-1] if record["checkpoints"] else {}
        if point.get("batch") == record["batches_done"] and point.get("all"):
            # A stream stopped at a full checkpoint: those scores are already every edit so far.
            summary = point["all"]
            retention = {k: v for k, v in point["retention"].items() if k != "wild"}
        else:
            rows, summary = scored(written)
            retention = _clean(metrics.summarize_cases(rows[: cfg.retention_size]))
        final = {"edits": record["edits_done"], "partial": not complete, "all": summary, "retention": retention}
        final.update(_extras(model, tokenizer, written, cfg, glue or {}, (base or {}).get("glue")))
        final["seconds"] = round(time.perf_counter() - tic, 2)
        record["final"], record["done"] = final, complete
        record["seconds_eval"] = round(record["seconds_eval"] + final["seconds"], 3)
        if on_batch is not None:
            on_batch(record)
    return record


def immediate_summary(record: dict) -> dict:
    """Case-weighted mean of the per-batch immediate scores, and their harmonic ``score``."""
    entries = record.get("immediate") or []
    if not entries:
        return {}
    keys = [k for k in entries[0] if k not in ("batch", "edits", "seconds_edit", "seconds_update", "seconds_eval",
                                                  "n", "score", "residual_ratio")]
    out: dict = {"n": sum(e["n"] for e in entries)}
    for k in keys:
        pairs = [(e[k], e["n"]) for e in entries if e.get(k) is not None]
        w = sum(n for _, n in pairs)
        out[k] = _finite(sum(v * n for v, n in pairs) / w) if w else None
    parts = [out.get(k) for k in ("efficacy", "generalization", "specificity")]
    if all(p is not None for p in parts):
        out["score"] = _finite(metrics.harmonic_mean(parts))
    return out


def restore_weights(model, spec, W0: dict[int, torch.Tensor]) -> None:
    """Write the saved pre-edit weights back into the edited modules."""
    for layer, W in W0.items():
        write_weight(get_module(model, spec.edit_module_path.format(layer)), W)


def snapshot_weights(model, spec, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Copies of the edited modules' weights ``(d_k, d_v)`` on CPU (module dtype)."""
    return {l: read_weight(get_module(model, spec.edit_module_path.format(l))).cpu() for l in layers}
