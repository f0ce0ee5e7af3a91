"""Values of the MEMIT lineage: the target hidden state ``z*`` of each fact at the last edited layer.

For fact ``i`` a vector ``delta_i`` is added to the residual stream after decoder layer ``layer``
(the last edited layer) at the subject's last token, in every row of that fact:

* one row per context template: the templated prompt followed by the target minus its last token
  (target with a leading space, a leading BOS dropped), whose next-token predictions are scored
  against the target tokens;
* one KL row: ``"{subject} is a"``.

Per fact the loss is (all terms as in MEMIT/AlphaEdit's ``compute_z``)

    nll_i   = mean over template rows of (mean over target tokens of -log p(token))
    kl_i    = KL(p_edited || p_unedited) of the next-token distribution at the subject's last
              token of the KL row
    loss_i  = nll_i + kl_factor * kl_i + weight_decay * ||delta_i|| / ||h0_i||^2

with ``h0_i`` the unedited output of layer ``layer`` at the subject's last token of the bare
prompt (the unsquared numerator is deliberate: it is the published loss). Adam with ``lr``; at
most ``steps`` loss evaluations and ``steps - 1`` updates; a fact stops (its ``delta`` frozen)
once ``loss_i < early_stop_loss``; after every update ``||delta_i|| <= clamp_norm_factor * ||h0_i||``.
All facts are optimised in one batch; since every ``delta_i`` only enters its own rows and Adam is
element-wise, this equals optimising each fact alone.

Two interchangeable forward paths produce the log-probabilities the loss needs:

* **fast** (default): one gradient-free pass of the whole model records, for the layers above
  ``layer``, their call arguments and the attention keys/values of every position *before* the
  subject. Because attention is causal, positions before the subject cannot see ``delta``, so each
  optimisation step re-runs only the layers above ``layer`` on the positions from the subject
  onwards (attending to the recorded keys/values), then the final norm and LM head at the few
  positions the loss reads. Only the rows of facts still optimising are run, in groups of
  similar suffix length (:func:`_length_groups`), so padding and finished facts cost nothing.
  The decoder layers are the model's own modules called with the
  arguments the model itself passed them (mask and rotary tables sliced to those positions), so no
  architecture is re-implemented. A self-check at step 0 (outputs equal to the full pass) guards
  this; on mismatch, or for attention implementations other than ``sdpa``/``eager``, the naive
  path is used and a warning logged.
* **naive** (``naive=True``): the full model on every row and position at every step, with a hook
  adding ``delta``. The reference the fast path is tested against.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from rlsedit_llm.errors import FactError, HyperparameterError
from rlsedit_llm.pipeline.facts import as_facts, encode_target, validate_facts
from rlsedit_llm.adapters.hooks import first_tensor, restore_requires_grad, set_requires_grad
from rlsedit_llm.pipeline.keys import _pad_id, encode_with_subject, fact_rows, right_pad, template_parts
from rlsedit_llm.adapters.architectures import ModelSpec, get_module, model_device

log = logging.getLogger(__name__)

__all__ = ["ValueConfig", "ValueResult", "default_value_config", "compute_values"]

_CACHE_ARG_NAMES = ("cache", "past_key_values", "past_key_value", "layer_past")
_POSITION_ARG_NAMES = ("position_ids", "position_embeddings")
_SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass
class ValueConfig:
    """Hyperparameters of the value optimisation (defaults: the published AlphaEdit/RLSEdit ones).

    lr : Adam learning rate (published: 0.5 for GPT-2/GPT-J, 0.1 for Llama/Qwen 7-8B)
    steps : loss evaluations (at most ``steps - 1`` Adam updates, as in MEMIT)
    weight_decay : coefficient of ``||delta|| / ||h0||^2``
    clamp_norm_factor : ``||delta|| <= clamp_norm_factor * ||h0||``
    kl_factor : coefficient of the KL term
    early_stop_loss : a fact stops once its total loss is below this
    kl_prompt : the KL row's prompt, ``"{}"`` marking the subject
    kl_position : ``"subject_last"`` (MEMIT: the distribution right after the subject) or
        ``"prompt_last"`` (after the whole KL prompt)
    """

    lr: float = 0.5
    steps: int = 25
    weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    kl_prompt: str = "{} is a"
    kl_position: str = "subject_last"

    def validate(self) -> None:
        """Raise :class:`HyperparameterError` naming the first bad setting."""
        for name in ("lr", "clamp_norm_factor"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0:
                raise HyperparameterError(f"ValueConfig.{name} must be > 0; got {v!r}")
        for name in ("weight_decay", "kl_factor", "early_stop_loss"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v >= 0:
                raise HyperparameterError(f"ValueConfig.{name} must be >= 0; got {v!r}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise HyperparameterError(f"ValueConfig.steps must be an int >= 1; got {self.steps!r}")
        if not isinstance(self.kl_prompt, str) or self.kl_prompt.count("{}") != 1:
            raise HyperparameterError(f"ValueConfig.kl_prompt must contain exactly one '{{}}'; got {self.kl_prompt!r}")
        if self.kl_position not in ("subject_last", "prompt_last"):
            raise HyperparameterError(
                f"ValueConfig.kl_position must be 'subject_last' or 'prompt_last'; got {self.kl_position!r}"
            )


def default_value_config(spec: ModelSpec) -> ValueConfig:
    """Per-family defaults: GPT-2 lr 0.5 and 20 steps; GPT-J/NeoX lr 0.5; Llama-like lr 0.1,
    except models with ``d_model < 1024`` (e.g. SmolLM2-135M), which keep lr 0.5: at lr 0.1 their
    values often miss the target within 25 steps (measured on SmolLM2 with CounterFact)."""
    if spec.family == "gpt2":
        return ValueConfig(lr=0.5, steps=20)
    if spec.family in ("gptj", "gpt_neox"):
        return ValueConfig(lr=0.5)
    return ValueConfig(lr=0.1 if spec.d_model >= 1024 else 0.5)


@dataclass
class ValueResult:
    """Result of :func:`compute_values`.

    target : (u, d_model) float32, ``h0 + delta`` (the optimised hidden state ``z*``)
    initial : (u, d_model) float32, ``h0`` (unedited output of the layer at the subject's last token)
    loss_history : mean over facts of ``loss_i`` at every evaluation
    nll_history : mean over facts of ``nll_i`` at every evaluation
    steps_run : Adam updates taken
    final_loss, final_nll : (u,) float32 per-fact values at the last evaluation
    path : ``"fast"`` or ``"naive"`` (the forward path actually used)
    """

    target: torch.Tensor
    initial: torch.Tensor
    loss_history: list[float] = field(default_factory=list)
    nll_history: list[float] = field(default_factory=list)
    steps_run: int = 0
    final_loss: torch.Tensor | None = None
    final_nll: torch.Tensor | None = None
    path: str = "fast"

    @property
    def delta(self) -> torch.Tensor:
        return self.target - self.initial


# --------------------------------------------------------------------------------------------
# Rows of the loss
# --------------------------------------------------------------------------------------------
@dataclass
class _Rows:
    ids: list[list[int]]  # R token rows: u*T template rows (fact-major), then u KL rows
    subject: torch.Tensor  # (R,) subject-last position per row
    fact: torch.Tensor  # (R,) fact index per row
    need: torch.Tensor  # (R,) last position whose logits the loss reads, per row
    tok_row: torch.Tensor  # (N_tok,) row of each scored target token
    tok_pos: torch.Tensor  # (N_tok,) position whose logits predict it
    tok_label: torch.Tensor  # (N_tok,) the target token id
    kl_row: torch.Tensor  # (u,) KL row of each fact
    kl_pos: torch.Tensor  # (u,) position of the KL distribution
    plain_row: torch.Tensor  # (u,) the bare-prompt template row of each fact
    n_templates: int


def _build_rows(tokenizer, facts, templates, config: ValueConfig) -> _Rows:
    u, T = len(facts), len(templates)
    plain = [j for j, t in enumerate(templates) if template_parts(t) == ("", "")]
    if not plain:
        raise HyperparameterError("templates must include the bare '{}' template (h0 is read there)")
    prompt_ids, subj = fact_rows(tokenizer, facts, templates)  # u*T rows
    ids, need = [], []
    tok_row, tok_pos, tok_label = [], [], []
    for r, (p, s) in enumerate(zip(prompt_ids, subj)):
        target = encode_target(tokenizer, facts[r // T].target)
        ids.append(p + target[:-1])
        for t, label in enumerate(target):
            tok_row.append(r)
            tok_pos.append(len(p) - 1 + t)
            tok_label.append(label)
        need.append(len(p) + len(target) - 2)
    kl_before, kl_after = config.kl_prompt.split("{}", 1)
    kl_row, kl_pos = [], []
    for i, f in enumerate(facts):
        text = kl_before + f.subject + kl_after
        row, s = encode_with_subject(tokenizer, text, len(kl_before), len(kl_before) + len(f.subject))
        pos = s if config.kl_position == "subject_last" else len(row) - 1
        kl_row.append(len(ids))
        kl_pos.append(pos)
        ids.append(row)
        subj.append(s)
        need.append(pos)
    fact = [r // T for r in range(u * T)] + list(range(u))
    L = torch.long
    return _Rows(
        ids=ids, subject=torch.tensor(subj, dtype=L), fact=torch.tensor(fact, dtype=L), need=torch.tensor(need, dtype=L),
        tok_row=torch.tensor(tok_row, dtype=L), tok_pos=torch.tensor(tok_pos, dtype=L),
        tok_label=torch.tensor(tok_label, dtype=L), kl_row=torch.tensor(kl_row, dtype=L),
        kl_pos=torch.tensor(kl_pos, dtype=L), plain_row=torch.arange(u, dtype=L) * T + plain[0], n_templates=T,
    )


# --------------------------------------------------------------------------------------------
# Forward paths: delta (u, d_model) float32 -> log-probs at the scored positions
# --------------------------------------------------------------------------------------------
class _FastPathUnavailable(Exception):
    pass


def _flat_arguments(fn, args, kwargs) -> tuple[str, dict]:
    """Bind a call to ``fn``'s signature; return (name of the first parameter, flat kwargs)."""
    sig = inspect.signature(fn)
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise _FastPathUnavailable(f"cannot bind decoder-layer arguments ({exc})") from None
    flat = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            flat.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise _FastPathUnavailable("decoder layer takes *args")
        else:
            flat[name] = value
    first = next(iter(sig.parameters))
    return first, flat


class _RecordingCache:
    """Duck-typed KV cache: returns keys/values unchanged and keeps the first ``keep`` positions."""

    def __init__(self, keep: int):
        self.keep = keep
        self.store: dict = {}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.store[layer_idx] = (key_states[..., : self.keep, :].detach(), value_states[..., : self.keep, :].detach())
        return key_states, value_states

    def get_seq_length(self, layer_idx=0):
        return 0


class _PrefixCache:
    """Duck-typed KV cache: prepends the recorded prefix keys/values to the new ones."""

    def __init__(self, store: dict):
        self.store = store
        self.prefix = next(iter(store.values()))[0].shape[-2] if store else 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        k, v = self.store[layer_idx]
        return torch.cat([k, key_states], dim=-2), torch.cat([v, value_states], dim=-2)

    def get_seq_length(self, layer_idx=0):
        return self.prefix


class _FastForward:
    """Re-run only the layers above ``layer``, only from each row's subject position onwards."""

    def __init__(self, model, spec: ModelSpec, layer: int, rows: _Rows, pad_id: int):
        impl = getattr(model.config, "_attn_implementation", None)
        if impl not in _SUPPORTED_ATTENTION:
            raise _FastPathUnavailable(f"attention implementation {impl!r} (fast path supports {_SUPPORTED_ATTENTION})")
        self.model, self.spec, self.layer = model, spec, layer
        device = model_device(model)
        R = len(rows.ids)
        # One extra padding column: the model then always materialises an explicit attention mask.
        input_ids, attn = right_pad(rows.ids, pad_id, device, extra=1)  # (R, S)
        S = input_ids.shape[1]
        s = rows.subject.to(device)  # (R,)
        n_need = (rows.need.to(device) - s + 1)  # (R,) positions needed from the subject on
        S_suf = int(n_need.max())
        P = int(s.max())  # prefix slots: positions 0..P-1 (row r uses 0..s_r-1)
        i = torch.arange(S_suf, device=device)
        valid = i[None, :] < n_need[:, None]  # (R, S_suf)
        # Padding queries copy the subject position: always a real token that attends to itself.
        self.q_src = torch.where(valid, s[:, None] + i[None, :], s[:, None])  # (R, S_suf)
        self.valid, self.R, self.S, self.P, self.S_suf, self.s = valid, R, S, P, S_suf, s

        layers = [get_module(model, spec.layer_path.format(l)) for l in range(spec.n_layers)]
        self.upper = layers[layer + 1:]
        self.calls: list[tuple[str, str | None, dict]] = []
        recorder = _RecordingCache(P)
        captured: dict = {}
        handles = []

        def pre_hook(module, args, kwargs):
            first, flat = _flat_arguments(module.forward, args, kwargs)
            hidden = flat.pop(first)
            cache_name = next((n for n in _CACHE_ARG_NAMES if n in inspect.signature(module.forward).parameters), None)
            if cache_name is not None:
                flat[cache_name] = recorder
            self.calls.append((first, cache_name, dict(flat)))
            return (hidden,), flat

        try:
            handles.append(layers[layer].register_forward_hook(
                lambda m, a, o: captured.__setitem__("h_z", first_tensor(o).detach())))
            handles.append(layers[-1].register_forward_hook(
                lambda m, a, o: captured.__setitem__("h_last", first_tensor(o).detach())))
            for module in self.upper:
                handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            base = getattr(model, "base_model", model)
            with torch.no_grad():
                base(input_ids=input_ids, attention_mask=attn, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        for _, cache_name, flat in self.calls:
            if cache_name is None:
                raise _FastPathUnavailable("a decoder layer takes no KV-cache argument")
            if "attention_mask" not in flat:
                raise _FastPathUnavailable("a decoder layer takes no attention_mask argument")
        if self.upper and len(recorder.store) != len(self.upper):
            raise _FastPathUnavailable("not every upper layer reported its keys/values")
        self.store = recorder.store
        self.h_z = captured["h_z"]  # (R, S, d)
        self.h_suffix = self._gather(self.h_z)  # (R, S_suf, d) input to layer+1 from the subject on
        self.h_last_suffix = self._gather(captured["h_last"])  # (R, S_suf, d) for the self-check
        # Arguments of each upper layer, sliced to the suffix queries (shared objects sliced once).
        memo: dict = {}
        self.kwargs = [
            (first, cache_name, {k: self._slice(k, v, memo) for k, v in flat.items() if k != cache_name})
            for first, cache_name, flat in self.calls
        ]
        self.norm = get_module(model, spec.final_norm_path)
        self.head = get_module(model, spec.lm_head_path)
        self.checked = not self.upper

    # -- argument slicing -----------------------------------------------------------------------
    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """(R, S, ...) -> (R, S_suf, ...) at the suffix positions of every row."""
        rows = torch.arange(self.R, device=x.device)[:, None]
        return x[rows, self.q_src.to(x.device)]

    def _rows_of(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == self.R:
            return torch.arange(self.R, device=x.device)
        if x.shape[0] == 1:
            return torch.zeros(self.R, dtype=torch.long, device=x.device)
        raise _FastPathUnavailable(f"unexpected batch size {x.shape[0]} in a layer argument")

    def _slice_positions(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.S:
            raise _FastPathUnavailable(f"position argument of shape {tuple(x.shape)}")
        b = self._rows_of(x)
        return x[b[:, None], self.q_src.to(x.device)]  # (R, S_suf, ...)

    def _slice_mask(self, m: torch.Tensor) -> torch.Tensor:
        """(B, H, S, S) mask -> (R, H, S_suf, P + S_suf) over [recorded prefix slots, suffix]."""
        if m.dim() != 4 or m.shape[-1] != self.S or m.shape[-2] != self.S:
            raise _FastPathUnavailable(f"attention mask of shape {tuple(m.shape)}")
        dev = m.device
        masked = m[0, 0, 0, self.S - 1]  # query 0 never sees the last key: the "masked" value
        b = self._rows_of(m)[:, None, None]  # (R, 1, 1)
        q = self.q_src.to(dev)[:, :, None]  # (R, S_suf, 1)
        s = self.s.to(dev)
        j = torch.arange(self.P, device=dev)
        pre = m.permute(0, 2, 3, 1)[b, q, j[None, None, :]]  # (R, S_suf, P, H)
        pre = torch.where((j[None, :] < s[:, None])[:, None, :, None], pre, masked)
        k_src = self.q_src.to(dev)[:, None, :]  # key i' sits at the position of suffix query i'
        suf = m.permute(0, 2, 3, 1)[b, q, k_src]  # (R, S_suf, S_suf, H)
        suf = torch.where(self.valid.to(dev)[:, None, :, None], suf, masked)
        return torch.cat([pre, suf], dim=2).permute(0, 3, 1, 2).contiguous()  # (R, H, S_suf, P + S_suf)

    def _slice(self, name: str, value, memo: dict):
        key = (name, id(value))
        if key in memo:
            return memo[key][1]
        if name == "attention_mask":
            if not isinstance(value, torch.Tensor):  # e.g. None: the layer would assume a plain causal mask
                raise _FastPathUnavailable(f"attention mask passed as {type(value).__name__}")
            out = self._slice_mask(value)
        elif value is None or isinstance(value, (bool, int, float, str)):
            out = value
        elif name in _POSITION_ARG_NAMES and isinstance(value, torch.Tensor):
            out = self._slice_positions(value)
        elif name in _POSITION_ARG_NAMES and isinstance(value, tuple) and all(isinstance(t, torch.Tensor) for t in value):
            out = tuple(self._slice_positions(t) for t in value)
        elif name == "cache_position" and isinstance(value, torch.Tensor):
            out = torch.arange(self.P, self.P + self.S_suf, device=value.device)
        else:
            raise _FastPathUnavailable(f"decoder-layer argument {name!r} of type {type(value).__name__}")
        memo[key] = (value, out)  # keep `value` alive so its id stays unique
        return out

    # -- one evaluation --------------------------------------------------------------------------
    def __call__(self, delta_rows: torch.Tensor, sel_row: torch.Tensor, sel_pos: torch.Tensor) -> torch.Tensor:
        """delta_rows (R, d) float32 -> float32 log-probs (N, vocab) at (sel_row, sel_pos).

        Only the rows named in ``sel_row`` are run, in groups of similar suffix length (a group
        is trimmed to its longest row), so padding and finished facts cost nothing."""
        dev = self.h_suffix.device
        sel_row, sel_pos = sel_row.to(dev), sel_pos.to(dev)
        n_need = self.valid.to(dev).sum(dim=1)  # (R,)
        order, xs = [], []
        for group in _length_groups(torch.unique(sel_row), n_need):
            n = int(n_need[group].max())
            h = self._run(group, n, delta_rows[group.to(delta_rows.device)])  # (g, n, d)
            local = torch.full((self.R,), -1, dtype=torch.long, device=dev)
            local[group] = torch.arange(len(group), device=dev)
            pick = (local[sel_row] >= 0).nonzero()[:, 0]  # selections in this group
            order.append(pick)
            xs.append(h[local[sel_row[pick]], sel_pos[pick] - self.s.to(dev)[sel_row[pick]]])
        self.checked = True
        x = torch.empty((len(sel_row), xs[0].shape[-1]), dtype=xs[0].dtype, device=dev)
        x = x.index_put((torch.cat(order),), torch.cat(xs))  # (N, d) back in selection order
        logits = self.head(self.norm(x)).float()  # (N, vocab)
        return torch.log_softmax(logits, dim=-1)

    def _run(self, group: torch.Tensor, n: int, delta: torch.Tensor) -> torch.Tensor:
        """The upper layers on rows ``group`` (g,) and their first ``n`` suffix positions."""
        h = self.h_suffix[group, :n]  # (g, n, d)
        h = torch.cat([h[:, :1] + delta[:, None].to(h.dtype), h[:, 1:]], dim=1)
        cols = torch.cat([torch.arange(self.P), self.P + torch.arange(n)])
        memo: dict = {}

        def sub(name, value):
            if id(value) in memo:
                return memo[id(value)]
            if name == "attention_mask":  # (R, H, S_suf, P + S_suf)
                out = value[group.to(value.device)][:, :, :n][..., cols.to(value.device)]
            elif name == "cache_position":
                out = value[:n]
            elif isinstance(value, torch.Tensor):  # position tensors (R, S_suf, ...)
                out = value[group.to(value.device), :n]
            elif isinstance(value, tuple):
                out = tuple(t[group.to(t.device), :n] for t in value)
            else:
                out = value
            memo[id(value)] = out
            return out

        store = {l: (k[group.to(k.device)], v[group.to(v.device)]) for l, (k, v) in self.store.items()}
        for module, (first, cache_name, kwargs) in zip(self.upper, self.kwargs):
            kw = {k: sub(k, v) for k, v in kwargs.items()}
            h = first_tensor(module(h, **{cache_name: _PrefixCache(store)}, **kw))
        if not self.checked:
            self._self_check(h, group, n)
        return h

    def _self_check(self, h: torch.Tensor, group: torch.Tensor, n: int) -> None:
        ref = self.h_last_suffix[group, :n]
        v = self.valid.to(h.device)[group, :n]
        err = (h.detach()[v].float() - ref[v].float()).norm() / ref[v].float().norm().clamp_min(1e-30)
        tol = 1e-4 if h.dtype in (torch.float32, torch.float64) else 3e-2
        if not bool(err <= tol):
            raise _FastPathUnavailable(f"self-check failed: relative error {float(err):.2e} > {tol:.0e}")


def _length_groups(rows: torch.Tensor, length: torch.Tensor, overhead: int = 32) -> list[torch.Tensor]:
    """Split ``rows`` into groups of similar ``length[row]`` minimising the padded work
    ``sum over groups of size * max length`` plus ``overhead`` positions per extra group
    (one dynamic-programming pass over the distinct lengths, shortest first)."""
    lens = length[rows]
    values, counts = torch.unique(lens, return_counts=True)  # ascending
    values, counts = values.tolist(), counts.tolist()
    m = len(values)
    best = [0.0] + [float("inf")] * m  # best[j]: cost of the first j distinct lengths
    cut = [0] * (m + 1)
    for j in range(1, m + 1):
        for i in range(j):  # the last group holds lengths i..j-1
            cost = best[i] + sum(counts[i:j]) * values[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], m
    while j > 0:
        i = cut[j]
        groups.append(rows[(lens >= values[i]) & (lens <= values[j - 1])])
        j = i
    return groups[::-1]


class _NaiveForward:
    """The whole model on every row and position, with a hook adding delta after ``layer``."""

    def __init__(self, model, spec: ModelSpec, layer: int, rows: _Rows, pad_id: int):
        self.model = model
        device = model_device(model)
        self.input_ids, self.attn = right_pad(rows.ids, pad_id, device)
        self.module = get_module(model, spec.layer_path.format(layer))
        self.rows = torch.arange(len(rows.ids))
        self.subject = rows.subject
        with torch.no_grad():
            captured = {}
            handle = self.module.register_forward_hook(lambda m, a, o: captured.__setitem__("h", first_tensor(o).detach()))
            try:
                base = getattr(model, "base_model", model)
                base(input_ids=self.input_ids, attention_mask=self.attn, use_cache=False)
            finally:
                handle.remove()
        self.h_z = captured["h"]

    def __call__(self, delta_rows, sel_row, sel_pos):
        def add(module, args, output):
            h = first_tensor(output)
            idx = (self.rows.to(h.device), self.subject.to(h.device))
            h = h.index_put(idx, delta_rows.to(device=h.device, dtype=h.dtype), accumulate=True)
            return h if isinstance(output, torch.Tensor) else (h, *output[1:])

        handle = self.module.register_forward_hook(add)
        try:
            logits = self.model(input_ids=self.input_ids, attention_mask=self.attn, use_cache=False).logits
        finally:
            handle.remove()
        x = logits[sel_row.to(logits.device), sel_pos.to(logits.device)].float()  # (N, vocab)
        return torch.log_softmax(x, dim=-1)


# --------------------------------------------------------------------------------------------
# The optimisation
# --------------------------------------------------------------------------------------------
def compute_values(model, tokenizer, spec: ModelSpec, layer: int, facts, templates: Sequence[str],
                   config: ValueConfig | None = None, *, naive: bool = False) -> ValueResult:
    """Optimise ``z* = h0 + delta`` for every fact at decoder layer ``layer`` (the last edited layer).

    Parameters
    ----------
    model, tokenizer : a supported causal LM (see :func:`rlsedit_llm.models.detect_spec`)
    spec : its :class:`ModelSpec`
    layer : the layer whose output (residual stream) receives ``delta``
    facts : :class:`Fact` objects or records; validated first (:class:`FactError`)
    templates : context templates; must include the bare ``"{}"``
    config : :class:`ValueConfig`; default :func:`default_value_config`
    naive : use the full-model reference path instead of the fast path

    Returns
    -------
    :class:`ValueResult` with ``target``/``initial`` of shape (u, d_model), float32, on the
    device of decoder layer ``layer``. The model's weights are never modified and receive no
    gradients; ``requires_grad`` flags and train/eval mode are restored.
    """
    facts = as_facts(facts)
    if not facts:
        raise FactError("no facts given")
    validate_facts(facts, tokenizer)
    templates = list(templates)
    if not templates:
        raise HyperparameterError("templates must not be empty; use ['{}'] for the bare prompt")
    config = config if config is not None else default_value_config(spec)
    if not isinstance(config, ValueConfig):
        raise HyperparameterError(f"config must be a ValueConfig; got {type(config).__name__}")
    config.validate()
    if not isinstance(layer, int) or not 0 <= layer < spec.n_layers:
        raise HyperparameterError(f"layer must be an int in [0, {spec.n_layers}); got {layer!r}")
    rows = _build_rows(tokenizer, facts, templates, config)
    pad = _pad_id(tokenizer)

    was_training = model.training
    flags = set_requires_grad(model, False)
    model.eval()
    try:
        forward = None
        if not naive:
            try:
                forward = _FastForward(model, spec, layer, rows, pad)
                result = _optimise(forward, rows, config, len(facts), path="fast")
            except _FastPathUnavailable as exc:
                log.warning("fast value path unavailable for %s (%s); using the full-model path", spec.family, exc)
                forward = None
        if forward is None:
            forward = _NaiveForward(model, spec, layer, rows, pad)
            result = _optimise(forward, rows, config, len(facts), path="naive")
    finally:
        restore_requires_grad(model, flags)
        model.train(was_training)
    dev = next(get_module(model, spec.layer_path.format(layer)).parameters()).device
    result.target, result.initial = result.target.to(dev), result.initial.to(dev)
    return result


def _optimise(forward, rows: _Rows, config: ValueConfig, u: int, *, path: str) -> ValueResult:
    h_z = forward.h_z
    device = h_z.device
    h0 = h_z[rows.plain_row.to(device), rows.subject[rows.plain_row].to(device)].float()  # (u, d)
    h0_norm = h0.norm(dim=1)  # (u,)
    max_norm = config.clamp_norm_factor * h0_norm  # (u,)

    labels = rows.tok_label.to(device)
    tok_row, tok_pos = rows.tok_row.to(device), rows.tok_pos.to(device)
    kl_row, kl_pos = rows.kl_row.to(device), rows.kl_pos.to(device)
    row_fact = rows.fact.to(device)
    tok_fact = row_fact[tok_row]  # (n_tok,)
    n_template_rows = u * rows.n_templates
    tokens_per_row = torch.bincount(tok_row, minlength=n_template_rows).clamp_min(1).float()  # (u*T,)

    delta = torch.zeros_like(h0, requires_grad=True)  # (u, d) float32
    opt = torch.optim.Adam([delta], lr=config.lr)
    active = torch.ones(u, dtype=torch.bool, device=device)
    last_loss = torch.zeros(u, device=device)
    last_nll = torch.zeros(u, device=device)
    kl_init = None
    result = ValueResult(target=h0, initial=h0, path=path)
    with torch.enable_grad():
        for it in range(config.steps):
            opt.zero_grad(set_to_none=True)
            # Only active facts are evaluated: a finished fact's loss no longer changes.
            keep = active[tok_fact]  # (n_tok,)
            facts_on = active.nonzero()[:, 0]  # (a,)
            n_tok = int(keep.sum())
            sel_row = torch.cat([tok_row[keep], kl_row[facts_on]])  # (N,)
            sel_pos = torch.cat([tok_pos[keep], kl_pos[facts_on]])
            logp = forward(delta[row_fact], sel_row, sel_pos)  # (N, vocab) float32
            tok_logp = logp[:n_tok].gather(1, labels[keep][:, None])[:, 0]  # (n_tok,)
            row_nll = torch.zeros(n_template_rows, device=device).index_add(0, tok_row[keep], -tok_logp)
            nll = (row_nll / tokens_per_row).view(u, rows.n_templates).mean(dim=1)[facts_on]  # (a,)
            kl_logp = logp[n_tok:]  # (a, vocab)
            if kl_init is None:  # the first evaluation has delta = 0 and every fact active
                kl_init = kl_logp.detach()
            kl = (kl_logp.exp() * (kl_logp - kl_init[facts_on])).sum(dim=1)  # (a,) KL(edited || unedited)
            decay = config.weight_decay * delta[facts_on].norm(dim=1) / h0_norm[facts_on].pow(2)
            loss = nll + config.kl_factor * kl + decay  # (a,)
            last_loss[facts_on], last_nll[facts_on] = loss.detach(), nll.detach()
            result.loss_history.append(float(last_loss.mean()))
            result.nll_history.append(float(last_nll.mean()))
            result.final_loss, result.final_nll = last_loss.clone(), last_nll.clone()
            still = ~(loss.detach() < config.early_stop_loss)  # (a,)
            active[facts_on] = still
            if not bool(active.any()) or it == config.steps - 1:
                break
            loss[still].sum().backward()
            before = delta.detach().clone()
            opt.step()
            with torch.no_grad():
                delta[~active] = before[~active]  # finished facts keep their delta
                norms = delta.norm(dim=1)
                scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-30), torch.ones_like(norms))
                delta.mul_(scale[:, None])
            result.steps_run += 1
    result.target = (h0 + delta.detach()).float()
    result.initial = h0.clone()
    return result
