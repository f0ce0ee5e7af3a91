"""The lifelong editor: RLSEdit on a Hugging Face causal LM.

One :class:`Editor` per model. Each call to :meth:`Editor.edit` takes a batch of facts and

1. computes the target hidden state ``z*`` of each fact at the last edited layer (values.py);
2. for each edited layer ``l_i`` (ascending): the keys ``K (u, d_k)`` at the subject's last token,
   the current hidden state ``h`` at the last edited layer, and the innovation
   ``R = (z* - h) / (L - i)`` (the layer's share of the residual: the residual is never used as an
   absolute value);
3. gives the layer's keys and absolute targets ``V = K W + R`` (through the post-MLP norm where
   the family has one: :func:`~rlsedit_llm.adapters.residual.module_target`), each fact's rows scaled by
   ``sqrt(Fact.weight)``, to the method's layer solver
   (:class:`~rlsedit_llm.kernel.rls.LayerRLS`, the verified recursion, by default), whose state
   persists across calls, and writes the new weights into the model.

Facts are checked once, at the door (:func:`~rlsedit_llm.pipeline.facts.checked_facts`), and passed down as a
``list[Fact]``. Every call is a transaction (:mod:`rlsedit_llm.editing.transaction`): whatever exception or signal
arrives at any bytecode (bad fact, NaN, out of memory, Ctrl-C), the model's weights and the
editor's state are either exactly as before the call or exactly as after it.

One owner per model (:class:`~rlsedit_llm.editing.guard.Ownership`, ``editor.ownership``). Every
state-changing call (``edit``, ``absorb``, ``undo``, ``prepare``, ``save``, ``load``) holds a lock
shared by all editors of the model (an ``RLock`` kept on the model object), so calls on one model
run one at a time, and first checks that the model still
holds exactly this editor's state (:meth:`Editor.check_model`: the edited layers bit for bit
against the master copies rounded to the model's dtype, every other parameter and persistent
buffer by a per-tensor digest cached by storage pointer and version counter), refusing with
:class:`StateMismatchError` otherwise (another editor's writes, or the user's, are never
overwritten). The editor whose call last changed the model owns it. Creating or loading a second
editor on a model whose owner's state the model still holds is refused with
:class:`OwnershipError`, unless it takes over explicitly (``take_over=True``; the previous owner is
then refused from its next call on, until its :meth:`Editor.take_over`), or the owner called
:meth:`~Editor.release`. Editors that restore their own weights in turn (the benchmark's round
robin) need nothing: each call checks that the model holds the caller's state.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from rlsedit_llm.adapters.fingerprint import model_fingerprint
from rlsedit_llm.adapters.residual import module_target
from rlsedit_llm.adapters.spec import detect_spec, get_module, read_weight, write_weight
from rlsedit_llm.editing import inspection, persistence
from rlsedit_llm.editing.config import EditConfig, anchor_gram
from rlsedit_llm.editing.guard import EditsDisabled, Ownership, disable_edits, guard_of, named_tensors, tensor_digests
from rlsedit_llm.editing.intake import check_batch, fact_slot
from rlsedit_llm.editing.norm_anchors import anchored_values
from rlsedit_llm.editing.reports import EditRecord, EditReport, fact_report, format_prob
from rlsedit_llm.editing.statistics import check_absorption, layer_moments
from rlsedit_llm.editing.transaction import Transaction
from rlsedit_llm.errors import HyperparameterError, NonFiniteError, ShapeError, StateMismatchError, UnknownEditError
from rlsedit_llm.interrupts import poll_interrupts
from rlsedit_llm.kernel.certificates import Certificate, Deviation
from rlsedit_llm.kernel.protocol import Capabilities, LayerSolver
from rlsedit_llm.kernel.registry import is_layer_method, solver_class
from rlsedit_llm.memory import MemoryPlan, check_fits
from rlsedit_llm.pipeline.facts import Fact, checked_facts
from rlsedit_llm.pipeline.keys import compute_keys, fact_rows, generate_templates, subject_hidden_states
from rlsedit_llm.pipeline.scoring import FactScores, report_scores, score_targets
from rlsedit_llm.pipeline.tokens import needs_bos
from rlsedit_llm.pipeline.values import compute_values, default_value_config

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Editor"]

log = logging.getLogger(__name__)

def _failure_warning(report: EditReport, first_token: list[bool]) -> str:
    """The warning naming the facts of ``report`` that did not take, with what to try.
    ``first_token[i]``: the subject of ``report.failed[i]`` ends at its prompt's first token."""
    failed = report.failed
    facts = "; ".join(
        f"{r.fact.text()!r} -> {r.fact.target!r} (P {format_prob(r.prob_before)} -> {format_prob(r.prob_after)}, "
        f"residual share {r.residual_share:.2f}, NLL at z* {r.value_nll:.2f}"
        + (f", weight {r.weight:g}" if r.weight != 1 else "") + (", retried" if r.retried else "")
        + (", the subject is the prompt's first token" if first else "") + ")"
        for r, first in zip(failed, first_token, strict=True))
    text = (f"edit {report.edit_id}: {len(failed)} of {len(report.facts)} fact(s) did not take (the target is not the "
            f"top-1 continuation of the prompt after the edit): {facts}. To try: raise that fact's weight "
            f"(Fact(..., weight=5) or a record's \"weight\"; EditConfig(retry_weight=5) retries within the call) "
            f"when the residual share is high; more value steps (EditConfig(value=ValueConfig(steps=50))) when the "
            f"NLL at z* is high; or check the subject's spelling in the prompt (the key is read at its last token)")
    if any(first_token):
        text += (". A subject that is the prompt's very first token (this model adds no BOS) is read at the first "
                 "position, a key the anchor protects strongly and unlike the subject's key in other contexts: the "
                 "write then moves the fact in other contexts but hardly in this prompt, and a higher weight does not "
                 "help; put words before the subject (e.g. 'The company {} was founded by')")
    return text


