"""Plain fine-tuning baseline (method ``"ft"``): Adam on the edited layers' MLP output weights.

Each batch of facts takes ``steps`` Adam steps (a fresh optimiser per batch) on the weights of the
same modules the locate-then-edit methods rewrite (the MLP down-projections of the edited layers),
minimising the target NLL on the rewrite prompt: per fact the mean over the target's tokens,
then the mean over facts. No constraint keeps the weights near the original ones: this is the
"unconstrained FT" of the editing literature and the baseline that forgets.

An editor-level method: it computes no keys or values, so it runs its own loop, but it speaks the
editor protocol (``edit(facts) -> EditReport``, ``weights()``, ``save``/``load``, ``layers_``,
``n_batches_``) and is found through the method registry like the layer solvers.
"""

from __future__ import annotations

import json
import logging
import pickle
import time
from pathlib import Path

import torch

from rlsedit_llm.adapters.spec import detect_spec, get_module, read_weight, write_weight
from rlsedit_llm.editing.editor import EditConfig, EditReport, FactReport
from rlsedit_llm.errors import HyperparameterError, NonFiniteError, StateMismatchError
from rlsedit_llm.kernel.protocol import Capabilities
from rlsedit_llm.kernel.registry import register
from rlsedit_llm.files import atomic_path, atomic_write_text
from rlsedit_llm.pipeline.facts import checked_facts, encode_target
from rlsedit_llm.pipeline.scoring import score_targets
from rlsedit_llm.pipeline.tokens import encode_prompt, input_device, needs_bos, pad_id, right_pad

__all__ = ["FineTuneEditor", "target_nll"]

log = logging.getLogger(__name__)


