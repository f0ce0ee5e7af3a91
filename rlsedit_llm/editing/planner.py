"""Plan a stream from its expected length: forecast plasticity and retention before any edit.

The forecast (:func:`forecast_stream`) follows ``rlsedit_theory.capacity`` on the keys a stream
will write, computed on the model before the run:

1. **A sample of facts** (:func:`sample_facts`: a seeded sample of a shipped data set, or the
   caller's facts) and their keys at every candidate layer (:func:`sample_keys`: the editor's
   template-averaged keys, and the bare-prompt keys).
2. **The keys as written.** Within one edit the editor writes the layers in ascending order and
   recomputes the keys of each layer on the model the lower writes changed; those writes move
   the residual stream at the subject by a large share of ``z* - h`` (the value optimisation
   saturates its clamp, ``||z* - h|| = 0.75 ||h||``), which inflates the upper layers' keys
   and raises their leverage. :func:`emulate_batch` reproduces one write of a batch: values
   ``z* = h + delta`` with ``delta`` of the clamp's norm in a random direction (no value
   optimisation: the end-to-end residual share depends on the size of ``delta`` far more than
   on its direction), keys recomputed layer by layer on the bare prompt (the template-averaged
   unedited key plus the change of the bare key), the update ``W = W0 + C K^T S^{-1} (V - K W0)``
   of the verified solver, and the weights put back exactly afterwards. It returns the written
   keys and the end-to-end residual share.
3. **One layer** (``capacity.fit_key_model`` / ``forecast_shares``): the written keys in the
   coordinates whitened by ``A = alpha I + beta N E[kk^T]``, a Ledoit-Wolf covariance, and the
   deterministic-equivalent state after ``t`` edits; the sample's own batches written on it give
   the layer's T2 share and the retained share of the first batch at every stream position.
4. **The window** (``capacity.compose_layers``): the editor's spreading rule with a
   propagation factor ``eta``, fitted so that the composition of the emulated batches'
   per-layer shares equals their emulated end-to-end share at the stream's start, and again for
   one batch written on a state ``STIFFER`` times stiffer; along the stream ``eta`` follows the
   line through the two points in the layers' mean share (``capacity.interpolate_propagation``).

:func:`plan_stream` turns the forecast into a decision (the rule is derived on the docs page
"Capacity and stream length"); :meth:`EditConfig.for_stream` returns its configuration.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rlsedit_llm.adapters.hooks import capture_inputs, capture_outputs, run_until_stopped
from rlsedit_llm.adapters.residual import module_target
from rlsedit_llm.adapters.spec import ModelSpec, detect_spec, get_module, read_weight, write_weight
from rlsedit_llm.editing.config import EditConfig
from rlsedit_llm.editing.guard import guard_of
from rlsedit_llm.editing.statistics import layer_moments
from rlsedit_llm.errors import FactError, HyperparameterError
from rlsedit_llm.files import DATA_DIR
from rlsedit_llm.pipeline.facts import Fact, as_fact, validate_facts
from rlsedit_llm.pipeline.keys import compute_keys_multi, fact_rows, generate_templates
from rlsedit_llm.pipeline.tokens import input_device, needs_bos, pad_id, right_pad
from rlsedit_llm.pipeline.values import default_value_config
from rlsedit_theory import capacity

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

__all__ = [
    "REFERENCE_EDITS_PER_KEY_DIM",
    "MIN_GAIN",
    "RULE",
    "KeySample",
    "LayerForecast",
    "StreamForecast",
    "StreamPlan",
    "sample_facts",
    "sample_keys",
    "emulate_batch",
    "forecast_stream",
    "candidate_windows",
    "plan_stream",
]

#: The reference length of the rule, in edits per key dimension of the edited layers: 0.7 is the
#: paper's 10,000 edits on Llama-3-8B (d_k = 14,336) and 1,075 edits on SmolLM2 (d_k = 1,536), whose
#: measured stream is still healthy at 1,000 edits (docs/llm/benchmarks.md, longer streams).
REFERENCE_EDITS_PER_KEY_DIM = 0.7
#: How much stiffer than the unedited state the second calibration write is (``C_0 / STIFFER``).
STIFFER = 3.0
#: Widening stops when the best next layer raises the forecast plasticity at the expected length by
#: no more than this (absolute).
MIN_GAIN = 0.0


# ----------------------------------------------------------------------------------------------
# The sample


def sample_facts(tokenizer: PreTrainedTokenizerBase, n: int = 200, *, dataset: str = "counterfact_simple",
                 seed: int = 0, exclude: Iterable[Any] = ()) -> list[Fact]:
    """``n`` facts drawn (seeded, without replacement) from a shipped data set's records, for a key
    sample: records the tokenizer cannot represent, records whose ``case_id`` is in ``exclude``
    and repeats of an earlier (prompt, subject) are skipped."""
    files = {"counterfact": "counterfact.json", "counterfact_simple": "counterfact_simple.json",
             "zsre": "zsre_eval.json"}
    if dataset not in files:
        raise HyperparameterError(f"dataset must be one of {sorted(files)}; got {dataset!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise HyperparameterError(f"n must be an int >= 1; got {n!r}")
    records = json.loads((DATA_DIR / files[dataset]).read_text(encoding="utf-8"))
    skip = set(exclude)
    order = np.random.default_rng(seed).permutation(len(records))
    facts: list[Fact] = []
    seen: set[tuple[str, str]] = set()
    for i in order:
        rec = records[int(i)]
        if dataset == "zsre":
            rec = {**rec, "case_id": int(i)}
        if rec.get("case_id") in skip:
            continue
        try:
            fact = as_fact(rec)
            validate_facts([fact], tokenizer)
        except FactError:
            continue
        if (fact.prompt, fact.subject) in seen:
            continue
        seen.add((fact.prompt, fact.subject))
        facts.append(fact)
        if len(facts) == n:
            return facts
    raise HyperparameterError(f"{dataset} has only {len(facts)} usable records for the sample; ask for fewer")


@dataclass
class KeySample:
    """Keys of a sample of facts on the unedited model, per layer, float64 ``(n, d_k)``:
    ``keys`` the editor's template-averaged keys, ``bare`` the keys of the bare prompt."""

    facts: list[Fact]
    templates: list[str]
    keys: dict[int, np.ndarray]
    bare: dict[int, np.ndarray]

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.keys))

    def head(self, n: int) -> KeySample:
        """The sample of the first ``n`` facts (the same keys, not recomputed)."""
        return KeySample(self.facts[:n], self.templates, {l: k[:n] for l, k in self.keys.items()},
                         {l: k[:n] for l, k in self.bare.items()})


