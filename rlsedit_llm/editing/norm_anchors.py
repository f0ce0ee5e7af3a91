"""Value-norm anchoring (NAS, arXiv 2602.02543): the branch values ``v0``, the reference norm
``rho`` of a model's edited layer, and the anchored values an editor writes.

NAS rescales each fact's MLP value ``v* = v0 + delta`` (what the edited layer's MLP must add to
the residual stream) to one reference norm ``rho`` per model and layer, and drops a fact whose
``||v*||`` exceeds ``2 rho``; ``rho`` is the upper-trimmed mean of ``||v*||`` over CounterFact
rewrites solved on the unedited model. The maths of the rescaling is
:func:`rlsedit_llm.pipeline.values.anchor_norms`; this module measures what it needs on a model.
Selected by :attr:`rlsedit_llm.EditConfig.anchor_value_norms`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rlsedit_llm.errors import FactError, HyperparameterError
from rlsedit_llm.pipeline.values import ValueConfig, ValueResult, anchor_norms

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rlsedit_llm.adapters.spec import ModelSpec
    from rlsedit_llm.editing.editor import Editor
    from rlsedit_llm.pipeline.facts import Fact

__all__ = ["NAS_REFERENCE_FACTS", "branch_values", "upper_trimmed_mean", "value_norm_reference", "editor_reference",
           "anchored_values"]

log = logging.getLogger(__name__)

#: NAS's ``nas_restart``: CounterFact rewrites solved on the unedited model for the reference norm.
NAS_REFERENCE_FACTS = 1000
_NAS_SEED = 0  # NAS samples its reference rewrites with random.Random(0)
_NAS_KEEP = 0.95  # NAS's upper-trimmed mean keeps the smallest 95 % of the reference norms
_NAS_POOL = "counterfact_simple.json"  # the shipped CounterFact rewrites (21,567 records)
_NAS_CHUNK = 64  # reference facts per value optimisation (bounds the memory; the results are per fact)


def branch_values(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, spec: ModelSpec, layer: int,
                  facts: Sequence[Fact]) -> torch.Tensor:
    """``v0`` (u, d_model) float32: what the MLP branch of decoder layer ``layer`` adds to the
    residual stream at the subject's last token of each fact's bare prompt, on the model as it is
    (the edited module's output there, through the family's post-MLP norm and residual multiplier:
    :func:`~rlsedit_llm.adapters.residual.residual_contribution`). NAS's ``v0``."""
    from rlsedit_llm.adapters.residual import residual_contribution
    from rlsedit_llm.adapters.spec import get_module
    from rlsedit_llm.pipeline.keys import compute_keys

    K = compute_keys(model, tokenizer, spec, layer, facts, ["{}"])  # (u, d_k) bare-prompt keys
    module = get_module(model, spec.edit_module_path.format(layer))
    weight = next(module.parameters())
    with torch.no_grad():
        out = module(K.to(device=weight.device, dtype=weight.dtype))  # the module's output (u, d_model)
        return residual_contribution(model, spec, layer, out).float()


def upper_trimmed_mean(values: torch.Tensor, keep: float = _NAS_KEEP) -> float:
    """The mean of ``values`` (n,) without its ``floor((1 - keep) n)`` largest entries (NAS's
    outlier rule for the reference norm, ``keep = 0.95``)."""
    if not (isinstance(values, torch.Tensor) and values.ndim == 1 and values.numel() > 0):
        raise HyperparameterError("upper_trimmed_mean needs a non-empty 1-D tensor")
    if not torch.isfinite(values).all():
        raise HyperparameterError("upper_trimmed_mean: the values hold NaN or infinity")
    if not 0 < keep <= 1:
        raise HyperparameterError(f"keep must be in (0, 1]; got {keep!r}")
    ordered = torch.sort(values.double()).values
    drop = int((1.0 - keep) * ordered.numel() + 1e-9)  # floor, robust to 0.05 * n rounding
    kept = ordered[: ordered.numel() - drop] if drop > 0 else ordered
    return float(kept.mean())


def _reference_facts(tokenizer: PreTrainedTokenizerBase, n_facts: int, seed: int) -> tuple[list[Fact], str]:
    """``n_facts`` CounterFact rewrites drawn with ``random.Random(seed)`` from the shipped pool
    (those the tokenizer cannot represent left out), and the pool file's SHA-256."""
    from rlsedit_llm.files import DATA_DIR
    from rlsedit_llm.pipeline.facts import as_fact, validate_facts

    blob = (DATA_DIR / _NAS_POOL).read_bytes()
    records = json.loads(blob)
    picked = random.Random(seed).sample(range(len(records)), n_facts) if n_facts < len(records) \
        else range(len(records))
    facts, skipped = [], 0
    for i in picked:
        fact = as_fact(records[i])
        try:
            validate_facts([fact], tokenizer)
        except FactError:
            skipped += 1
            continue
        facts.append(fact)
    if skipped:
        log.info("NAS reference: left out %d rewrite(s) the tokenizer cannot represent", skipped)
    if not facts:
        raise HyperparameterError("NAS reference: the tokenizer represents none of the sampled CounterFact rewrites")
    return facts, hashlib.sha256(blob).hexdigest()


