"""The lifelong editor: RLSEdit on a Hugging Face causal LM.

One :class:`Editor` per model. Each call to :meth:`Editor.edit` takes a batch of facts and

1. computes the target hidden state ``z*`` of each fact at the last edited layer (values.py);
2. for each edited layer ``l_i`` (ascending): the keys ``K (u, d_k)`` at the subject's last token,
   the current hidden state ``h`` at the last edited layer, and the innovation
   ``R = (z* - h) / (L - i)`` (the layer's share of the residual: the residual is never used as an
   absolute value);
3. gives the layer's keys and absolute targets ``V = K W + R`` (through the post-MLP norm where
   the family has one: :func:`~rlsedit_llm.adapters.residual.module_target`) to the method's layer solver
   (:class:`~rlsedit_llm.kernel.rls.LayerRLS`, the verified recursion, by default), whose state
   persists across calls, and writes the new weights into the model.

Every call is a transaction (:mod:`rlsedit_llm.editing.transaction`): whatever exception or signal
arrives at any bytecode (bad fact, NaN, out of memory, Ctrl-C), the model's weights and the
editor's state are either exactly as before the call or exactly as after it.

One owner per model. Every state-changing call (``edit``, ``absorb``, ``undo``, ``prepare``,
``save``, ``load``) holds a lock shared by all editors of the model (an ``RLock`` kept on the
model object), so calls on one model run one at a time, and first checks that the model still
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
import math
import numbers
import time
from contextlib import contextmanager

import torch

from rlsedit_llm.adapters.residual import module_target
from rlsedit_llm.adapters.spec import detect_spec, get_module, read_weight, write_weight
from rlsedit_llm.editing import state as state_io
from rlsedit_llm.editing.config import EditConfig, anchor_gram
from rlsedit_llm.editing.packs import write_edit_pack
from rlsedit_llm.editing.guard import guard_of, hand_over, named_tensors, tensor_digests
from rlsedit_llm.editing.reports import EditRecord, EditReport, FactReport
from rlsedit_llm.editing.save_paths import state_path
from rlsedit_llm.editing.transaction import Transaction
from rlsedit_llm.interrupts import deferred_interrupts, poll_interrupts
from rlsedit_llm.errors import (FactError, HyperparameterError, NonFiniteError, OwnershipError, ShapeError,
                                StateMismatchError, UnknownEditError)
from rlsedit_llm.kernel.certificates import certificate
from rlsedit_llm.kernel.memory import check_fits, plan_for_editor
from rlsedit_llm.kernel.protocol import Capabilities, LayerSolver
from rlsedit_llm.kernel.registry import get_method, is_layer_method
from rlsedit_llm.pipeline.facts import Fact, as_facts, encode_target, validate_facts
from rlsedit_llm.pipeline.keys import compute_keys, generate_templates, subject_hidden_states
from rlsedit_llm.pipeline.scoring import score_targets
from rlsedit_llm.adapters.fingerprint import model_fingerprint
from rlsedit_llm.pipeline.stats import second_moments
from rlsedit_llm.pipeline.stats_npz import load_stats
from rlsedit_llm.pipeline.values import ValueConfig, anchor_norms, compute_values, default_value_config

__all__ = ["EditConfig", "Editor", "EditReport", "FactReport", "EditRecord", "anchor_gram", "tensor_digests"]

log = logging.getLogger(__name__)

#: An absorption below this (a typical key moves its output by less than this share of the
#: demanded change) means the regulariser swamps every edit: refused at prepare.
MIN_ABSORPTION = 1e-6
#: An absorption above this (a regulariser a million times weaker than a typical key) leaves the
#: state nearly singular along every edited key: a later undo's downdate ``I - K C K^T`` then
#: cancels to rounding and is refused. Refused at prepare, with the reason.
MAX_ABSORPTION = 1e6


def _max_positions(model) -> int:
    """The longest sequence the model accepts (learned position tables cap it)."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30