def _check_chunks(facts: Sequence[Fact], batch: int) -> None:
    for lo in range(0, len(facts), batch):
        slots = [(f.prompt, f.subject) for f in facts[lo:lo + batch]]
        if len(set(slots)) != len(slots):
            raise FactError("the sample repeats a prompt and subject within a batch; give distinct facts")


def sample_keys(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, facts: Sequence[Fact | Mapping[str, Any]],
                layers: Iterable[int], *, config: EditConfig | None = None, batch: int = 100,
                spec: ModelSpec | None = None) -> KeySample:
    """Template-averaged and bare keys of ``facts`` at ``layers`` (one forward pass per chunk of
    ``batch`` facts for all layers), with the templates ``config`` gives the editor."""
    config = config or EditConfig()
    spec = spec or detect_spec(model)
    checked = [as_fact(f) for f in facts]
    _check_chunks(checked, batch)
    layers = sorted(set(layers))
    templates = generate_templates(model, tokenizer, seed=config.template_seed, n=config.n_templates,
                                   length=config.template_length)
    keys: dict[int, list[np.ndarray]] = {l: [] for l in layers}
    bare: dict[int, list[np.ndarray]] = {l: [] for l in layers}
    for lo in range(0, len(checked), batch):
        chunk = checked[lo:lo + batch]
        for out, tpl in ((keys, templates), (bare, ["{}"])):
            got = compute_keys_multi(model, tokenizer, spec, layers, chunk, tpl)
            for l in layers:
                out[l].append(got[l].detach().to("cpu", torch.float64).numpy())
    return KeySample(checked, list(templates), {l: np.concatenate(v) for l, v in keys.items()},
                     {l: np.concatenate(v) for l, v in bare.items()})


