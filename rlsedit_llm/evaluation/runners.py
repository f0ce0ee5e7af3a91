"""Every method behind one interface for the benchmark: :class:`MethodRunner` (any registered
method's editor) and :class:`ShadowRunner` (a layer-solver method writing another's keys and
values), built by :func:`make_runner` / :func:`load_runner`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from rlsedit_llm.adapters.spec import get_module, read_weight, write_weight
from rlsedit_llm.editing.config import EditConfig
from rlsedit_llm.editing.methods import load_editor, make_editor
from rlsedit_llm.errors import HyperparameterError
from rlsedit_llm.evaluation.results import LayerDeviation, LeaderGap, finite
from rlsedit_llm.kernel.certificates import weight_deviation
from rlsedit_llm.kernel.registry import is_layer_method
from rlsedit_llm.pipeline.facts import Fact

__all__ = ["MethodRunner", "ShadowRunner", "make_runner", "load_runner", "norm_summary", "restore_weights",
           "snapshot_weights"]


class MethodRunner:
    """One method's editor on a model: ``edit(facts)``, ``weights()``, ``save(dir)``.

    Wraps the editor of any registered method (:func:`rlsedit_llm.editing.methods.make_editor`):
    an :class:`~rlsedit_llm.Editor` for layer-solver methods (same keys, values, statistics and
    templates; only the solver differs) or an editor-level method such as fine-tuning.
    """

    def __init__(self, name: str, editor: Any) -> None:
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

    @property
    def n_batches(self) -> int:
        """Batches the editor has written."""
        return self.editor.n_batches_

    def anchor_grams(self) -> dict[int, torch.Tensor] | None:
        """The anchor Gram ``N E[kk^T]`` per edited layer of a layer-solver method's editor (the
        statistics it edits with), None for an editor-level method."""
        return self.editor.anchor_grams() if is_layer_method(self.name) else None

    def deviations(self, W0: Mapping[int, torch.Tensor],
                   grams: Mapping[int, torch.Tensor] | None = None) -> dict[int, LayerDeviation]:
        """Per edited layer the deviation from the base weights (:class:`.results.LayerDeviation`):
        a layer-solver method's editor reports its own, with the theory's bounds where its
        capabilities give them; an editor-level method's weights (and the anchor drift of a
        solver that keeps no anchor Gram) are measured against ``W0`` and the anchor ``grams``
        (``N E[kk^T]``) when given."""
        grams = grams or {}
        if not is_layer_method(self.name):
            return {l: LayerDeviation.of(weight_deviation(W0[l], W, grams.get(l))) for l, W in self.weights().items()}
        out = {l: LayerDeviation.of(d) for l, d in self.editor.deviations().items()}
        for layer, row in out.items():  # a solver without an anchor Gram (AlphaEdit's projector)
            if row.anchor is None and layer in grams:
                row.anchor = weight_deviation(W0[layer], self.weights()[layer], grams[layer]).anchor
        return out

    def save(self, directory: Any) -> None:
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

    def __init__(self, name: str, editor: Any, leader: MethodRunner) -> None:
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

    def leader_gap(self) -> dict[int, LeaderGap] | None:
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
            out[layer] = LeaderGap(finite(float(torch.linalg.norm(gap) / edit)) if edit > 0 else None,
                                   finite(float(gap.abs().max())))
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


def make_runner(name: str, model: torch.nn.Module, tokenizer: Any, *, edit_config: EditConfig | None = None,
                method_settings: Mapping[str, Mapping[str, Any]] | None = None,
                leader: MethodRunner | None = None) -> MethodRunner:
    """A fresh runner of the registered method ``name`` on ``model`` (which must hold the
    pristine base weights). ``edit_config`` (its ``method`` is overridden) sets the layers,
    statistics and hyperparameters shared by the layer-solver methods; ``method_settings[name]``
    are fields of that method's own settings, passed to :func:`make_editor` (e.g.
    ``{"ft": {"lr": 5e-4, "steps": 10}}``). With ``leader``, a :class:`ShadowRunner` that writes
    the leader's keys and values."""
    options = dict((method_settings or {}).get(name, {}))
    if leader is not None and not is_layer_method(name):
        raise HyperparameterError(f"{name!r} computes no keys or values, so it cannot shadow a method")
    if edit_config is not None and not is_layer_method(name):
        # the bench's value-norm anchoring applies to the methods that solve values only
        edit_config = replace(edit_config, anchor_value_norms=False)
    editor = make_editor(name, model, tokenizer, edit_config, **options)
    return MethodRunner(name, editor) if leader is None else ShadowRunner(name, editor, leader)


def load_runner(name: str, model: torch.nn.Module, tokenizer: Any, directory: Any, *,
                leader: MethodRunner | None = None) -> MethodRunner:
    """Restore a runner saved by :meth:`MethodRunner.save` onto the pristine ``model``
    (a :class:`ShadowRunner` of ``leader`` if given)."""
    if leader is not None and not is_layer_method(name):
        raise HyperparameterError(f"{name!r} computes no keys or values, so it cannot shadow a method")
    editor = load_editor(name, model, tokenizer, directory)
    return MethodRunner(name, editor) if leader is None else ShadowRunner(name, editor, leader)


def restore_weights(model: torch.nn.Module, spec: Any, W0: Mapping[int, torch.Tensor]) -> None:
    """Write the saved pre-edit weights back into the edited modules."""
    for layer, W in W0.items():
        write_weight(get_module(model, spec.edit_module_path.format(layer)), W)


def snapshot_weights(model: torch.nn.Module, spec: Any, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Copies of the edited modules' weights ``(d_k, d_v)`` on CPU (module dtype)."""
    return {l: read_weight(get_module(model, spec.edit_module_path.format(l))).cpu() for l in layers}