def value_norm_reference(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, spec: ModelSpec, layer: int,
                         value_config: ValueConfig, *, n_facts: int = NAS_REFERENCE_FACTS, seed: int = _NAS_SEED,
                         cache_dir: str | os.PathLike[str] | None = None,
                         model_key: str | None = None) -> float:
    """NAS's reference value norm ``rho`` of decoder layer ``layer`` on ``model`` (which must be the
    unedited model): ``n_facts`` CounterFact rewrites (:data:`NAS_REFERENCE_FACTS` = NAS's
    ``nas_restart``, drawn with ``random.Random(seed)``) solved with ``value_config`` on their bare
    prompts (NAS solves its reference on the bare prompt, without context templates), each
    value's norm ``||z* - h0 + v0||`` (:func:`branch_values`), and their upper-trimmed mean
    (:func:`upper_trimmed_mean`, the smallest 95 %).

    Costs ``n_facts`` value optimisations of two rows each, so it is computed once per model and
    kept on disk under ``cache_dir`` (None: the key-statistics cache) keyed
    by the model (``model_key``, default its :func:`~rlsedit_llm.adapters.fingerprint.model_fingerprint`),
    tokenizer, layer, value settings, sample and pool file."""
    from rlsedit_llm.adapters.fingerprint import model_fingerprint, tokenizer_fingerprint
    from rlsedit_llm.pipeline.stats_cache import default_stats_dir, read_entry, write_entry
    from rlsedit_llm.pipeline.values import compute_values

    if isinstance(n_facts, bool) or not isinstance(n_facts, int) or n_facts < 1:
        raise HyperparameterError(f"n_facts must be an int >= 1; got {n_facts!r}")
    facts, pool_digest = _reference_facts(tokenizer, n_facts, seed)
    model_key = model_key or model_fingerprint(model)
    fields = {"kind": "nas_value_norm_reference", "version": 1, "model": model_key,
              "tokenizer": tokenizer_fingerprint(tokenizer), "layer": layer,
              "module": spec.edit_module_path.format(layer), "value": dataclasses.asdict(value_config),
              "n_facts": n_facts, "seed": seed, "pool": _NAS_POOL, "pool_sha256": pool_digest, "keep": _NAS_KEEP}
    key = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()
    stem = Path(cache_dir or default_stats_dir()) / model_key.split(":")[-1][:16] / "nas" / key
    entry = read_entry(stem, key)
    if entry is not None and entry[0].get("norms") is not None and entry[0]["norms"].numel() == len(facts):
        norms = entry[0]["norms"]
    else:
        log.info("NAS: solving %d CounterFact rewrites on the unedited model for the reference value norm of "
                 "layer %d (once per model; cached)", len(facts), layer)
        batched = dataclasses.replace(value_config, max_batch=min(value_config.max_batch or _NAS_CHUNK, _NAS_CHUNK))
        values = compute_values(model, tokenizer, spec, layer, facts, ["{}"], batched)
        v0 = branch_values(model, tokenizer, spec, layer, facts).to(values.target.device)
        norms = (values.target - values.initial + v0).norm(dim=1).double().cpu()
        write_entry(stem, {"norms": norms.contiguous()}, dict(fields, key=key))
    return upper_trimmed_mean(norms)


def editor_reference(editor: Editor) -> float:
    """NAS's ``rho`` at the editor's last edited layer, measured on its base model: the edited
    layers hold ``W0`` meanwhile and get back, bit for bit, what they held (whatever ends the
    measurement). Kept by the editor (``value_norm_reference_``) and on disk."""
    from rlsedit_llm.adapters.spec import get_module, read_weight, write_weight
    from rlsedit_llm.interrupts import deferred_interrupts

    if editor.value_norm_reference_ is not None:
        return editor.value_norm_reference_
    spec, config = editor.spec_, editor.config
    modules = {layer: get_module(editor.model, spec.edit_module_path.format(layer)) for layer in editor.solvers_}
    held = {layer: read_weight(module) for layer, module in modules.items()}  # copies
    try:
        with deferred_interrupts():
            for layer, module in modules.items():
                write_weight(module, editor.solvers_[layer].W0_)
        rho = value_norm_reference(editor.model, editor.tokenizer, spec, editor.layers_[-1], editor.value_config_,
                                   n_facts=config.nas_reference_facts, cache_dir=config.cache_dir,
                                   model_key=editor.base_fingerprint_)
    finally:
        with deferred_interrupts():
            for layer, module in modules.items():
                write_weight(module, held[layer])
    editor.value_norm_reference_ = rho
    return rho


def anchored_values(editor: Editor, facts: Sequence[Fact], values: ValueResult) -> torch.Tensor:
    """The values ``z*`` (u, d_model) an editor writes for ``facts`` under its
    ``config.anchor_value_norms`` (see :class:`EditConfig`): NAS, with ``v0`` read on the model as
    it is before the edit and ``rho`` from :func:`value_norm_reference` on its base model, or the h0
    rule. The maths: :func:`~rlsedit_llm.pipeline.values.anchor_norms`."""
    rule = editor.config.value_norm_rule
    if rule is None:
        return values.target
    if rule == "h0":
        return anchor_norms(values.target, values.initial)
    layer = editor.layers_[-1]
    rho = editor_reference(editor)
    v0 = branch_values(editor.model, editor.tokenizer, editor.spec_, layer, facts).to(values.target.device)
    z = anchor_norms(values.target, values.initial, branch=v0, reference_norm=rho)
    dropped = [f.subject for f, a, h in zip(facts, z, values.initial, strict=True) if torch.equal(a, h.to(a))]
    if dropped:
        log.info("NAS dropped %d fact(s) whose value norm exceeds twice the reference %.4g: %s", len(dropped), rho,
                 ", ".join(dropped[:5]) + (" ..." if len(dropped) > 5 else ""))
    return z