def _check_finite(step, layer: int) -> None:
    """Refuse a proposed step with NaN/inf in its weights, new state tensors or in-place factors."""
    tensors = [step.W, *step.state.values(), *(factor for _attr, factor, _alpha in step.inplace)]
    if not all(torch.isfinite(t).all() for t in tensors):
        raise NonFiniteError(f"layer {layer}: the update produced NaN/inf")


class Editor:
    """Lifelong editor of one model with a layer-solver method (RLSEdit by default).

    Parameters
    ----------
    model : transformers PreTrainedModel (causal LM)
    tokenizer : the model's tokenizer
    config : EditConfig, optional

    Attributes
    ----------
    spec_ : ModelSpec — the detected architecture
    layers_ : tuple of edited layer indices
    templates_ : list[str] — context templates (generated once, seeded, saved with the state)
    solvers_ : dict layer -> LayerSolver — the method's state per layer, on that layer's device
    journal_ : list[EditRecord] — every applied edit, in order
    base_fingerprint_ : str — fingerprint of the model's weights before the first edit
    ownership : Ownership — this editor's claim on the model (take-over, release)
    """

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, config: EditConfig | None = None,
                 *, take_over: bool = False, new_stream: bool = False) -> None:
        self._bind(model, tokenizer, config)
        guard = guard_of(model)
        with guard.lock:
            self.ownership.refuse_if_owned(take_over, "create an editor")
            self.base_fingerprint_ = model_fingerprint(model)  # of the weights before any edit
            persistence.begin_stream(self, new_stream=new_stream)  # StreamError: edits of a stream not loaded
            self.templates_: list[str] | None = None
            self.solvers_: dict[int, LayerSolver] = {}
            self.journal_: list[EditRecord] = []
            self.next_id_ = 0
            self._reference_ = tensor_digests(model)  # what check_model compares the model with
            if take_over:
                self.ownership.hand_over(True)

    def _bind(self, model, tokenizer, config: EditConfig | None) -> None:
        """Model, tokenizer, validated config and everything derived from them."""
        guard_of(model)  # refuses what is not a model, first
        config = config or EditConfig()
        if not isinstance(config, EditConfig):
            raise HyperparameterError(f"config must be an EditConfig; got {type(config).__name__}")
        config.validate()
        if not is_layer_method(config.method):
            raise HyperparameterError(
                f"method {config.method!r} is not a layer-solver method and runs its own editor; "
                "build it with rlsedit_llm.editing.methods.make_editor"
            )
        if not (callable(tokenizer) and hasattr(tokenizer, "decode")):
            raise HyperparameterError(f"tokenizer must be the model's Hugging Face tokenizer; got "
                                      f"{type(tokenizer).__name__} (load both with rlsedit_llm.load_model)")
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.ownership = Ownership(model, self, self._mismatch, self._describe, lambda: self.journal_)
        self.spec_ = detect_spec(model)
        layers = tuple(config.layers) if config.layers is not None else tuple(self.spec_.default_layers)
        bad = [l for l in layers if not (isinstance(l, int) and 0 <= l < self.spec_.n_layers)]
        if bad or sorted(set(layers)) != list(layers):
            raise HyperparameterError(
                f"layers must be distinct ascending ints in [0, {self.spec_.n_layers}); got {layers}"
            )
        self.layers_ = layers
        self.value_config_ = config.value or default_value_config(self.spec_)
        self.mom2_weight_ = config.resolved_mom2_weight(self.spec_.d_k)  # N
        # NAS's reference value norm (EditConfig(anchor_value_norms="nas")), measured at first use.
        self.value_norm_reference_: float | None = None

    @property
    def capabilities(self) -> Capabilities:
        """What this editor's method can do (declared by its layer solver)."""
        return solver_class(self.config.method).capabilities

    @property
    def n_batches_(self) -> int:
        """Batches written so far (edit and absorb calls; retractions do not count)."""
        return self.next_id_

    def held_weights(self) -> dict[int, torch.Tensor]:
        """What the model's edited modules hold now, ``(d_k, d_v)`` in the model's dtype."""
        return {layer: read_weight(self._module(layer)) for layer in self.layers_}

    def weights(self) -> dict[int, torch.Tensor]:
        """The master copies of the edited layers' weights, ``(d_k, d_v)`` in the state dtype."""
        return {layer: solver.W_ for layer, solver in self.solvers_.items()}

    # -- set-up ----------------------------------------------------------------------------
    def _module(self, layer: int):
        return get_module(self.model, self.spec_.edit_module_path.format(layer))

    def prepare(self) -> Editor:
        """Statistics, per-layer states and templates (done lazily by the first edit)."""
        with self._owning("prepare the editor"):
            return self._prepare()

    def _check_finite_model(self) -> None:
        for name, t in named_tensors(self.model):
            if t.is_floating_point() and t.device.type != "meta" and not torch.isfinite(t).all():
                raise NonFiniteError(f"the model's {name} holds NaN or infinity; load an intact model "
                                     f"before editing (nothing was changed)")

    def _check_placement(self) -> None:
        """Refuse, before any work, edited layers offloaded to the ``meta`` device (an edit writes
        their weights) and a state that cannot fit: each layer's state lives on its weight's
        device, so every device is checked for the layers it holds (typed error naming the sizes)."""
        on: dict[torch.device, list[int]] = {}
        for layer in self.layers_:
            on.setdefault(self._module(layer).weight.device, []).append(layer)
        offloaded = on.get(torch.device("meta"), [])
        if offloaded:
            raise HyperparameterError(
                f"edited layer(s) {offloaded} are offloaded (their weights are on the meta device, e.g. accelerate's "
                f"disk offload): an edit writes those weights and keeps their state beside them. Load the model with "
                f"those blocks on a GPU or the CPU (device_map), or edit other layers (EditConfig(layers=...))")
        for device, layers in on.items():
            check_fits(inspection.memory_plan(self, n_layers=len(layers)), device)

    def _prepare(self) -> Editor:
        if self.solvers_ and self.templates_ is not None:
            return self
        self._check_finite_model()
        self._check_placement()
        cfg = self.config
        moments = layer_moments(self.model, self.tokenizer, self.spec_, self.layers_, cfg)
        check_absorption(moments, cfg, self.mom2_weight_)
        dtype = getattr(torch, cfg.state_dtype)
        # Every solver takes (W0, alpha, beta, gram0, dtype=, track_information=, **its settings).
        solver_cls: Callable[..., LayerSolver] = solver_class(cfg.method)
        settings = cfg.resolved_method_config().to_dict()  # the method's own settings, by keyword
        solvers = {}
        for layer in self.layers_:
            W0 = read_weight(self._module(layer))  # (d_k, d_v)
            gram0 = anchor_gram(moments[layer], self.mom2_weight_, dtype=dtype, device=W0.device)
            solvers[layer] = solver_cls(W0, cfg.alpha, cfg.beta, gram0, dtype=dtype,
                                        track_information=cfg.track_information, **settings)
        templates = generate_templates(self.model, self.tokenizer, seed=cfg.template_seed,
                                       n=cfg.n_templates, length=cfg.template_length)
        self.solvers_, self.templates_ = solvers, templates
        return self

    # -- editing -----------------------------------------------------------------------------
    def edit(self, facts: Iterable[Fact | Mapping[str, Any]]) -> EditReport:
        """Apply a batch of facts as one step of the lifelong stream; return a report.

        ``facts``: :class:`Fact` objects, dicts with prompt/subject/target, CounterFact or zsRE
        records. Raises :class:`FactError` (and leaves everything unchanged) for bad facts.

        Each fact's term of the least-squares objective weighs ``Fact.weight``: its key and value
        rows are scaled by ``sqrt(weight)`` before the layer solver absorbs them (exactly weighted
        least squares for every layer-solver method, whose writes are all least squares in
        ``K, V``), and the journal keeps the scaled rows, so undo and replacement stay exact.

        The report says per fact whether the edit took (:attr:`FactReport.success`: the target is
        the top-1 continuation after the edit); facts that did not are listed in
        :attr:`EditReport.failed` and named in a ``logging`` warning of this module, with what to
        try. With ``EditConfig.retry_weight`` they are first solved once more, within this call,
        with their weight multiplied by it (:attr:`FactReport.retried`).
        """
        facts = checked_facts(facts, self.tokenizer)  # the door: checked once, a FactBatch from here on
        check_batch(facts, self.tokenizer, self.model, self.config,
                    replaces=self.config.replace and self.capabilities.retracts)
        seconds: dict[str, float] = {}
        with self._owning("edit"):
            tic = time.perf_counter()
            self._prepare()
            seconds["prepare"] = time.perf_counter() - tic
            with Transaction(self) as txn:
                return self._edit(facts, seconds, txn)

    def absorb(self, facts: Iterable[Fact | Mapping[str, Any]], keys: dict[int, torch.Tensor],
               values: dict[int, torch.Tensor]) -> EditReport:
        """Write a batch whose keys and absolute values were computed elsewhere.

        The same step as :meth:`edit` without the value optimisation and key computation: for
        every edited layer the solver absorbs ``keys[layer]`` (u, d_k) with absolute targets
        ``values[layer]`` (u, d_v). Typical input is another editor's journal entry
        (``EditRecord.keys/values``): two solvers fed one stream of keys and values differ only in
        the solver, and a journal can be replayed onto a fresh editor. No earlier fact is
        retracted (``replace`` is not applied). Transactional like :meth:`edit`; shapes and
        finiteness are checked first.

        The rows are taken as given: ``Fact.weight`` is not applied (a journal's rows already
        carry their weights, scaled by ``sqrt(weight)``; scale rows yourself to weigh them), and
        nothing is scored (the report has no facts).
        """
        facts = checked_facts(facts, self.tokenizer, purpose="absorb")
        if not (isinstance(keys, dict) and isinstance(values, dict)):
            raise ShapeError("keys and values must be dicts layer -> tensor (u, d_k) / (u, d_v)")
        with self._owning("absorb"):
            self._prepare()
            return self._absorb(facts, keys, values)

    def _absorb(self, facts, keys, values) -> EditReport:
        missing = [l for l in self.layers_ if l not in keys or l not in values]
        if missing:
            raise HyperparameterError(f"keys and values must be given for every edited layer; missing {missing}")
        u = len(facts)
        for layer in self.layers_:
            K, V = keys[layer], values[layer]
            d_k, d_v = self.solvers_[layer].shape
            if not (isinstance(K, torch.Tensor) and isinstance(V, torch.Tensor)
                    and K.is_floating_point() and V.is_floating_point()):
                raise ShapeError(f"layer {layer}: keys and values must be floating-point tensors")
            if tuple(K.shape) != (u, d_k) or tuple(V.shape) != (u, d_v):
                raise ShapeError(f"layer {layer}: keys must be ({u}, {d_k}) and values ({u}, {d_v}); "
                                 f"got {tuple(K.shape)} and {tuple(V.shape)}")
            if not (torch.isfinite(K).all() and torch.isfinite(V).all()):
                raise NonFiniteError(f"layer {layer}: keys or values contain NaN or infinity")
        with Transaction(self) as txn:
            tic = time.perf_counter()
            record = EditRecord(self.next_id_, list(facts), {}, {})
            pending = {}
            for layer in self.layers_:
                pending[layer] = self._write(layer, keys[layer], values[layer], record)
            self._commit(pending, record, txn)
            seconds = {"update": time.perf_counter() - tic}
        return EditReport(record.edit_id, self.layers_, [], seconds)

    def _write(self, layer: int, K: torch.Tensor, V: torch.Tensor, record: EditRecord,
               seconds: dict[str, float] | None = None):
        """Propose the write of ``(K, V)`` at ``layer``, put its weights into the model and the
        record; return the step (committed by :meth:`_commit` once every layer succeeded).
        ``seconds``: ``"solve"`` (the solver's propose and its finiteness check) is added to it."""
        solver = self.solvers_[layer]
        tic = time.perf_counter()
        step = solver.propose(K, V)
        _check_finite(step, layer)
        if seconds is not None:
            seconds["solve"] = seconds.get("solve", 0.0) + time.perf_counter() - tic
        write_weight(self._module(layer), step.W)
        record.keys[layer] = K.detach().to("cpu", solver.dtype)
        record.values[layer] = V.detach().to("cpu", solver.dtype)
        return step

    def _commit(self, pending: dict, record: EditRecord, txn: Transaction) -> None:
        """Adopt the layers' steps and journal the record: the point of no return of the call."""
        txn.adopt(pending, [*self.journal_, record], self.next_id_ + 1)

    def _edit(self, facts: list[Fact], seconds: dict[str, float], txn: Transaction) -> EditReport:
        model, tok, spec, layers = self.model, self.tokenizer, self.spec_, self.layers_
        z_layer = layers[-1]

        replaced = self._retract_replaced(facts, txn) if self.config.replace and self.capabilities.retracts else {}

        tic = time.perf_counter()
        # Rewrite prompts (and neighbourhood prompts where facts carry them, for locality).
        before = report_scores(model, tok, facts, after=False, accuracies=self.config.report_accuracies,
                               scorer=score_targets)
        seconds["score"] = time.perf_counter() - tic
        poll_interrupts()

        tic = time.perf_counter()
        assert self.templates_ is not None  # set by _prepare
        values = compute_values(model, tok, spec, z_layer, facts, self.templates_, self.value_config_)
        z_star = values.target  # (u, d_model) float32
        if self.config.anchor_value_norms:  # NAS or the h0 rule (EditConfig.anchor_value_norms)
            z_star = anchored_values(self, facts, values)
        norms = {"z": z_star.norm(dim=1).tolist(), "h0": values.initial.norm(dim=1).tolist()}
        if not torch.isfinite(z_star).all():
            raise NonFiniteError("value optimisation produced NaN/inf; lower the value learning rate")
        seconds["values"] = time.perf_counter() - tic
        poll_interrupts()

        seconds["keys"] = seconds["update"] = 0.0
        weights = [float(f.weight) for f in facts]
        record, pending, residual_before = self._write_layers(facts, weights, z_star, norms, seconds)
        poll_interrupts()
        residual_after, after = self._outcome(facts, z_star, seconds)
        retried = [False] * len(facts)
        factor = self.config.retry_weight
        failed = [j for j, a in enumerate(after) if not a.rewrite.all_correct]
        if factor is not None and failed:
            # Re-propose the whole batch from the same pre-call state (nothing is committed yet:
            # the solvers only proposed; put their weights back into the model first), the failed
            # facts with factor times their weight. Same transaction: still all or nothing.
            log.info("edit %d: %d fact(s) did not take; solving the batch again with their weight x %g",
                     self.next_id_, len(failed), factor)
            for layer in layers:
                write_weight(self._module(layer), self.solvers_[layer].W_)
            for j in failed:
                weights[j] *= factor
                retried[j] = True
            record, pending, _ = self._write_layers(facts, weights, z_star, norms, seconds)
            poll_interrupts()
            residual_after, after = self._outcome(facts, z_star, seconds)

        tic = time.perf_counter()
        self._commit(pending, record, txn)
        seconds["commit"] = time.perf_counter() - tic
        nll = values.final_nll.tolist() if values.final_nll is not None else [float("nan")] * len(facts)
        reports = [
            fact_report(f, b, a, rb, ra, replaced=replaced.get(j, ()), weight=w, retried=t, value_nll=v)
            for j, (f, b, a, rb, ra, w, t, v) in enumerate(
                zip(facts, before, after, residual_before.tolist(), residual_after.tolist(), weights, retried, nll,
                    strict=True)
            )
        ]
        report = EditReport(record.edit_id, layers, reports, seconds, norms=norms)
        log.info("edit %d: %d fact(s) on layers %s, %d took", record.edit_id, len(facts), list(layers),
                 len(facts) - len(report.failed))
        if report.failed:
            _, positions = fact_rows(tok, [r.fact for r in report.failed], ["{}"], bos=needs_bos(spec))
            log.warning("%s", _failure_warning(report, [p == 0 for p in positions]))
        return report

    def _write_layers(self, facts: list[Fact], weights: list[float], z_star: torch.Tensor, norms: dict,
                      seconds: dict[str, float]) -> tuple[EditRecord, dict, torch.Tensor]:
        """Propose and write the batch at every edited layer (ascending; changes no solver).

        Per layer: keys on the model as written so far, the layer's share of the residual
        ``z* - h`` and the absolute targets ``V``; then each fact's key and value rows are scaled
        by ``sqrt(weight)`` (its term of the least-squares objective weighs ``weight``) before the
        solver's propose, so the record (journal) holds the scaled rows. Returns the record (its
        facts carry the weights written), the layers' pending steps and the residual norms before
        the write (u,).

        Row scaling is exact weighted least squares for every layer-solver method, since each
        solves a least-squares problem in the rows of ``K, V``: ``rlsedit``, ``memit_seq`` and
        ``encore`` minimise ``J_t`` whose batch terms become ``sum_i w_i ||k_i W - v_i||^2``
        (``K^T K -> K^T diag(w) K`` in the information, ``K^T r -> K^T diag(w) r`` in the step);
        ``memit`` the same per-batch objective; ``alphaedit`` its projected normal equations, whose
        cumulative key Gram then keeps each past fact's weight too."""
        model, tok, spec, layers = self.model, self.tokenizer, self.spec_, self.layers_
        templates = self.templates_
        assert templates is not None  # set by _prepare
        z_layer = layers[-1]
        written = [f if w == f.weight else dataclasses.replace(f, weight=w)
                   for f, w in zip(facts, weights, strict=True)]
        record = EditRecord(self.next_id_, written, {}, {})
        pending = {}
        residual_before = torch.zeros(0)  # (u,) from the first layer
        for i, layer in enumerate(layers):
            tic = time.perf_counter()
            K = compute_keys(model, tok, spec, layer, facts, templates)  # (u, d_k)
            h = subject_hidden_states(model, tok, spec, z_layer, facts)  # (u, d_model)
            seconds["keys"] += time.perf_counter() - tic

            tic = time.perf_counter()
            delta = z_star.to(h.device) - h  # (u, d_model)
            if i == 0:
                residual_before = delta.norm(dim=1)
            solver = self.solvers_[layer]
            K = K.to(device=solver.device, dtype=solver.dtype)
            R = (delta / (len(layers) - i)).to(device=solver.device, dtype=solver.dtype)  # this layer's share
            # Absolute targets: the module outputs whose effect on the residual is + R (just K W + R
            # unless the family puts a norm after the MLP or scales its branch).
            V = module_target(model, spec, layer, K @ solver.W_, R)  # (u, d_v)
            norms[f"V{layer}"] = V.norm(dim=1).tolist()
            norms[f"KW0{layer}"] = (K @ solver.W0_).norm(dim=1).tolist()
            if any(w != 1 for w in weights):  # weighted least squares = rows scaled by sqrt(weight)
                scale = torch.tensor(weights, dtype=solver.dtype, device=solver.device).sqrt()[:, None]
                K, V = K * scale, V * scale
            pending[layer] = self._write(layer, K, V, record, seconds)
            seconds["update"] += time.perf_counter() - tic
        return record, pending, residual_before

    def _outcome(self, facts: list[Fact], z_star: torch.Tensor,
                 seconds: dict[str, float]) -> tuple[torch.Tensor, list[FactScores]]:
        """After the write: the residual ``||z* - h||`` left at the last edited layer (u,) and the
        facts' scores (rewrite, paraphrase and neighbourhood prompts where they carry them)."""
        tic = time.perf_counter()
        h_after = subject_hidden_states(self.model, self.tokenizer, self.spec_, self.layers_[-1], facts)
        residual_after = (z_star.to(h_after.device) - h_after).norm(dim=1)
        seconds["residual"] = seconds.get("residual", 0.0) + time.perf_counter() - tic
        tic = time.perf_counter()
        after = report_scores(self.model, self.tokenizer, facts, after=True,
                              accuracies=self.config.report_accuracies, scorer=score_targets)
        seconds["score"] += time.perf_counter() - tic
        return residual_after, after

    # -- retraction ----------------------------------------------------------------------------
    def _retract_replaced(self, facts: list[Fact], txn: Transaction) -> dict[int, tuple[int, ...]]:
        """Retract earlier facts with the same (subject, relation) as a new one."""
        slots = {fact_slot(f): j for j, f in enumerate(facts)}
        replaced: dict[int, list[int]] = {}
        for record in list(self.journal_):
            hits = [j for j, f in enumerate(record.facts) if fact_slot(f) in slots]
            if hits:
                self._retract_rows(record, hits, txn, final=False)  # the edit can still fail after this
                for j in hits:
                    replaced.setdefault(slots[fact_slot(record.facts[j])], []).append(record.edit_id)
        return {j: tuple(ids) for j, ids in replaced.items()}

    def _retract_rows(self, record: EditRecord, rows: list[int], txn: Transaction, *, final: bool) -> None:
        """Downdate some rows of a journal entry from every layer and drop them from the journal.

        Every layer's removal is proposed and its weights written before any is committed, so a
        failure there leaves the solvers untouched. ``final``: this is the call's last change
        (undo), adopted by ``txn``; otherwise (a replacement inside an edit, which can still fail
        later) the commits keep a copy of what they change in place, so that a rollback restores
        it bitwise (``d_k^2`` per layer until the edit ends). The record object itself is never
        mutated (a rolled-back transaction restores it)."""
        keep = [j for j in range(len(record.facts)) if j not in rows]
        pending = {}
        for layer in self.layers_:
            K, V = record.keys[layer][rows], record.values[layer][rows]
            pending[layer] = step = self.solvers_[layer].propose_removal(K, V)
            _check_finite(step, layer)
            write_weight(self._module(layer), step.W)
        journal = list(self.journal_)
        index = next(i for i, r in enumerate(journal) if r is record)
        if keep:
            journal[index] = record.rows(keep)
        else:
            del journal[index]
        if final:
            txn.adopt(pending, journal, self.next_id_)
            return
        for layer, step in pending.items():
            self.solvers_[layer].commit(step, log=txn.undo_log, exact=True)
        self.journal_ = journal

    def undo(self, edit_id: int) -> None:
        """Retract a past edit exactly: the solvers' state equals that of the same stream of
        stored keys and values without this edit (see docs/llm/state.md for what that means)."""
        if isinstance(edit_id, bool) or not isinstance(edit_id, numbers.Integral):
            raise UnknownEditError(f"edit ids are ints (EditReport.edit_id); got {edit_id!r} "
                                   f"({type(edit_id).__name__})")
        edit_id = int(edit_id)
        if not self.capabilities.retracts:
            raise HyperparameterError(f"undo needs a method that retracts (e.g. 'rlsedit'); "
                                      f"{self.config.method!r} keeps no exact memory of past edits")
        record = next((r for r in self.journal_ if r.edit_id == edit_id), None)
        if record is None:
            known = [r.edit_id for r in self.journal_]
            raise UnknownEditError(f"no edit with id {edit_id} in the journal (known ids: {known})")
        with self._owning("undo"), Transaction(self) as txn:
            record = next((r for r in self.journal_ if r.edit_id == edit_id), None)
            if record is None:  # retracted by a call that held the lock before this one
                raise UnknownEditError(f"no edit with id {edit_id} in the journal any more")
            self._retract_rows(record, list(range(len(record.facts))), txn, final=True)

    # -- one owner per model, and the model-matches-state check ------------------------------------
    def _edited_params(self) -> dict[int, torch.nn.Parameter]:
        return {layer: self._module(layer).weight for layer in self.solvers_}

    def _mismatch(self, *, fresh: bool = False) -> str | None:
        """None when the model holds exactly this editor's state; otherwise what differs.

        Edited layers (once prepared): bit for bit against the master copies rounded to the model's
        dtype. Everything else: per-tensor digests against those taken when this editor was
        created or loaded (cached by version counter; ``fresh`` recomputes them all)."""
        for layer, solver in self.solvers_.items():
            actual = read_weight(self._module(layer))
            if not torch.equal(actual, solver.W_.to(device=actual.device, dtype=actual.dtype)):
                return (f"layer {layer}: the model's weights differ from the editor's state (they were changed "
                        f"outside the editor, or by another editor)")
        skip = {id(p) for p in self._edited_params().values()}
        skipped = {name for name, t in named_tensors(self.model) if id(t) in skip}
        current = tensor_digests(self.model, skip=skip, fresh=fresh)
        reference = {n: d for n, d in self._reference_.items() if n not in skipped}
        if current.keys() != reference.keys():
            return "the model's parameters are not those this editor was created on (names differ)"
        changed = [n for n, d in reference.items() if current[n] != d]
        if changed:
            where = "an edited layer" if not self.solvers_ and any(
                n == f"{self.spec_.edit_module_path.format(l)}.weight" for l in self.layers_ for n in changed) else \
                "outside the edited layers"
            return (f"{len(changed)} tensor(s) changed {where} since this editor was created or loaded "
                    f"(first: {changed[0]}); its state would no longer reproduce this model")
        return None

    def check_model(self, *, fresh: bool = False) -> None:
        """Raise :class:`StateMismatchError` unless the model holds exactly this editor's state:
        every edited layer its master weights (rounded to the model's dtype), every other parameter
        and persistent buffer the values it had when the editor was created or loaded.

        Cheap: unchanged tensors are recognised by their version counter. ``fresh=True`` re-reads
        every tensor (what :meth:`save` does; it also catches writes through ``.data``)."""
        with guard_of(self.model).lock:
            problem = self._mismatch(fresh=fresh)
        if problem is not None:
            raise StateMismatchError(problem + ". Reload the editor onto the model (Editor.load), or put the "
                                     "weights back, before editing, undoing or saving")

    def _describe(self) -> str:
        return f"{self.config.method}, {len(self.journal_)} edit(s) in its journal"

    def _owning(self, action: str, *, claim: bool = True, fresh: bool = False):
        """The block of one state-changing call (:meth:`Ownership.call`), checking the model
        against this editor's state first."""
        return self.ownership.call(action, claim=claim, check=lambda: self.check_model(fresh=fresh))

    def take_over(self) -> Editor:
        """Make this editor the model's owner. Refused with :class:`StateMismatchError` unless the
        model holds exactly this editor's state; the previous owner can no longer change it."""
        with guard_of(self.model).lock:
            self.check_model()
            self.ownership.hand_over(True)
        return self

    def release(self) -> None:
        """Give up ownership of the model (another editor may then take it, if it matches)."""
        self.ownership.release()

    @property
    def owns_model(self) -> bool:
        """Whether this editor currently owns its model."""
        return self.ownership.owns

    # -- state and files (editing/persistence.py) --------------------------------------------------
    def state_dict(self) -> dict:
        """Everything that defines this editor besides the model and tokenizer (the editor's own
        tensors, kept valid as a snapshot); see :func:`rlsedit_llm.editing.persistence.state_dict`."""
        return persistence.state_dict(self)

    @classmethod
    def from_state_dict(cls, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, state: dict, *,
                        take_over: bool = False) -> Editor:
        """Rebuild an editor from :meth:`state_dict` and write its weights into ``model`` (all or
        nothing; see :func:`rlsedit_llm.editing.persistence.from_state_dict`)."""
        return persistence.from_state_dict(cls, model, tokenizer, state, take_over=take_over)

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the whole lifelong state to ``directory`` atomically; see
        :func:`rlsedit_llm.editing.persistence.save` for what is refused and why."""
        persistence.save(self, directory)

    @classmethod
    def load(cls, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, directory: str | os.PathLike[str], *,
             take_over: bool = False) -> Editor:
        """Restore an editor saved by :meth:`save` onto the base model or the saved edited model;
        see :func:`rlsedit_llm.editing.persistence.load`."""
        return persistence.load(cls, model, tokenizer, directory, take_over=take_over)

    def save_edit_pack(self, path: str | os.PathLike[str], *, dtype: torch.dtype | None = None) -> None:
        """Write only the edited weights' deltas, to apply to a fresh copy of the base model."""
        persistence.save_edit_pack(self, path, dtype=dtype)

    def save_pretrained(self, directory: str | os.PathLike[str], *, safe_serialization: bool = True) -> None:
        """Write the edited model and tokenizer in Hugging Face format with this editor's state in
        ``directory/rlsedit``, atomically; see :func:`rlsedit_llm.editing.pretrained.save_editor`."""
        from rlsedit_llm.editing import pretrained

        pretrained.save_editor(self, directory, safe_serialization=safe_serialization)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], *, device: torch.device | str | None = None,
                        dtype: torch.dtype | None = None, take_over: bool = False) -> Editor:
        """Load a folder written by :meth:`save_pretrained` (model, tokenizer, state; local files
        only) and return the editor; see :func:`rlsedit_llm.editing.pretrained.load_editor`."""
        from rlsedit_llm.editing import pretrained

        return pretrained.load_editor(cls, directory, device=device, dtype=dtype, take_over=take_over)

    def disabled(self) -> EditsDisabled:
        """``with editor.disabled():`` run a block on the base model (``W0`` in the edited layers),
        the edits back bit for bit afterwards, even on an exception or Ctrl-C; the model's lock is
        held meanwhile (see :func:`rlsedit_llm.editing.guard.disable_edits`)."""
        return disable_edits(self)

    def state_bytes(self) -> int:
        """Bytes of the tensors a save writes now (:func:`rlsedit_llm.editing.persistence.state_bytes`;
        for ``rlsedit`` the formula :func:`rlsedit_llm.editing.state.state_size`)."""
        return persistence.state_bytes(self)

    # -- read-only questions (editing/inspection.py) ----------------------------------------------
    def memory_plan(self, *, batch: int = 100, inplace: bool = True, replacing: bool = False) -> MemoryPlan:
        """The memory plan of this editor for edits of ``batch`` facts (:func:`rlsedit_llm.memory.plan`)."""
        return inspection.memory_plan(self, batch=batch, inplace=inplace, replacing=replacing)

    def anchor_grams(self) -> dict[int, torch.Tensor]:
        """The anchor Gram ``N E[k k^T]`` per edited layer whose solver keeps one (prepares the
        editor if needed); see :func:`rlsedit_llm.editing.inspection.anchor_grams`."""
        return inspection.anchor_grams(self)

    def deviations(self) -> dict[int, Deviation]:
        """Per edited layer, ``||W_t - W0||``, the anchor drift and the T3 bounds; see
        :func:`rlsedit_llm.editing.inspection.deviations`."""
        return inspection.deviations(self)

    def certificate(self, *, n_probes: int = 8, seed: int = 0) -> Certificate:
        """Per-layer optimality and drift certificate with the theorems' bounds; see
        :func:`rlsedit_llm.editing.inspection.certificate`."""
        return inspection.certificate(self, n_probes=n_probes, seed=seed)