# ----------------------------------------------------------------------------------------------
# One emulated write


def _bare_pass(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, spec: ModelSpec, layer: int | None,
               z_layer: int, facts: Sequence[Fact]) -> tuple[torch.Tensor | None, torch.Tensor]:
    """One forward pass of the bare prompts: the edited module's input of ``layer`` (None: not
    read) and the output of decoder layer ``z_layer``, at each fact's subject-last token, float64
    on the CPU (what ``compute_keys(..., ["{}"])`` and ``subject_hidden_states`` give, in one pass
    stopped above ``z_layer``)."""
    rows, positions = fact_rows(tokenizer, facts, ["{}"], bos=needs_bos(spec))
    input_ids, attn = right_pad(rows, pad_id(tokenizer), input_device(model))
    inputs = {} if layer is None else {0: get_module(model, spec.edit_module_path.format(layer))}
    outputs = {0: get_module(model, spec.layer_path.format(z_layer))}
    base = getattr(model, "base_model", model)
    index = torch.arange(len(rows)), torch.tensor(positions)

    def at_subject(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] == input_ids.shape[0] * input_ids.shape[1]:  # OPT: (batch * seq, d)
            x = x.view(input_ids.shape[0], input_ids.shape[1], -1)
        return x[index[0].to(x.device), index[1].to(x.device)].to("cpu", torch.float64)

    was_training = model.training
    model.eval()
    try:
        with capture_inputs(inputs) as seen_in, capture_outputs(outputs, stop=True) as seen_out, torch.no_grad():
            run_until_stopped(base, input_ids=input_ids, attention_mask=attn, use_cache=False)
    finally:
        model.train(was_training)
    return (at_subject(seen_in[0]) if layer is not None else None), at_subject(seen_out[0])



def emulate_batch(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, sample: KeySample,
                  rows: slice, layers: Sequence[int], states: Mapping[int, np.ndarray], *,
                  clamp: float, seed: int = 0,
                  spec: ModelSpec | None = None) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray], float]:
    """Write the facts ``sample.facts[rows]`` as one batch on ``layers`` (ascending) with values of
    norm ``clamp * ||h||`` in random directions, on the states ``states[l] = C (d_k, d_k)``, the way
    the editor does (keys recomputed after the lower layers' writes; the layer's share
    ``(z* - h) / (L - i)`` of the residual), then put every weight back exactly.

    Returns the written keys per layer (``(u, d_k)`` float64: the template-averaged unedited key
    plus the change of the bare-prompt key), the bare-prompt keys at the time of each layer's
    write, and the end-to-end residual share (mean over the
    facts of ``||z* - h_after|| / ||z* - h_before||`` at the last layer)."""
    spec = spec or detect_spec(model)
    layers = list(layers)
    facts = sample.facts[rows]
    z_layer = layers[-1]
    modules = {l: get_module(model, spec.edit_module_path.format(l)) for l in layers}
    gen = torch.Generator().manual_seed(seed)
    with guard_of(model).lock, torch.no_grad():
        originals = {l: read_weight(modules[l]) for l in layers}  # model dtype: written back bit for bit
        _, h0 = _bare_pass(model, tokenizer, spec, None, z_layer, facts)
        direction = torch.randn(h0.shape, generator=gen, dtype=torch.float64)
        delta = direction / direction.norm(dim=1, keepdim=True) * clamp * h0.norm(dim=1, keepdim=True)
        target = h0 + delta
        written: dict[int, np.ndarray] = {}
        bare: dict[int, np.ndarray] = {}
        try:
            for i, l in enumerate(layers):
                K = torch.from_numpy(sample.keys[l][rows]).clone()
                if i == 0:  # nothing below is written yet: the keys and h are the unedited ones
                    now, h = torch.from_numpy(sample.bare[l][rows]).clone(), h0
                else:  # the lower writes changed this layer's keys: add the bare key's change
                    got, h = _bare_pass(model, tokenizer, spec, l, z_layer, facts)
                    assert got is not None
                    now = got
                    K += now - torch.from_numpy(sample.bare[l][rows])
                bare[l] = now.numpy()
                W0 = originals[l].double().cpu()
                R = (target - h) / (len(layers) - i)
                device = originals[l].device  # a post-MLP norm's weights live there
                V = module_target(model, spec, l, (K @ W0).to(device), R.to(device)).to("cpu", torch.float64)
                C = torch.from_numpy(np.asarray(states[l], dtype=np.float64))
                S = torch.eye(K.shape[0], dtype=torch.float64) + K @ C @ K.T
                W = W0 + C @ K.T @ torch.linalg.solve(S, V - K @ W0)
                write_weight(modules[l], W.to(originals[l].dtype))
                written[l] = K.numpy()
            _, after = _bare_pass(model, tokenizer, spec, None, z_layer, facts)
        finally:
            for l in layers:
                write_weight(modules[l], originals[l])
    share = float(((target - after).norm(dim=1) / delta.norm(dim=1)).mean())
    return written, bare, share