def target_nll(model, tokenizer, prompts, targets) -> torch.Tensor:
    """Differentiable mean target NLL: per pair the mean over ``" " + target`` tokens after the
    prompt (teacher forced, right padding, no special tokens), then the mean over pairs."""
    bos = needs_bos(model)
    rows = [(encode_prompt(tokenizer, p, bos=bos), encode_target(tokenizer, t))
            for p, t in zip(prompts, targets)]
    device = input_device(model)
    ids, mask = right_pad([p + t for p, t in rows], pad_id(tokenizer), device)  # (b, w)
    weight = torch.zeros((len(rows), ids.shape[1] - 1))  # weight of the prediction at position j -> j+1
    for i, (p, t) in enumerate(rows):
        weight[i, len(p) - 1: len(p) + len(t) - 1] = 1.0 / len(t)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (b, w-1, V)
    logp = torch.log_softmax(logits.float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (b, w-1)
    return (nll * weight.to(device)).sum() / len(rows)


@register
class FineTuneEditor:
    """Sequential fine-tuning of the edited layers' MLP output weights.

    Parameters
    ----------
    model, tokenizer : the causal LM to edit in place, and its tokenizer
    layers : tuple of int or None
        Layers whose MLP output projection is trained (None: the family's default edited block,
        the same layers as :class:`~rlsedit_llm.Editor`).
    lr : float > 0
        Adam learning rate.
    steps : int >= 1
        Adam steps per batch (a fresh optimiser per batch).

    Attributes
    ----------
    spec_, layers_, W0_ (layer -> (d_k, d_v) pre-edit weights, CPU), n_edits_, n_batches_,
    losses_ (per batch: loss before and after its steps).
    """

    name = "ft"
    capabilities = Capabilities()

    def __init__(self, model, tokenizer, *, layers=None, lr: float = 5e-4, steps: int = 10):
        if not (isinstance(lr, (int, float)) and lr > 0 and lr == lr and lr != float("inf")):
            raise HyperparameterError(f"lr must be a finite number > 0; got {lr!r}")
        if not (isinstance(steps, int) and steps >= 1):
            raise HyperparameterError(f"steps must be an int >= 1; got {steps!r}")
        self.model, self.tokenizer, self.lr, self.steps = model, tokenizer, float(lr), steps
        self.spec_ = detect_spec(model)
        layers = tuple(layers) if layers is not None else tuple(self.spec_.default_layers)
        if not layers or any(not (0 <= l < self.spec_.n_layers) for l in layers):
            raise HyperparameterError(f"layers must lie in [0, {self.spec_.n_layers}); got {layers}")
        self.layers_ = layers
        self.W0_ = {l: read_weight(self._module(l)).cpu() for l in layers}
        self.n_edits_ = 0
        self.n_batches_ = 0
        self.losses_: list[tuple[float, float]] = []

    @classmethod
    def from_config(cls, model, tokenizer, config: EditConfig, *, lr: float = 5e-4, steps: int = 10):
        """The fine-tuning editor on ``config.layers`` (its other fields do not apply)."""
        return cls(model, tokenizer, layers=config.layers, lr=lr, steps=steps)

    def _module(self, layer: int):
        return get_module(self.model, self.spec_.edit_module_path.format(layer))

    def edit(self, facts) -> EditReport:
        """Fine-tune on one batch; return an :class:`~rlsedit_llm.EditReport` (its ``extras``
        hold ``loss_before`` and ``loss_after``; there are no value residuals).

        Bad facts raise :class:`FactError` and a failure half-way restores the weights.
        """
        facts = checked_facts(facts, self.tokenizer)
        prompts, targets = [f.text() for f in facts], [f.target for f in facts]
        tic = time.perf_counter()
        scores_before = score_targets(self.model, self.tokenizer, prompts, targets)
        seconds = {"score": time.perf_counter() - tic}
        tic = time.perf_counter()
        modules = [self._module(l) for l in self.layers_]
        params = [m.weight for m in modules]
        saved = [p.detach().clone() for p in params]
        flags = {n: p.requires_grad for n, p in self.model.named_parameters()}
        try:
            for p in self.model.parameters():
                p.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            opt = torch.optim.Adam(params, lr=self.lr)
            with torch.no_grad():
                before = float(target_nll(self.model, self.tokenizer, prompts, targets))
            for _ in range(self.steps):
                opt.zero_grad(set_to_none=True)
                loss = target_nll(self.model, self.tokenizer, prompts, targets)
                if not torch.isfinite(loss):
                    raise NonFiniteError("fine-tuning loss became NaN/inf; lower the learning rate")
                loss.backward()
                opt.step()
            with torch.no_grad():
                after = float(target_nll(self.model, self.tokenizer, prompts, targets))
            if not all(torch.isfinite(p).all() for p in params):
                raise NonFiniteError("fine-tuning produced NaN/inf weights; lower the learning rate")
        except BaseException:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)
            raise
        finally:
            for n, p in self.model.named_parameters():
                p.requires_grad_(flags[n])
                p.grad = None
        seconds["update"] = time.perf_counter() - tic
        scores_after = score_targets(self.model, self.tokenizer, prompts, targets)
        edit_id = self.n_batches_
        self.n_edits_ += len(facts)
        self.n_batches_ += 1
        self.losses_.append((before, after))
        log.info("FT batch %d: loss %.3f -> %.3f", self.n_batches_, before, after)
        nan = float("nan")  # fine-tuning has no value residual
        reports = [FactReport(f, b.prob, a.prob, nan, nan) for f, b, a in zip(facts, scores_before, scores_after)]
        return EditReport(edit_id, self.layers_, reports, seconds,
                          extras={"loss_before": before, "loss_after": after})

    def weights(self) -> dict[int, torch.Tensor]:
        """Current weights of the trained modules, ``(d_k, d_v)`` per layer."""
        return {l: read_weight(self._module(l)) for l in self.layers_}

    # -- persistence: the trained weights and counters (the optimiser restarts every batch) --
    def save(self, directory) -> None:
        """Write the trained weights, then the counters, to ``directory`` (each file atomically)."""
        directory = Path(directory)
        with atomic_path(directory / "weights.pt") as tmp:
            torch.save({l: W.cpu() for l, W in self.weights().items()}, tmp)
        meta = {"layers": list(self.layers_), "lr": self.lr, "steps": self.steps,
                "n_edits": self.n_edits_, "n_batches": self.n_batches_, "losses": self.losses_}
        atomic_write_text(directory / "finetune.json", json.dumps(meta))

    @classmethod
    def load(cls, model, tokenizer, directory) -> "FineTuneEditor":
        """Restore a saved fine-tuning stream onto a pristine copy of the model."""
        directory = Path(directory)
        meta = json.loads((directory / "finetune.json").read_text())
        new = cls(model, tokenizer, layers=meta["layers"], lr=meta["lr"], steps=meta["steps"])
        try:
            # Tensors only: a full unpickle of a file someone handed over can run arbitrary code
            # (torch < 2.6 unpickles everything by default).
            weights = torch.load(directory / "weights.pt", map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise StateMismatchError(
                f"{directory / 'weights.pt'} holds objects other than tensors and is not loaded (only tensors are "
                f"unpickled); save the fine-tuning stream again with FineTuneEditor.save ({exc})") from None
        if not isinstance(weights, dict):
            raise StateMismatchError(f"{directory / 'weights.pt'} is not a dict of per-layer weights; save the stream again")
        for l in new.layers_:
            W = weights.get(l)
            if not isinstance(W, torch.Tensor) or W.shape != new.W0_[l].shape:
                raise StateMismatchError(f"saved fine-tuning weights do not match layer {l} of this model")
        held = {l: weights[l].to(new.W0_[l].dtype) for l in new.layers_}
        bad = [l for l, W in held.items() if not torch.isfinite(W).all()]
        if bad:  # checked for every layer before the first write: all or nothing
            raise NonFiniteError(f"saved fine-tuning weights of layers {bad} hold NaN/inf in the model's dtype; "
                                 f"nothing was loaded")
        for l in new.layers_:
            write_weight(new._module(l), held[l])
        new.n_edits_, new.n_batches_ = int(meta["n_edits"]), int(meta["n_batches"])
        new.losses_ = [tuple(x) for x in meta["losses"]]
        return new
