"""What an edit returns (:class:`EditReport`, :class:`FactReport`) and what the journal keeps
(:class:`EditRecord`)."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import warnings
from dataclasses import dataclass, field

import torch

from rlsedit_llm.pipeline.facts import Fact
from rlsedit_llm.pipeline.scoring import FactScores, locality_accuracy, portability_accuracy, rephrase_accuracy

__all__ = ["FactReport", "EditReport", "EditRecord", "warn_failures", "fact_report", "format_prob"]


@dataclass
class FactReport:
    """What one edit did to one fact.

    ``success`` is the honest verdict: after the edit the target is the top-1 continuation of the
    prompt (every target token is the argmax given the prompt and the target tokens before it,
    teacher forced: the "rewrite accuracy" of the editing literature, CounterFact's
    ``efficacy_acc``). A higher probability than before is not success.

    EasyEdit's accuracies (token level, teacher forced): ``rewrite_acc`` the share of the
    target's tokens that are the argmax after the rewrite prompt (always computed: it costs
    nothing); ``rephrase_acc`` the same after each paraphrase prompt, averaged over them, and
    ``locality_acc`` the share of the neighbourhood answer's tokens (all neighbourhood prompts
    pooled) whose argmax is **unchanged from before the edit** (EasyEdit's definition; not
    "equals the answer"); ``portability_acc`` the token accuracy of each ``Fact.portability``
    answer after its prompt, averaged. Each is ``None`` unless the fact carries the prompts
    (``Fact.paraphrases`` / ``Fact.neighbourhood`` with an answer: ``neighbourhood_targets``,
    ``neighbourhood_target`` or ``target_true``): they cost extra forward passes.

    ``residual_share`` (property) is ``residual_after / residual_before``: the share of the value
    residual ``||z* - h||`` that the write left (NaN for methods without values). ``value_nll``
    is the value optimisation's final target NLL at ``z*`` (mean over its template rows): when it
    is high the target hidden state itself does not make the target likely, and only a better
    value (more steps, a looser clamp) can help; when it is low but ``residual_share`` is high the
    write was too weak for this key, and a higher ``weight`` usually helps, except when the
    subject is the prompt's first token in a model without BOS (the editor's warning says so;
    ``benchmarks/hard_edits.py`` shows the case).
    """

    fact: Fact
    prob_before: float  # P(target | prompt) before the write
    prob_after: float
    residual_before: float  # ||z* - h|| at the last edited layer before the write
    residual_after: float  # what is left unfitted after the write
    replaced: tuple[int, ...] = ()  # ids of earlier edits this fact retracted
    success: bool = False  # the target is the top-1 continuation after the edit (see above)
    rewrite_acc: float = math.nan  # token accuracy of the target after the prompt, after the edit
    rephrase_acc: float | None = None  # None: the fact carries no paraphrases
    locality_acc: float | None = None  # None: the fact carries no neighbourhood prompts (with an answer)
    portability_acc: float | None = None  # None: the fact carries no portability (prompt, answer) pairs
    weight: float = 1.0  # the weight the written rows carry (the fact's, times retry_weight if retried)
    retried: bool = False  # re-solved with a higher weight in the same call (EditConfig.retry_weight)
    value_nll: float = math.nan  # target NLL at z* after the value optimisation (NaN: no values)

    @property
    def residual_share(self) -> float:
        """``residual_after / residual_before``: the share of the value residual the write left
        (NaN when there is no residual, e.g. fine-tuning)."""
        if not self.residual_before > 0:
            return math.nan
        return self.residual_after / self.residual_before

    def describe(self) -> str:
        """One line: prompt, target, probabilities, verdict, residual share, weight."""
        text = (f"{self.fact.text()!r} -> {self.fact.target!r}: P {format_prob(self.prob_before)} -> "
                f"{format_prob(self.prob_after)}, {'took' if self.success else 'DID NOT TAKE'}")
        if not math.isnan(self.residual_before):
            text += (f", residual {self.residual_before:.3g} -> {self.residual_after:.3g} "
                     f"(share {self.residual_share:.2f})")
        if self.rephrase_acc is not None:
            text += f", rephrase acc {self.rephrase_acc:.2f}"
        if self.locality_acc is not None:
            text += f", locality acc {self.locality_acc:.2f}"
        if self.portability_acc is not None:
            text += f", portability acc {self.portability_acc:.2f}"
        if self.weight != 1 or self.retried:
            text += f", weight {self.weight:g}" + (" (retried)" if self.retried else "")
        return text


def format_prob(p: float) -> str:
    """A probability for a report line: 4 decimals, or 2 significant digits below 0.001 (so that a
    doubling from 3e-05 to 6e-05 still shows)."""
    return f"{p:.4f}" if not 0 < p < 1e-3 else f"{p:.1e}"


def fact_report(fact: Fact, before: FactScores, after: FactScores, residual_before: float = math.nan,
                residual_after: float = math.nan, **fields) -> FactReport:
    """The :class:`FactReport` of ``fact`` from its :func:`~rlsedit_llm.pipeline.scoring.score_facts`
    scores before and after the edit (``fields``: the report's other fields)."""
    return FactReport(fact, before.rewrite.prob, after.rewrite.prob, float(residual_before), float(residual_after),
                      success=after.rewrite.all_correct, rewrite_acc=after.rewrite.accuracy,
                      rephrase_acc=rephrase_accuracy(after), locality_acc=locality_accuracy(before, after),
                      portability_acc=portability_accuracy(after),
                      **fields)


@dataclass
class EditReport:
    """Result of one :meth:`Editor.edit` call.

    ``seconds`` holds the call's stage timings: ``score`` (the report's scoring before and after),
    ``values`` (the value optimisation), ``keys`` (keys and hidden states of every edited layer),
    ``update`` (per layer: targets, the solver's propose and the weight write; ``solve`` is the
    propose's share of it), ``residual`` (the check of what the write left), ``commit`` (adopting
    the layers' steps and journalling); methods without values report fewer.
    """

    edit_id: int
    layers: tuple[int, ...]
    facts: list[FactReport]
    seconds: dict[str, float] = field(default_factory=dict)
    extras: dict[str, float] = field(default_factory=dict)  # method-specific figures (e.g. FT losses)
    # Value-norm instruments, per fact: "z" the written value z* and "h0" the model's norm there
    # before the edit (last edited layer); per edited layer l, "V{l}" the written module outputs and
    # "KW0{l}" the unedited module's output at the same keys. Empty for methods without values.
    norms: dict[str, list[float]] = field(default_factory=dict)

    @property
    def success_rate(self) -> float:
        """Share of facts that took: the target is the top-1 continuation after the edit
        (:attr:`FactReport.success`); 0 for a report without facts (``absorb``)."""
        return sum(f.success for f in self.facts) / max(len(self.facts), 1)

    @property
    def failed(self) -> list[FactReport]:
        """The facts that did not take (:attr:`FactReport.success` false), in batch order."""
        return [f for f in self.facts if not f.success]

    @property
    def improved(self) -> float:
        """Share of facts whose target became more probable than before (not success: a target
        can double its probability and stay far from the top; see :attr:`success_rate`)."""
        return sum(f.prob_after > f.prob_before for f in self.facts) / max(len(self.facts), 1)

    @property
    def efficacy(self) -> float:
        """Deprecated alias of :attr:`improved` (the share more probable than before, which is not
        CounterFact's efficacy); use :attr:`improved`, or :attr:`success_rate` for edits that took."""
        warnings.warn("EditReport.efficacy is deprecated: it is the share of targets more probable than before, "
                      "now EditReport.improved; EditReport.success_rate is the share that took (top-1)",
                      DeprecationWarning, stacklevel=2)
        return self.improved

    def __str__(self) -> str:
        n = len(self.facts)
        head = f"edit {self.edit_id} on layers {list(self.layers)}: {n} fact(s)"
        if n:
            head += (f", {n - len(self.failed)} took (success {100 * self.success_rate:.0f} %), "
                     f"{sum(f.prob_after > f.prob_before for f in self.facts)} more probable than before")
        lines = [head]
        for r in self.facts:
            lines.append(f"  {r.describe()}" + (f" (replaced edit {', '.join(map(str, r.replaced))})" if r.replaced
                                                 else ""))
        if self.seconds:
            lines.append("  seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in self.seconds.items()))
        return "\n".join(lines)


def warn_failures(logger: logging.Logger, report: EditReport, what: str, remedy: str) -> None:
    """Log a warning naming the facts of ``report`` that did not take (nothing when all took):
    ``what`` names the call (e.g. ``"FT batch 3"``), ``remedy`` says what to try."""
    if report.failed:
        logger.warning("%s: %d of %d fact(s) did not take (the target is not the top-1 continuation after the "
                       "edit): %s. To try: %s", what, len(report.failed), len(report.facts),
                       "; ".join(f"{r.fact.text()!r} -> {r.fact.target!r}" for r in report.failed), remedy)


@dataclass
class EditRecord:
    """Journal entry of one applied edit: enough to retract it exactly (downdate)."""

    edit_id: int
    facts: list[Fact]
    # Each fact's rows are scaled by sqrt(fact.weight) (the rows the solver absorbed: undo and
    # replacement retract exactly these); facts carry the weight actually written.
    keys: dict[int, torch.Tensor]  # layer -> K (u, d_k), in the state dtype, on CPU
    values: dict[int, torch.Tensor]  # layer -> V = K W_prev + R (u, d_v), absolute values
    created: float = field(default_factory=time.time)

    def rows(self, keep: list[int]) -> EditRecord:
        """A copy holding only the facts (and their keys and values) at the indices ``keep``."""
        return dataclasses.replace(self, facts=[self.facts[j] for j in keep],
                                   keys={l: K[keep] for l, K in self.keys.items()},
                                   values={l: V[keep] for l, V in self.values.items()})

    def to_state(self) -> dict:
        """The entry as plain data and tensors (the journal part of ``Editor.state_dict()``)."""
        return {"edit_id": self.edit_id, "created": self.created, "facts": [dataclasses.asdict(f) for f in self.facts],
                "keys": dict(self.keys), "values": dict(self.values)}

    @classmethod
    def from_state(cls, entry: dict) -> EditRecord:
        """Inverse of :meth:`to_state` (``KeyError``/``TypeError``/``ValueError`` for a malformed entry)."""
        return cls(int(entry["edit_id"]), [Fact(**f) for f in entry["facts"]],
                   {int(l): K for l, K in entry["keys"].items()}, {int(l): V for l, V in entry["values"].items()},
                   created=entry["created"])

