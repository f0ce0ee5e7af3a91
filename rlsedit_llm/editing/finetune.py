"""Plain fine-tuning baseline (method ``"ft"``): Adam on the edited layers' MLP output weights.

Each batch of facts takes ``steps`` Adam steps (a fresh optimiser per batch) on the weights of the
same modules the locate-then-edit methods rewrite (the MLP down-projections of the edited layers),
minimising the target NLL on the rewrite prompt: per fact the mean over the target's tokens,
then the mean over facts, each fact's term multiplied by its ``Fact.weight`` (1 by default: the
plain mean). Adam's steps do not change when the whole loss is scaled, so weights act relative to
one another: a weight on a one-fact batch, or the same weight on every fact, changes nothing.
No constraint keeps the weights near the original ones: this is the
"unconstrained FT" of the editing literature and the baseline that forgets.

An editor-level method: it computes no keys or values, so it runs its own loop, but it speaks the
editor protocol through :class:`~rlsedit_llm.editing.editor_level.EditorLevelMethod` and is found
through the method registry like the layer solvers.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlsedit_llm.adapters.spec import write_weight
from rlsedit_llm.editing.editor_level import ConfigSetting, EditorLevelMethod
from rlsedit_llm.editing.reports import EditReport, fact_report, warn_failures
from rlsedit_llm.errors import NonFiniteError, StateMismatchError
from rlsedit_llm.files import atomic_path
from rlsedit_llm.kernel.method_config import MethodConfig
from rlsedit_llm.kernel.protocol import Capabilities
from rlsedit_llm.pipeline.facts import checked_facts, encode_target
from rlsedit_llm.pipeline.scoring import report_scores
from rlsedit_llm.pipeline.tokens import encode_prompt, input_device, needs_bos, pad_id, right_pad

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rlsedit_llm.pipeline.facts import Fact

__all__ = ["FineTuneEditor", "FTConfig", "target_nll"]

log = logging.getLogger(__name__)


def target_nll(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Iterable[str],
               targets: Iterable[str], weights: Sequence[float] | None = None) -> torch.Tensor:
    """Differentiable mean target NLL: per pair the mean over ``" " + target`` tokens after the
    prompt (teacher forced, right padding, no special tokens), times the pair's weight
    (``weights``, one per pair; None: all 1), then the mean over pairs."""
    bos = needs_bos(model)
    rows = [(encode_prompt(tokenizer, p, bos=bos), encode_target(tokenizer, t))
            for p, t in zip(prompts, targets, strict=False)]
    factors = [1.0] * len(rows) if weights is None else [float(w) for w in weights]
    if len(factors) != len(rows):
        raise ValueError(f"{len(rows)} prompt/target pairs but {len(factors)} weights")
    device = input_device(model)
    ids, mask = right_pad([p + t for p, t in rows], pad_id(tokenizer), device)  # (b, w)
    weight = torch.zeros((len(rows), ids.shape[1] - 1))  # weight of the prediction at position j -> j+1
    for i, (p, t) in enumerate(rows):
        weight[i, len(p) - 1: len(p) + len(t) - 1] = factors[i] / len(t)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (b, w-1, V)
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (b, w-1)
    return (nll * weight.to(device)).sum() / len(rows)


@dataclass(frozen=True)
class FTConfig(MethodConfig):
    """Fine-tuning's settings (rlsedit's baseline choices; no published lifelong setting is followed).

    lr : Adam learning rate (> 0)
    steps : Adam steps per batch, a fresh optimiser per batch (int >= 1)
    """

    method = "ft"
    lr: float = 5e-4
    steps: int = 10
    checks = {"lr": "positive", "steps": "count"}


class FineTuneEditor(EditorLevelMethod):
    """Sequential fine-tuning of the edited layers' MLP output weights.

    Takes ``model``, ``tokenizer`` and ``layers`` (whose MLP output projections are trained) as
    :class:`~rlsedit_llm.editing.editor_level.EditorLevelMethod` describes, then ``lr`` and
    ``steps``, the fields of :class:`FTConfig`. Attributes: the base class's, and ``losses_`` (per
    batch: loss before and after its steps).
    """

    name = "ft"
    capabilities = Capabilities()
    config_cls = FTConfig
    state_file = "finetune.json"
    method_config: FTConfig
    lr = ConfigSetting(float)
    steps = ConfigSetting(int)

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *,
                 layers: Sequence[int] | None = None, lr: float = FTConfig.lr, steps: int = FTConfig.steps) -> None:
        super().__init__(model, tokenizer, layers, FTConfig.build(lr=lr, steps=steps))
        self.losses_: list[tuple[float, float]] = []

    def edit(self, facts: Iterable[Fact | Mapping[str, Any]]) -> EditReport:
        """Fine-tune on one batch; return an :class:`~rlsedit_llm.EditReport` (its ``extras``
        hold ``loss_before`` and ``loss_after``, the weighted loss; there are no value residuals).
        Each fact's loss term is multiplied by its ``Fact.weight`` (see the module docstring).

        Bad facts raise :class:`FactError` and a failure half-way restores the weights. The facts
        that did not take (:attr:`EditReport.failed`) are named in a ``logging`` warning.
        """
        facts = checked_facts(facts, self.tokenizer)
        prompts, targets = [f.text() for f in facts], [f.target for f in facts]
        weights = [float(f.weight) for f in facts]
        tic = time.perf_counter()
        scores_before = report_scores(self.model, self.tokenizer, facts, after=False,
                               accuracies=self.report_accuracies)
        seconds = {"score": time.perf_counter() - tic}
        tic = time.perf_counter()
        modules = [self._module(l) for l in self.layers_]
        params: list[torch.nn.Parameter] = [m.weight for m in modules]  # type: ignore[misc]
        saved = [p.detach().clone() for p in params]
        flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        try:
            for p in self.model.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.Adam(params, lr=self.lr)
            with torch.no_grad():
                before = float(target_nll(self.model, self.tokenizer, prompts, targets, weights))
            for _ in range(self.steps):
                opt.zero_grad(set_to_none=True)
                loss = target_nll(self.model, self.tokenizer, prompts, targets, weights)
                if not torch.isfinite(loss):
                    raise NonFiniteError("fine-tuning loss became NaN/inf; lower the learning rate")
                loss.backward()
                opt.step()
            with torch.no_grad():
                after = float(target_nll(self.model, self.tokenizer, prompts, targets, weights))
            if not all(torch.isfinite(p).all() for p in params):
                raise NonFiniteError("fine-tuning produced NaN/inf weights; lower the learning rate")
        except BaseException:
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)
            raise
        finally:
            for n, p in self.model.named_parameters():
                p.requires_grad_(flags[n])
                p.grad = None
        seconds["update"] = time.perf_counter() - tic
        scores_after = report_scores(self.model, self.tokenizer, facts, after=True,
                              accuracies=self.report_accuracies)
        edit_id = self.n_batches_
        self.n_edits_ += len(facts)
        self.n_batches_ += 1
        self.losses_.append((before, after))
        log.info("FT batch %d: loss %.3f -> %.3f", self.n_batches_, before, after)
        # fine-tuning has no value residual (NaN)
        reports = [fact_report(f, b, a, weight=w)
                   for f, b, a, w in zip(facts, scores_before, scores_after, weights, strict=True)]
        report = EditReport(edit_id, self.layers_, reports, seconds,
                            extras={"loss_before": before, "loss_after": after})
        warn_failures(log, report, f"FT batch {edit_id}", "more steps or a higher lr (FTConfig), or a higher weight "
                      "for those facts relative to the rest of the batch")
        return report

    # -- persistence: the trained weights, counters and losses (the optimiser restarts every batch) --
    def _save_tensors(self, directory: Path) -> dict:
        with atomic_path(directory / "weights.pt") as tmp:
            torch.save({l: W.cpu() for l, W in self.weights().items()}, tmp)
        return {"losses": self.losses_}

    def _load_tensors(self, directory: Path, meta: dict) -> None:
        try:
            # Tensors only: a full unpickle of a file someone handed over can run arbitrary code
            # (torch < 2.6 unpickles everything by default).
            weights = torch.load(directory / "weights.pt", map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise StateMismatchError(
                f"{directory / 'weights.pt'} holds objects other than tensors and is not loaded (only tensors are "
                f"unpickled); save the fine-tuning stream again with FineTuneEditor.save ({exc})") from None
        if not isinstance(weights, dict):
            raise StateMismatchError(
                f"{directory / 'weights.pt'} is not a dict of per-layer weights; save the stream again"
            )
        for l in self.layers_:
            W = weights.get(l)
            if not isinstance(W, torch.Tensor) or W.shape != self.W0_[l].shape:
                raise StateMismatchError(f"saved fine-tuning weights do not match layer {l} of this model")
        held = {l: weights[l].to(self.W0_[l].dtype) for l in self.layers_}
        bad = [l for l, W in held.items() if not torch.isfinite(W).all()]
        if bad:  # checked for every layer before the first write: all or nothing
            raise NonFiniteError(f"saved fine-tuning weights of layers {bad} hold NaN/inf in the model's dtype; "
                                 f"nothing was loaded")
        for l in self.layers_:
            write_weight(self._module(l), held[l])
        self.losses_ = [tuple(x) for x in meta["losses"]]