# ----------------------------------------------------------------------------------------------
# The forecast


@dataclass(frozen=True)
class LayerForecast:
    """One layer's forecast along the stream (lists over :attr:`StreamForecast.positions`)."""

    layer: int
    share: list[float]  # T2 share of the batch written after t edits (Frobenius, isotropic innovation)
    retained: list[float]  # share of the first batch's own response left after t edits in all
    leverage: list[float]  # deterministic-equivalent leverage of a fresh key after t edits
    shrinkage: float  # Ledoit-Wolf intensity of the key model
    start_share: float  # the share of the sample's own batches written on A (t = 0), measured exactly


@dataclass(frozen=True)
class StreamForecast:
    """Plasticity and retention of a stream on ``layers`` against its length, before it runs.

    ``positions`` are stream positions ``t`` (edits written before a batch / in all);
    ``residual_share[k]`` the forecast end-to-end share of its residual that the batch written
    after ``positions[k]`` edits leaves at the last edited layer (what the editor's reports call
    ``residual_share``); ``retained[k]`` the share of the first batch's written response still in
    the model after ``positions[k]`` edits (per layer ``capacity.retained_share``, weighted by
    each layer's contribution to the first write); ``propagation`` the fitted ``eta``;
    ``emulated_share`` the emulated end-to-end share at the start.
    """

    layers: tuple[int, ...]
    alpha: float
    beta: float
    mom2_weight: float
    batch: int
    positions: list[int]
    residual_share: list[float]
    retained: list[float]
    per_layer: dict[int, LayerForecast]
    propagation: float
    emulated_share: float
    n_facts: int
    seconds: float
    notes: dict[str, Any] = field(default_factory=dict)
    #: the fitted key model of each layer (not part of :meth:`to_dict`)
    key_models: dict[int, capacity.KeyModel] = field(default_factory=dict, repr=False, compare=False)

    def at(self, edits: float, what: str = "retained") -> float:
        """``what`` (``"retained"`` or ``"residual_share"``) at ``edits``, interpolated linearly in
        the stream position (positions outside the forecast's range are refused)."""
        if what not in ("retained", "residual_share"):
            raise HyperparameterError(f"what must be 'retained' or 'residual_share'; got {what!r}")
        if not self.positions[0] <= edits <= self.positions[-1]:
            raise HyperparameterError(f"{edits} edits is outside the forecast's range "
                                      f"[{self.positions[0]}, {self.positions[-1]}]")
        return float(np.interp(edits, self.positions, getattr(self, what)))

    def to_dict(self) -> dict[str, Any]:
        """The forecast as plain data (JSON-ready; per-layer forecasts keyed by the layer as a string)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("layers", "per_layer", "key_models")}
        d["layers"] = list(self.layers)
        d["per_layer"] = {str(l): asdict(f) for l, f in self.per_layer.items()}
        return d


def _positions(edits: Iterable[int]) -> list[int]:
    pos = sorted({int(e) for e in edits} | {0})
    if any(p < 0 for p in pos):
        raise HyperparameterError("stream positions must be >= 0")
    return pos


def forecast_stream(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, sample: KeySample, *,
                    layers: Sequence[int], edits: Iterable[int], config: EditConfig | None = None,
                    batch: int = 100, moments: Mapping[int, torch.Tensor] | None = None,
                    seed: int = 0, max_batches: int | None = None) -> StreamForecast:
    """The :class:`StreamForecast` of a stream written in batches of ``batch`` on ``layers`` with
    ``config``'s ``alpha``, ``beta`` and ``N`` (its ``layers`` field is ignored), at the stream
    positions ``edits`` (0 is always added), from ``sample`` (its keys must cover ``layers``).

    ``moments``: the layers' ``E[kk^T]`` if already at hand (else :func:`layer_moments` with
    ``config``, cached on disk). ``max_batches``: emulate at most this many of the sample's batches
    (default: all; each costs one write of ``batch`` facts on ``len(layers)`` layers).
    """
    tic = time.perf_counter()
    config = config or EditConfig()
    spec = detect_spec(model)
    layers = sorted(set(int(l) for l in layers))
    if not layers or any(not 0 <= l < spec.n_layers for l in layers):
        raise HyperparameterError(f"layers must be in [0, {spec.n_layers}); got {layers}")
    missing = [l for l in layers if l not in sample.keys]
    if missing:
        raise HyperparameterError(f"the key sample has no keys at layers {missing}; sample them first")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise HyperparameterError(f"batch must be an int >= 1; got {batch!r}")
    n_batches = len(sample.facts) // batch
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    if n_batches < 1:
        raise HyperparameterError(f"the sample has {len(sample.facts)} facts: fewer than one batch of {batch}")
    positions = _positions(edits)
    if moments is None:
        moments = layer_moments(model, tokenizer, spec, layers, config)
    metrics: dict[int, np.ndarray] = {}
    mom2 = 0.0
    for l in layers:
        m = moments[l].detach().to("cpu", torch.float64).numpy()
        mom2 = config.resolved_mom2_weight(m.shape[0])
        metrics[l] = config.alpha * np.eye(m.shape[0]) + config.beta * mom2 * m
    clamp = (config.value or default_value_config(spec)).clamp_norm_factor
    # 1. The keys as written, and the end-to-end share, of the sample's batches at the start.
    states = {l: np.linalg.inv(metrics[l]) for l in layers}
    written: dict[int, list[np.ndarray]] = {l: [] for l in layers}
    emulated = []
    for b in range(n_batches):
        keys, _, share = emulate_batch(model, tokenizer, sample, slice(b * batch, (b + 1) * batch), layers, states,
                                    clamp=clamp, seed=seed + b, spec=spec)
        emulated.append(share)
        for l in layers:
            written[l].append(keys[l])
    # The same write of the first batch on states STIFFER times stiffer: how eta moves as the
    # layers saturate along the stream (their shares rise, the lower writes shrink).
    stiff = {l: states[l] / STIFFER for l in layers}
    stiff_keys, _, stiff_share = emulate_batch(model, tokenizer, sample, slice(0, batch), layers, stiff, clamp=clamp,
                                               seed=seed, spec=spec)
    stiff_shares = np.array([capacity.batch_residual_share(stiff[l], stiff_keys[l]) for l in layers])
    unedited = {str(l): float(np.mean([capacity.batch_residual_share(states[l],
                                                                     sample.keys[l][b * batch:(b + 1) * batch])
                                       for b in range(n_batches)]))
                for l in layers}  # the same batches' T2 shares on their unedited keys
    # 2. Each layer: key model, equivalent states, shares and retention along the stream.
    per_layer: dict[int, LayerForecast] = {}
    key_models: dict[int, capacity.KeyModel] = {}
    for l in layers:
        model_l = key_models[l] = capacity.fit_key_model(np.concatenate(written[l]), metrics[l])
        f = capacity.forecast_shares(model_l, positions, batch=batch)
        per_layer[l] = LayerForecast(l, f["share"].tolist(), f["retained"].tolist(), f["leverage"].tolist(),
                                     model_l.shrinkage, float(f["share"][0]))
    # 3. The window: eta from the start, then the composition along the stream.
    start = np.array([per_layer[l].start_share for l in layers])
    emulated_share = float(np.mean(emulated))
    eta = capacity.propagation_for(start, emulated_share)
    calibration = [(float(start.mean()), eta),
                   (float(stiff_shares.mean()), capacity.propagation_for(stiff_shares, stiff_share))]
    shares = np.array([per_layer[l].share for l in layers])  # (L, T)
    etas = np.atleast_1d(capacity.interpolate_propagation(calibration, shares.mean(axis=0)))
    residual = np.array([capacity.compose_layers(shares[:, k], etas[k]) for k in range(len(positions))])
    weights = capacity.layer_contributions(start, eta)
    retained = np.array([per_layer[l].retained for l in layers])  # (L, T)
    kept = weights @ retained / weights.sum()
    return StreamForecast(tuple(layers), float(config.alpha), float(config.beta), float(mom2), batch, positions,
                          residual.tolist(), kept.tolist(), per_layer, eta, emulated_share, n_batches * batch,
                          time.perf_counter() - tic,
                          {"emulated_shares": emulated, "contributions": weights.tolist(),
                           "propagation_calibration": calibration, "propagation_along": etas.tolist(),
                           "stiffer": STIFFER, "unedited_start_share": unedited}, key_models)


# ----------------------------------------------------------------------------------------------
# The decision


def candidate_windows(default: Sequence[int], n_layers: int, *, max_layers: int = 9) -> list[tuple[int, ...]]:
    """The windows the planner considers: the default block, then the block grown one layer at a
    time, each step adding the layer above or the layer below (both are candidates), contiguous,
    inside ``[1, n_layers - 1)`` (layer 0 reads the embeddings; one layer is left above), up to
    ``max_layers`` layers."""
    base = tuple(sorted(default))
    if list(base) != list(range(base[0], base[-1] + 1)):
        return [base]
    out = [base]
    for size in range(len(base) + 1, max_layers + 1):
        for first in range(base[0] - (size - len(base)), base[0] + 1):
            last = first + size - 1
            if first >= 1 and last <= n_layers - 2 and first <= base[0] and last >= base[-1]:
                out.append(tuple(range(first, last + 1)))
    return out


@dataclass(frozen=True)
class StreamPlan:
    """What :func:`plan_stream` chose and why.

    ``config``: the configuration (the caller's, with the chosen ``layers``; ``None`` when the
    default block stays); ``forecast``: the chosen window's forecast; ``forecasts``: every window
    compared; ``reference_edits``: the reference length (:data:`REFERENCE_EDITS_PER_KEY_DIM` times
    ``d_k``); ``target``: the default block's forecast plasticity there; ``plasticity``: the
    chosen window's at the expected length; ``met``: whether it reaches the target.
    """

    expected_edits: int
    config: EditConfig
    forecast: StreamForecast
    forecasts: dict[tuple[int, ...], StreamForecast]
    reference_edits: int
    target: float
    plasticity: float
    met: bool
    rule: str = ""

    def summary(self) -> dict[str, Any]:
        """The decision as plain data (for reports and JSON)."""
        at = self.expected_edits
        return {"expected_edits": at, "layers": list(self.forecast.layers), "alpha": self.config.alpha,
                "beta": self.config.beta, "mom2_weight": self.forecast.mom2_weight,
                "reference_edits": self.reference_edits, "target_plasticity": self.target,
                "plasticity": self.plasticity, "met": self.met,
                "retained": self.forecast.at(at), "residual_share": self.forecast.at(at, "residual_share"),
                "candidates": {"-".join(map(str, w)): 1.0 - f.at(at, "residual_share")
                               for w, f in self.forecasts.items() if f.positions[-1] >= at}}


RULE = ("Forecast the end-to-end plasticity p_W(T) = 1 - residual share of the write at stream position T for a "
        "window W. The target is p* = p_D(T_ref), the default block D at T_ref = 0.7 edits per key dimension. "
        "If p_D(T) >= p* (every T <= T_ref), keep D and the defaults. Otherwise grow the window one layer at a "
        "time (the layer above or below, whichever forecasts the higher p(T)), while the gain exceeds MIN_GAIN, "
        "until p(T) >= p* or the window has max_layers layers. alpha and N keep their defaults.")


def plan_stream(model: torch.nn.Module, expected_edits: int, *, tokenizer: PreTrainedTokenizerBase | None = None,
                facts: Sequence[Fact | Mapping[str, Any]] | None = None, config: EditConfig | None = None,
                batch: int = 100, n_facts: int = 200, max_layers: int = 9, min_gain: float = MIN_GAIN,
                seed: int = 0, forecasts: dict[tuple[int, ...], StreamForecast] | None = None,
                sample: KeySample | None = None, positions: Iterable[int] = ()) -> StreamPlan:
    """Choose the layer window for a stream of ``expected_edits`` edits written in batches of
    ``batch`` (:data:`RULE`, derived on the docs page "Capacity and stream length"); ``alpha`` and
    ``N`` stay as ``config`` has them (the defaults unless given).

    ``facts``: the key sample (facts like the ones the stream will write); None: ``n_facts``
    facts of simplified CounterFact (:func:`sample_facts`). ``config``: the other settings; its
    ``layers`` (None: the family's default block) is the block the planner starts from and keeps
    for short streams. ``forecasts`` / ``sample``: forecasts and keys already computed; the
    planner adds what it computes to ``forecasts`` (so several lengths can share them: give them
    all in ``positions``, extra stream positions every forecast includes), and a window's
    forecast is recomputed unless it includes every position needed.
    ``tokenizer`` is needed unless every forecast needed is given.
    """
    if isinstance(expected_edits, bool) or not isinstance(expected_edits, int) or expected_edits < 1:
        raise HyperparameterError(f"expected_edits must be an int >= 1; got {expected_edits!r}")
    if isinstance(max_layers, bool) or not isinstance(max_layers, int) or max_layers < 1:
        raise HyperparameterError(f"max_layers must be an int >= 1; got {max_layers!r}")
    if not math.isfinite(min_gain) or min_gain < 0:
        raise HyperparameterError(f"min_gain must be a finite number >= 0; got {min_gain!r}")
    config = config or EditConfig()
    config.validate()
    spec = detect_spec(model)
    default = tuple(sorted(config.layers)) if config.layers is not None else tuple(spec.default_layers)
    windows = candidate_windows(default, spec.n_layers, max_layers=max(max_layers, len(default)))
    reference = max(1, round(REFERENCE_EDITS_PER_KEY_DIM * spec.d_k))
    horizon = sorted({0, batch, reference, expected_edits} | {int(p) for p in positions})
    forecasts = forecasts if forecasts is not None else {}
    moments: dict[int, torch.Tensor] = {}
    state: dict[str, Any] = {"sample": sample}

    def forecast(window: tuple[int, ...]) -> StreamForecast:
        known = forecasts.get(window)
        if known is not None and {0, reference, expected_edits} <= set(known.positions):
            return known
        if tokenizer is None:
            raise HyperparameterError("plan_stream needs the tokenizer to forecast (keys of a sample of facts)")
        if state["sample"] is None:
            chosen_facts = list(facts) if facts is not None else sample_facts(tokenizer, n_facts, seed=seed)
            every = sorted({l for w in windows for l in w})
            state["sample"] = sample_keys(model, tokenizer, chosen_facts, every, config=config, batch=batch, spec=spec)
        need = [l for l in window if l not in moments]
        if need:
            moments.update(layer_moments(model, tokenizer, spec, need, config))
        got = forecast_stream(model, tokenizer, state["sample"], layers=window, edits=horizon, config=config,
                              batch=batch, moments=moments, seed=seed)
        forecasts[window] = got
        return got

    def plasticity(window: tuple[int, ...]) -> float:
        return 1.0 - forecast(window).at(expected_edits, "residual_share")

    target = 1.0 - forecast(default).at(reference, "residual_share")
    chosen, value = default, plasticity(default)
    while value < target and len(chosen) < max_layers:
        grown = [w for w in windows if len(w) == len(chosen) + 1 and set(chosen) <= set(w)]
        if not grown:
            break
        best_value, best = max((plasticity(w), w) for w in grown)
        if best_value - value <= min_gain:
            break
        chosen, value = best, best_value
    layers = None if chosen == default and config.layers is None else chosen
    planned = replace(config, layers=layers)
    planned.validate()
    log.info("plan for %d edits: layers %s, forecast plasticity %.3f (target %.3f at %d edits)", expected_edits,
             list(chosen), value, target, reference)
    return StreamPlan(expected_edits, planned, forecasts[chosen], forecasts, reference, target, value,
                      value >= target, RULE)