def _check_finite(step, layer: int) -> None:
    """Refuse a proposed step with NaN/inf in its weights, new state tensors or in-place factors."""
    tensors = [step.W, *step.state.values(), *(factor for _attr, factor, _alpha in step.inplace)]
    if not all(torch.isfinite(t).all() for t in tensors):
        raise NonFiniteError(f"layer {layer}: the update produced NaN/inf")


def _fact_slot(fact: Fact) -> tuple[str, str]:
    """What makes two facts "the same question": subject and relation (or prompt template)."""
    return (fact.subject, fact.relation_id or fact.prompt)


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
    """

    def __init__(self, model, tokenizer, config: EditConfig | None = None, *, take_over: bool = False):
        self._bind(model, tokenizer, config)
        guard = guard_of(model)
        with guard.lock:
            self._refuse_if_owned(take_over, "create an editor")
            self.base_fingerprint_ = model_fingerprint(model)  # of the weights before any edit
            self.templates_: list[str] | None = None
            self.solvers_: dict[int, LayerSolver] = {}
            self.journal_: list[EditRecord] = []
            self.next_id_ = 0
            self._reference_ = tensor_digests(model)  # what check_model compares the model with
            if take_over:
                hand_over(guard, self, True)

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

    @property
    def capabilities(self) -> Capabilities:
        """What this editor's method can do (declared by its layer solver)."""
        return get_method(self.config.method).capabilities

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

    def prepare(self) -> "Editor":
        """Statistics, per-layer states and templates (done lazily by the first edit)."""
        with self._owning("prepare the editor"):
            return self._prepare()

    def _check_finite_model(self) -> None:
        for name, t in named_tensors(self.model):
            if t.is_floating_point() and t.device.type != "meta" and not torch.isfinite(t).all():
                raise NonFiniteError(f"the model's {name} holds NaN or infinity; load an intact model "
                                     f"before editing (nothing was changed)")

    def _check_absorption(self, moments) -> None:
        """Refuse a regulariser that swamps every edit (e.g. alpha = 1e308: every write a no-op), or
        one so weak that the state is numerically singular (e.g. alpha = 0, mom2_weight = 1e-12)."""
        cfg = self.config
        for layer, m in moments.items():
            m = m.double()
            d_k = m.shape[0]
            trace = float(torch.trace(m))  # E||k||^2
            denom = cfg.alpha + cfg.beta * self.mom2_weight_ * trace / d_k
            absorption = trace / denom if denom > 0 else math.inf
            if not absorption >= MIN_ABSORPTION:
                raise HyperparameterError(
                    f"alpha={cfg.alpha:g}, beta={cfg.beta:g}, mom2_weight={self.mom2_weight_:g} swamp every edit at "
                    f"layer {layer}: a typical key would move its output by {absorption:.1e} of the requested change "
                    f"(every edit a no-op); lower alpha (e.g. alpha <= {trace / 1e-2:.3g}) or the anchor weight"
                )
            if absorption > MAX_ABSORPTION:
                raise HyperparameterError(
                    f"alpha={cfg.alpha:g}, beta={cfg.beta:g}, mom2_weight={self.mom2_weight_:g} are too weak at layer "
                    f"{layer}: the regulariser is {1 / absorption:.1e} of a typical key's weight, so the state is "
                    f"numerically singular along every edited key and undo would fail. Raise alpha (e.g. alpha >= "
                    f"{trace / MAX_ABSORPTION * 10:.3g}) or mom2_weight"
                )

    def _prepare(self) -> "Editor":
        if self.solvers_ and self.templates_ is not None:
            return self
        self._check_finite_model()
        # Refuse up front (typed error naming the sizes) an edit whose state cannot fit the device.
        check_fits(plan_for_editor(self), self._module(self.layers_[0]).weight.device)
        cfg = self.config
        if cfg.precomputed_stats is not None:  # MEMIT/ROME files bound to these weights
            moments = load_stats(self.model, self.spec_, list(self.layers_), cfg.precomputed_stats)
        else:
            moments = second_moments(
                self.model, self.tokenizer, self.spec_, list(self.layers_), corpus=cfg.corpus,
                n_tokens=cfg.stats_tokens, cache_dir=cfg.cache_dir,
                max_length=min(cfg.stats_max_length, _max_positions(self.model)),
            )
        self._check_absorption(moments)
        dtype = getattr(torch, cfg.state_dtype)
        solver_cls = get_method(cfg.method)
        solvers = {}
        for layer in self.layers_:
            W0 = read_weight(self._module(layer))  # (d_k, d_v)
            gram0 = anchor_gram(moments[layer], self.mom2_weight_, dtype=dtype, device=W0.device)
            solvers[layer] = solver_cls(W0, cfg.alpha, cfg.beta, gram0, dtype=dtype,
                                        track_information=cfg.track_information)
        templates = generate_templates(self.model, self.tokenizer, seed=cfg.template_seed,
                                       n=cfg.n_templates, length=cfg.template_length)
        self.solvers_, self.templates_ = solvers, templates
        return self

    # -- editing -----------------------------------------------------------------------------
    def edit(self, facts) -> EditReport:
        """Apply a batch of facts as one step of the lifelong stream; return a report.

        ``facts``: :class:`Fact` objects, dicts with prompt/subject/target, CounterFact or zsRE
        records. Raises :class:`FactError` (and leaves everything unchanged) for bad facts.
        """
        facts = as_facts(facts)
        if not facts:
            raise FactError("no facts given: pass at least one fact to edit")
        validate_facts(facts, self.tokenizer)
        self._check_batch(facts)
        seconds: dict[str, float] = {}
        with self._owning("edit"):
            tic = time.perf_counter()
            self._prepare()
            seconds["prepare"] = time.perf_counter() - tic
            with Transaction(self) as txn:
                return self._edit(facts, seconds, txn)

    def _check_batch(self, facts: list[Fact]) -> None:
        """Lengths within the model's positions; with ``replace``, one fact per (subject, relation)."""
        limit = _max_positions(self.model)
        margin = self.config.template_length + 8 if self.config.n_templates else 2  # context prefix, BOS
        for i, f in enumerate(facts):
            n = len(self.tokenizer(f.text(), add_special_tokens=True)["input_ids"]) + len(encode_target(self.tokenizer, f.target))
            if n + margin > limit:
                raise FactError(f"fact #{i} ({f.describe()}): prompt and target take {n} tokens, plus up to {margin} "
                                f"of context template; the model accepts {limit} positions. Shorten the prompt or target")
        if self.config.replace and self.capabilities.retracts:
            seen: dict[tuple[str, str], int] = {}
            for i, f in enumerate(facts):
                slot = _fact_slot(f)
                if slot in seen:
                    raise FactError(
                        f"fact #{i} ({f.describe()}): same subject and relation as fact #{seen[slot]} in this batch. "
                        f"With EditConfig(replace=True) a later fact for a (subject, relation) replaces the earlier "
                        f"one, so a batch may hold only one; keep the one you want (or use replace=False)")
                seen[slot] = i

    def absorb(self, facts, keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor]) -> EditReport:
        """Write a batch whose keys and absolute values were computed elsewhere.

        The same step as :meth:`edit` without the value optimisation and key computation: for
        every edited layer the solver absorbs ``keys[layer]`` (u, d_k) with absolute targets
        ``values[layer]`` (u, d_v). Typical input is another editor's journal entry
        (``EditRecord.keys/values``): two solvers fed one stream of keys and values differ only in
        the solver, and a journal can be replayed onto a fresh editor. No earlier fact is
        retracted (``replace`` is not applied). Transactional like :meth:`edit`; shapes and
        finiteness are checked first.
        """
        facts = as_facts(facts)
        if not facts:
            raise FactError("no facts given: pass at least one fact to absorb")
        validate_facts(facts, self.tokenizer)
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

    def _write(self, layer: int, K: torch.Tensor, V: torch.Tensor, record: EditRecord):
        """Propose the write of ``(K, V)`` at ``layer``, put its weights into the model and the
        record; return the step (committed by :meth:`_commit` once every layer succeeded)."""
        solver = self.solvers_[layer]
        step = solver.propose(K, V)
        _check_finite(step, layer)
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
        before = score_targets(model, tok, [f.text() for f in facts], [f.target for f in facts])
        seconds["score"] = time.perf_counter() - tic
        poll_interrupts()

        tic = time.perf_counter()
        values = compute_values(model, tok, spec, z_layer, facts, self.templates_, self.value_config_)
        z_star = values.target  # (u, d_model) float32
        if self.config.anchor_value_norms:
            z_star = anchor_norms(z_star, values.initial)
        norms = {"z": z_star.norm(dim=1).tolist(), "h0": values.initial.norm(dim=1).tolist()}
        if not torch.isfinite(z_star).all():
            raise NonFiniteError("value optimisation produced NaN/inf; lower the value learning rate")
        seconds["values"] = time.perf_counter() - tic
        poll_interrupts()

        seconds["keys"] = seconds["update"] = 0.0
        record = EditRecord(self.next_id_, list(facts), {}, {})
        pending = {}
        residual_before = None
        for i, layer in enumerate(layers):
            tic = time.perf_counter()
            K = compute_keys(model, tok, spec, layer, facts, self.templates_)  # (u, d_k)
            h = subject_hidden_states(model, tok, spec, z_layer, facts)  # (u, d_model)
            seconds["keys"] += time.perf_counter() - tic

            tic = time.perf_counter()
            delta = z_star.to(h.device) - h  # (u, d_model)
            if residual_before is None:
                residual_before = delta.norm(dim=1)
            solver = self.solvers_[layer]
            K = K.to(device=solver.device, dtype=solver.dtype)
            R = (delta / (len(layers) - i)).to(device=solver.device, dtype=solver.dtype)  # this layer's share
            # Absolute targets: the module outputs whose effect on the residual is + R (just K W + R
            # unless the family puts a norm after the MLP or scales its branch).
            V = module_target(model, spec, layer, K @ solver.W_, R)  # (u, d_v)
            pending[layer] = self._write(layer, K, V, record)
            norms[f"V{layer}"] = V.norm(dim=1).tolist()
            norms[f"KW0{layer}"] = (K @ solver.W0_).norm(dim=1).tolist()
            seconds["update"] += time.perf_counter() - tic

        poll_interrupts()
        h_after = subject_hidden_states(model, tok, spec, z_layer, facts)
        residual_after = (z_star.to(h_after.device) - h_after).norm(dim=1)
        after = score_targets(model, tok, [f.text() for f in facts], [f.target for f in facts])

        self._commit(pending, record, txn)
        reports = [
            FactReport(f, b.prob, a.prob, float(rb), float(ra), replaced.get(j, ()))
            for j, (f, b, a, rb, ra) in enumerate(zip(facts, before, after, residual_before, residual_after))
        ]
        log.info("edit %d: %d fact(s) on layers %s", record.edit_id, len(facts), list(layers))
        return EditReport(record.edit_id, layers, reports, seconds, norms=norms)

    # -- retraction ----------------------------------------------------------------------------
    def _retract_replaced(self, facts: list[Fact], txn: Transaction) -> dict[int, tuple[int, ...]]:
        """Retract earlier facts with the same (subject, relation) as a new one."""
        slots = {_fact_slot(f): j for j, f in enumerate(facts)}
        replaced: dict[int, list[int]] = {}
        for record in list(self.journal_):
            hits = [j for j, f in enumerate(record.facts) if _fact_slot(f) in slots]
            if hits:
                self._retract_rows(record, hits, txn, final=False)  # the edit can still fail after this
                for j in hits:
                    replaced.setdefault(slots[_fact_slot(record.facts[j])], []).append(record.edit_id)
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
            journal[index] = dataclasses.replace(
                record,
                facts=[record.facts[j] for j in keep],
                keys={l: K[keep] for l, K in record.keys.items()},
                values={l: V[keep] for l, V in record.values.items()},
            )
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

    # -- state (the PyTorch/PEFT convention) -----------------------------------------------------
    def state_dict(self) -> dict:
        """Everything that defines this editor besides the model and tokenizer.

        Tensors are the editor's own (not copies), and the dict stays a valid snapshot: an edit
        that updates a tensor in place (``LayerRLS``'s ``C``) copies it first after this call.
        :meth:`from_state_dict` rebuilds the editor; :mod:`rlsedit_llm.editing.state` writes and
        reads it as files.
        """
        with guard_of(self.model).lock:  # never a half-written state of a concurrent call
            return self._state_dict()

    def _state_dict(self, *, snapshot: bool = True) -> dict:
        return {
            "config": self.config.to_dict(),
            "value_config": dataclasses.asdict(self.value_config_),
            "spec": state_io.spec_summary(self.spec_),
            "model_class": type(self.model).__name__,
            "layers": list(self.layers_),
            "templates": self.templates_,
            "next_id": self.next_id_,
            "base_fingerprint": self.base_fingerprint_,
            "solvers": {layer: solver.state_dict(snapshot=snapshot) for layer, solver in self.solvers_.items()},
            "journal": [{"edit_id": r.edit_id, "created": r.created,
                         "facts": [dataclasses.asdict(f) for f in r.facts],
                         "keys": dict(r.keys), "values": dict(r.values)} for r in self.journal_],
        }

    @classmethod
    def from_state_dict(cls, model, tokenizer, state: dict, *, take_over: bool = False) -> "Editor":
        """Rebuild an editor from :meth:`state_dict` and write its weights into ``model``'s edited
        layers (all or nothing). ``model`` must be the base model or already the edited one; the
        caller checks which (:func:`rlsedit_llm.editing.state.read_state` does it by fingerprint).
        Refused with :class:`OwnershipError` while another editor owns the model, unless
        ``take_over``; the new editor owns the model.
        """
        guard = guard_of(model)
        with deferred_interrupts(), guard.lock:
            editor = cls._from_state_dict(model, tokenizer, state, take_over)
            editor._install(guard, take_over)
            return editor

    @classmethod
    def _from_state_dict(cls, model, tokenizer, state: dict, take_over: bool, share: bool = True) -> "Editor":
        """The editor of ``state``, not yet written into the model (see :meth:`_install`).
        ``share``: the state's tensors may be held elsewhere (copied before an in-place change);
        ``False`` when they were just read from files."""
        try:
            config = EditConfig.from_dict(state["config"])
            value_config = ValueConfig(**state["value_config"])
        except (TypeError, KeyError) as exc:  # fields this version does not know
            raise StateMismatchError(f"the saved hyperparameters do not fit this rlsedit version ({exc})") from None
        editor = cls.__new__(cls)
        editor._bind(model, tokenizer, config)
        editor.solvers_, editor.journal_ = {}, []
        editor._refuse_if_owned(take_over, "load an editor state")
        if list(editor.layers_) != list(state["layers"]):
            raise StateMismatchError(f"saved layers {state['layers']} differ from {list(editor.layers_)}")
        solver_cls = get_method(config.method)
        solvers = {}
        for layer, solver_state in state["solvers"].items():
            layer = int(layer)
            device = editor._module(layer).weight.device
            solvers[layer] = solver_cls.from_state_dict(solver_state, device=device, share=share)
        editor.value_config_ = value_config
        editor.templates_ = state["templates"]
        editor.base_fingerprint_ = state["base_fingerprint"]
        editor.next_id_ = int(state["next_id"])
        try:
            journal = [
                EditRecord(int(e["edit_id"]), [Fact(**f) for f in e["facts"]],
                           {int(l): K for l, K in e["keys"].items()}, {int(l): V for l, V in e["values"].items()},
                           created=e["created"])
                for e in state["journal"]
            ]
        except (TypeError, KeyError, ValueError) as exc:
            raise StateMismatchError(f"the saved journal is malformed ({exc!r}); the save is damaged") from None
        editor.solvers_ = solvers
        editor.journal_ = journal
        return editor

    def _install(self, guard, take_over: bool, *, edited_fingerprint: str | None = None) -> None:
        """Write this editor's weights into the model, check the result (against
        ``edited_fingerprint`` when given) and make the editor the model's owner: all or nothing.
        On any exception or signal the model gets its own weights back and the owner is unchanged."""
        before = {layer: read_weight(self._module(layer)) for layer in self.solvers_}  # the model's own
        previous = guard.owner
        displaced = getattr(previous, "_displaced", False)
        try:
            for layer, solver in self.solvers_.items():
                write_weight(self._module(layer), solver.W_)
            if edited_fingerprint is not None and model_fingerprint(self.model) != edited_fingerprint:
                raise StateMismatchError("after writing the saved weights the model does not match the saved "
                                         "edited model; the base model or the save is inconsistent (the model's "
                                         "own weights were put back)")
            self._reference_ = tensor_digests(self.model)
            self.check_model()
            hand_over(guard, self, take_over)
        except BaseException:
            with deferred_interrupts():
                for layer, W in before.items():
                    write_weight(self._module(layer), W)
                guard.owner = previous
                if previous is not None:
                    previous._displaced = displaced
            raise

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

    def _refuse_if_owned(self, take_over: bool, action: str) -> None:
        """OwnershipError if another editor owns the model and its edits are still in it."""
        owner = guard_of(self.model).owner
        if owner is None or owner is self or take_over or owner._mismatch() is not None:
            return
        raise OwnershipError(
            f"cannot {action}: this model is owned by another editor ({owner.config.method}, {len(owner.journal_)} edit(s) in its "
            f"journal) whose state the model holds; two editors on one model overwrite each other's writes. "
            f"Continue with that editor (rlsedit_llm.editor_of(model) for the one rlsedit_llm.edit keeps), "
            f"call its release(), or take the model over explicitly (take_over=True)"
        )

    @contextmanager
    def _owning(self, action: str, *, claim: bool = True, fresh: bool = False):
        """Hold the model's lock, refuse re-entry and foreign ownership, check the model against
        the state, and (``claim``) make this editor the model's owner for the block. Signals are
        deferred for the whole block: Ctrl-C is delivered at the call's safe points
        (:func:`~rlsedit_llm.interrupts.poll_interrupts`) or when it ends."""
        guard = guard_of(self.model)
        with deferred_interrupts(), guard.lock:
            if guard.busy:
                raise OwnershipError(f"cannot {action}: another editor call on this model is running in this "
                                     f"thread (a re-entrant call from a hook or callback); call it afterwards")
            if getattr(self, "_displaced", False):
                raise OwnershipError(f"cannot {action}: another editor took this model over (take_over=True); "
                                     f"this editor may no longer change it. Call its take_over() to take the "
                                     f"model back (checked against this editor's state)")
            broken = getattr(self, "_broken_", None)
            if broken:
                raise StateMismatchError(f"cannot {action}: {broken}; this editor's state can no longer be trusted. "
                                         f"Load the last save onto the base model (Editor.load)")
            self.check_model(fresh=fresh)  # another editor's writes in the model: StateMismatchError
            previous, journal = guard.owner, [id(r) for r in self.journal_]
            with guard.call:
                try:
                    if claim:
                        guard.owner = self
                    yield
                except BaseException:
                    # a call that changed nothing (rolled back) leaves ownership as it was: a failed
                    # first edit must not lock a corrected retry out
                    if claim and [id(r) for r in self.journal_] == journal:
                        guard.owner = previous
                    raise

    def take_over(self) -> "Editor":
        """Make this editor the model's owner. Refused with :class:`StateMismatchError` unless the
        model holds exactly this editor's state; the previous owner can no longer change it."""
        guard = guard_of(self.model)
        with guard.lock:
            self.check_model()
            hand_over(guard, self, True)
        return self

    def release(self) -> None:
        """Give up ownership of the model (another editor may then take it, if it matches)."""
        guard = guard_of(self.model)
        with guard.lock:
            if guard.owner is self:
                guard.owner = None

    @property
    def owns_model(self) -> bool:
        """Whether this editor currently owns its model."""
        return guard_of(self.model).owner is self

    # -- persistence and certificates -----------------------------------------------------------
    def save(self, directory) -> None:
        """Write the whole lifelong state to ``directory`` atomically (see :mod:`.state`).

        Refused with :class:`StateMismatchError` when the model no longer holds this editor's
        state (every tensor re-read: the save must load onto the base model); with
        :class:`PathError` for a path that is not one, :class:`StateLockedError` while another process
        writes the folder, :class:`StateWriteError` when it cannot be written (the previous save kept)."""
        state_path(directory)  # a path that is not one is refused before the state is gathered
        with self._owning("save", claim=False, fresh=True):
            state_io.write_state(directory, self._state_dict(snapshot=False),  # written at once: no snapshot
                                 edited_fingerprint=model_fingerprint(self.model))
        log.info("saved editor state (%d edits, layers %s) to %s", len(self.journal_), list(self.layers_), directory)

    @classmethod
    def load(cls, model, tokenizer, directory, *, take_over: bool = False) -> "Editor":
        """Restore an editor saved by :meth:`save` onto ``model``: the base model the edits were
        made on (the saved weights are written into it) or the saved edited model itself.
        Refused with :class:`StateMismatchError` for any other model, which is left untouched, and
        with :class:`OwnershipError` while another editor owns the model (for example the same save
        loaded a second time), unless ``take_over`` (the other editor can then no longer change it).
        """
        guard = guard_of(model)
        with deferred_interrupts(), guard.lock:
            if guard.busy:
                raise OwnershipError("cannot load an editor state: another editor call on this model is running "
                                     "in this thread")
            state, mode = state_io.read_state(directory, model)  # refuses a save of another model first
            owner = guard.owner
            if owner is not None and not take_over and owner._mismatch() is None:
                raise OwnershipError(
                    f"cannot load an editor state: this model is owned by another editor ({len(owner.journal_)} "
                    f"edit(s) in its journal) whose state the model holds (a save loaded twice onto one model?). "
                    f"Continue with that editor, call its release(), or pass take_over=True")
            editor = cls._from_state_dict(model, tokenizer, state, True, share=False)  # fresh from the files
            editor._install(guard, take_over,
                            edited_fingerprint=state["edited_fingerprint"] if mode == "base" else None)
        log.info("loaded editor state (%d edits, layers %s) from %s onto the %s model",
                 len(editor.journal_), list(editor.layers_), directory, mode)
        return editor

    def save_edit_pack(self, path, *, dtype: torch.dtype | None = None) -> None:
        """Write only the edited weights' deltas, to apply to a fresh copy of the base model."""
        with self._owning("save an edit pack", claim=False, fresh=True):
            self._save_edit_pack(path, dtype)

    def _save_edit_pack(self, path, dtype) -> None:
        write_edit_pack(
            path, {l: s.W_ - s.W0_ for l, s in self.solvers_.items()}, dtype=dtype,
            spec=self.spec_, base_fingerprint=self.base_fingerprint_,
            edited_fingerprint=model_fingerprint(self.model),
            edit_ids=[r.edit_id for r in self.journal_],
            facts=[dataclasses.asdict(f) for r in self.journal_ for f in r.facts],
        )

    def certificate(self):
        """Per-layer optimality and drift certificate with the theorems' bounds."""
        return certificate(self)
