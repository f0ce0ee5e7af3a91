"""Values of the MEMIT lineage: the target hidden state ``z*`` of each fact at the last edited layer.

For fact ``i`` a vector ``delta_i`` is added to the residual stream after decoder layer ``layer``
(the last edited layer) at the subject's last token, in every row of that fact:

* one row per context template: the templated prompt followed by the target minus its last token
  (target tokens from :func:`~rlsedit_llm.pipeline.facts.encode_target`, the tokens the scorer
  reads), whose next-token predictions are scored against the target tokens;
* one KL row: ``"{subject} is a"``.

Per fact the loss is (all terms as in MEMIT/AlphaEdit's ``compute_z``)

    nll_i   = mean over template rows of (mean over target tokens of -log p(token))
    kl_i    = KL(p_edited || p_unedited) of the next-token distribution at the subject's last
              token of the KL row
    loss_i  = nll_i + kl_factor * kl_i + weight_decay * ||delta_i|| / ||h0_i||^2

with ``h0_i`` the unedited output of layer ``layer`` at the subject's last token of the bare
prompt (the unsquared numerator is deliberate: it is the published loss). Adam with ``lr``; at
most ``steps`` loss evaluations and ``steps - 1`` updates; a fact stops (its ``delta`` frozen)
once ``loss_i < early_stop_loss`` (with ``stop_when_top1`` also once every target token is the
argmax in every template row: ENCORE's MPES); after every update
``||delta_i|| <= clamp_norm_factor * ||h0_i||``.
All facts are optimised in one batch; since every ``delta_i`` only enters its own rows and Adam is
element-wise, this equals optimising each fact alone.

Two optimisers of that same loss (``ValueConfig.optimizer``):

* ``"adam"`` (default): the published one above, unchanged (what comparisons with the literature use);
* ``"lbfgs"``: per-fact limited-memory BFGS on the small smooth problem of each fact (one vector
  of the model width): a steepest-descent first step of length ``lbfgs_first_step * ||h0_i||``,
  then quasi-Newton directions from the fact's last ``lbfgs_history`` curvature pairs, each step
  at most ``lbfgs_max_step * ||h0_i||`` long and projected onto the clamp ball, accepted if it
  lowers the fact's loss enough (Armijo), else shortened and retried at the next evaluation. A
  fact stops once its NLL part is below ``stop_nll`` (the total loss rarely reaches
  ``early_stop_loss``: the KL term keeps it above), or by the published criteria; ``steps`` is
  its budget of evaluations. Each evaluation runs only the facts still optimising, so converged
  facts cost nothing. Every evaluation is a forward and a backward pass, as an Adam step is.
  Opt-in, not the default: on SmolLM2 (200 CounterFact edits in batches of 100,
  ``benchmarks/value_speed.py``, ``docs/assets/speed/``) it took 10.1 evaluations per fact
  against Adam's 22.4 but lost 2 points of efficacy and 5 of generalization (its values reach
  the target NLL with a smaller, differently directed ``delta`` than Adam's sign-like steps).

Two interchangeable forward paths (:mod:`rlsedit_llm.pipeline.fast_forward`) produce the
log-probabilities the loss needs: **fast** (default) re-runs only the layers above ``layer`` on
the positions from the subject onwards, checked against the full pass at step 0 (on any mismatch
or unsupported attention the naive path is used and a warning logged); **naive** (``naive=True``)
runs the full model on every row at every step, the reference the fast path is tested against.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from rlsedit_llm.adapters.hooks import requires_grad_set
from rlsedit_llm.adapters.spec import ModelSpec, get_module
from rlsedit_llm.errors import HyperparameterError, NonFiniteError
from rlsedit_llm.interrupts import poll_interrupts
from rlsedit_llm.pipeline.facts import checked_facts, encode_target
from rlsedit_llm.pipeline.fast_forward import FastForward, FastPathUnavailable, NaiveForward, ValueForward
from rlsedit_llm.pipeline.keys import check_templates, encode_with_subject, fact_rows, template_parts
from rlsedit_llm.pipeline.moment_pass import progress_bar
from rlsedit_llm.pipeline.tokens import needs_bos, pad_id
from rlsedit_llm.presets import SMALL_MODEL_D_MODEL, family_presets

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rlsedit_llm.pipeline.facts import Fact

log = logging.getLogger(__name__)

__all__ = ["ValueConfig", "ValueResult", "default_value_config", "compute_values", "anchor_norms"]


#: The value optimisers (:attr:`ValueConfig.optimizer`).
OPTIMIZERS = ("adam", "lbfgs")
MAX_LBFGS_HISTORY = 100
#: ValueConfig.compute_dtype -> the autocast dtype of the fast path's evaluations (None: none).
_COMPUTE_DTYPES: dict[str, torch.dtype | None] = {"model": None, "bfloat16": torch.bfloat16}
#: Armijo's sufficient-decrease constant and the factor a rejected L-BFGS step is shortened by;
#: a fact whose step has been shortened below ``_LBFGS_MIN_SCALE`` stops (no descent left).
_ARMIJO_C1 = 1e-4
_LBFGS_BACKTRACK = 0.25
_LBFGS_MIN_SCALE = 1e-3

#: Seconds a value optimisation runs before its progress bar appears (a short one shows none).
PROGRESS_DELAY = 3.0
MAX_VALUE_STEPS = 10_000  # far above the published 20-25; more is a typo, not a setting
# name -> (low, high, low excluded). Adam moves each coordinate of delta by about lr per step:
# the published lr is 0.1-0.5, and above 10 the first step overshoots ||h0|| by far, the clamp
# cuts it back, and the value optimisation stops reaching the target.
# The others have no natural ceiling (early_stop_loss=1e9 legitimately means "stop at once").
_FLOAT_RANGES = {
    "lr": (0.0, 10.0, True),
    "stop_nll": (0.0, math.inf, False),
    "lbfgs_first_step": (0.0, 10.0, True),
    "lbfgs_max_step": (0.0, 10.0, True),
    "weight_decay": (0.0, math.inf, False),
    "clamp_norm_factor": (0.0, math.inf, True),
    "kl_factor": (0.0, math.inf, False),
    "early_stop_loss": (0.0, math.inf, False),
}


@dataclass(frozen=True)
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
    stop_when_top1 : also stop a fact at the first evaluation at which every target token is the
        (teacher-forced) most probable token in every one of its template rows: ENCORE's
        most-probable early stopping (MPES). Off by default (the published AlphaEdit/RLSEdit loss)
    optimizer : ``"adam"`` (the published optimiser, default) or ``"lbfgs"`` (per-fact L-BFGS of the
        same loss with a per-fact stop on the NLL part; see the module docstring). The fields below
        are read by ``"lbfgs"`` only
    stop_nll : ``"lbfgs"`` stops a fact once its NLL part (mean over template rows) is below this
    lbfgs_history : curvature pairs kept per fact
    lbfgs_first_step : length of the first (steepest-descent) step, as a multiple of ``||h0||``
    lbfgs_max_step : the longest step, as a multiple of ``||h0||``
    max_batch : the most facts optimised together (None: all of an edit call at once). A larger
        call is optimised in sub-batches of at most this many facts, one after the other: each
        fact's problem is independent of the others, so the values are the same (up to the
        summation order of floating point) and the value stage's peak memory, which grows
        linearly with the facts optimised together, is bounded (``docs/llm/scale.md``, "Memory
        of one edit call")
    compute_dtype : ``"model"`` (default: the model's own dtype) or ``"bfloat16"``: on the fast
        path, every evaluation after the first (which is checked against the full model in the
        model's dtype) runs the upper layers under ``torch.autocast`` to bfloat16; the head, the
        log-softmax, the loss and ``delta`` stay float32. Measured on SmolLM2 on a 2-core
        AVX512-BF16 CPU: the published quality, but no speed-up at 1 thread (the autocast casts
        eat the faster matrix products; ``benchmarks/value_ab.py``, ``docs/assets/speed/``); meant
        for devices whose bfloat16 matrix units are much faster than their float32 ones (GPUs),
        where it is not yet measured. The naive path ignores it (it is the float reference)
    """

    lr: float = 0.5
    steps: int = 25
    weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    early_stop_loss: float = 0.05
    kl_prompt: str = "{} is a"
    kl_position: str = "subject_last"
    stop_when_top1: bool = False
    optimizer: str = "adam"
    stop_nll: float = 0.02
    lbfgs_history: int = 8
    lbfgs_first_step: float = 0.2
    lbfgs_max_step: float = 0.5
    max_batch: int | None = None
    compute_dtype: str = "model"

    def validate(self) -> None:
        """Raise :class:`HyperparameterError` naming the first bad setting and its allowed range.

        Called by :meth:`EditConfig.validate <rlsedit_llm.editing.config.EditConfig.validate>`
        (so an :class:`~rlsedit_llm.Editor` refuses a bad setting when it is built) and by
        :func:`compute_values`. Frozen: change a setting with ``dataclasses.replace``.
        """
        for name, (low, high, low_open) in _FLOAT_RANGES.items():
            v = getattr(self, name)
            # bool is an int: True must not pass as 1.0
            in_range = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                        and (v > low if low_open else v >= low) and v <= high)
            if not in_range:
                bounds = f"{'(' if low_open else '['}{low:g}, {high:g}{']' if math.isfinite(high) else ')'}"
                raise HyperparameterError(f"ValueConfig.{name} must be a finite number in {bounds}; got {v!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= MAX_VALUE_STEPS:
            raise HyperparameterError(
                f"ValueConfig.steps must be an int in [1, {MAX_VALUE_STEPS}]; got {self.steps!r}")
        if not isinstance(self.kl_prompt, str) or self.kl_prompt.count("{}") != 1:
            raise HyperparameterError(f"ValueConfig.kl_prompt must contain exactly one '{{}}'; got {self.kl_prompt!r}")
        if self.kl_position not in ("subject_last", "prompt_last"):
            raise HyperparameterError(
                f"ValueConfig.kl_position must be 'subject_last' or 'prompt_last'; got {self.kl_position!r}"
            )
        if not isinstance(self.stop_when_top1, bool):
            raise HyperparameterError(f"ValueConfig.stop_when_top1 must be a bool; got {self.stop_when_top1!r}")
        if not isinstance(self.optimizer, str) or self.optimizer not in OPTIMIZERS:
            raise HyperparameterError(f"ValueConfig.optimizer must be one of {OPTIMIZERS}; got {self.optimizer!r}")
        if (isinstance(self.lbfgs_history, bool) or not isinstance(self.lbfgs_history, int)
                or not 1 <= self.lbfgs_history <= MAX_LBFGS_HISTORY):
            raise HyperparameterError(
                f"ValueConfig.lbfgs_history must be an int in [1, {MAX_LBFGS_HISTORY}]; got {self.lbfgs_history!r}")
        if self.compute_dtype not in _COMPUTE_DTYPES:
            raise HyperparameterError(
                f"ValueConfig.compute_dtype must be one of {tuple(_COMPUTE_DTYPES)}; got {self.compute_dtype!r}")
        if self.max_batch is not None and (isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int)
                                           or self.max_batch < 1):
            raise HyperparameterError(
                f"ValueConfig.max_batch must be None (no limit) or an int >= 1; got {self.max_batch!r}")


def default_value_config(spec: ModelSpec) -> ValueConfig:
    """Per-family defaults from :data:`rlsedit_llm.presets.FAMILY_PRESETS`: GPT-2 lr 0.5 and 20
    steps; GPT-J/NeoX lr 0.5; Llama-like lr 0.1, except models with ``d_model < 1024`` (e.g.
    SmolLM2-135M), which keep lr 0.5: at lr 0.1 their values often miss the target within 25
    steps (measured on SmolLM2 with CounterFact)."""
    row = family_presets(spec.family)
    lr = row["value_lr"].value
    if "value_lr_small" in row and spec.d_model < SMALL_MODEL_D_MODEL:
        lr = row["value_lr_small"].value
    steps = row["value_steps"].value if "value_steps" in row else ValueConfig.steps
    return ValueConfig(lr=float(lr), steps=int(steps))


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
    top1 : (u,) bool, whether each fact's target was top-1 in all its template rows at its last
        evaluation (only with ``ValueConfig.stop_when_top1``; None otherwise)
    fact_steps : (u,) int64, loss evaluations each fact took part in (its share of the cost)
    optimizer : the optimiser that ran (``ValueConfig.optimizer``)
    """

    target: torch.Tensor
    initial: torch.Tensor
    loss_history: list[float] = field(default_factory=list)
    nll_history: list[float] = field(default_factory=list)
    steps_run: int = 0
    final_loss: torch.Tensor | None = None
    final_nll: torch.Tensor | None = None
    path: str = "fast"
    top1: torch.Tensor | None = None
    fact_steps: torch.Tensor | None = None
    optimizer: str = "adam"

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


def _build_rows(tokenizer, facts, templates, config: ValueConfig, *, bos: bool = False) -> _Rows:
    u, T = len(facts), len(templates)
    plain = [j for j, t in enumerate(templates) if template_parts(t) == ("", "")]
    if not plain:
        raise HyperparameterError("templates must include the bare '{}' template (h0 is read there)")
    prompt_ids, subj = fact_rows(tokenizer, facts, templates, bos=bos)  # u*T rows
    ids, need = [], []
    tok_row, tok_pos, tok_label = [], [], []
    for r, (p, _s) in enumerate(zip(prompt_ids, subj, strict=True)):  # fact_rows: one position per row
        target = encode_target(tokenizer, facts[r // T].target)
        ids.append(p + target[:-1])
        for t, label in enumerate(target):
            tok_row.append(r)
            tok_pos.append(len(p) - 1 + t)
            tok_label.append(label)
        need.append(len(p) + len(target) - 2)
    kl_before, kl_after = config.kl_prompt.split("{}", 1)
    kl_row, kl_pos = [], []
    for _i, f in enumerate(facts):
        text = kl_before + f.subject + kl_after
        row, s = encode_with_subject(tokenizer, text, len(kl_before), len(kl_before) + len(f.subject), bos=bos)
        pos = s if config.kl_position == "subject_last" else len(row) - 1
        kl_row.append(len(ids))
        kl_pos.append(pos)
        ids.append(row)
        subj.append(s)
        need.append(pos)
    fact = [r // T for r in range(u * T)] + list(range(u))
    L = torch.long
    return _Rows(
        ids=ids, subject=torch.tensor(subj, dtype=L), fact=torch.tensor(fact, dtype=L),
        need=torch.tensor(need, dtype=L),
        tok_row=torch.tensor(tok_row, dtype=L), tok_pos=torch.tensor(tok_pos, dtype=L),
        tok_label=torch.tensor(tok_label, dtype=L), kl_row=torch.tensor(kl_row, dtype=L),
        kl_pos=torch.tensor(kl_pos, dtype=L), plain_row=torch.arange(u, dtype=L) * T + plain[0], n_templates=T,
    )


# --------------------------------------------------------------------------------------------
# The optimisation
# --------------------------------------------------------------------------------------------
def compute_values(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, spec: ModelSpec, layer: int,
                   facts: Iterable[Fact | Mapping[str, Any]], templates: Sequence[str],
                   config: ValueConfig | None = None, *, naive: bool = False, progress: bool = True) -> ValueResult:
    """Optimise ``z* = h0 + delta`` for every fact at decoder layer ``layer`` (the last edited layer).

    Parameters
    ----------
    model, tokenizer : a supported causal LM (see :func:`rlsedit_llm.adapters.spec.detect_spec`)
    spec : its :class:`ModelSpec`
    layer : the layer whose output (residual stream) receives ``delta``
    facts : :class:`Fact` objects or records; validated first (:class:`FactError`)
    templates : context templates; must include the bare ``"{}"``
    config : :class:`ValueConfig`; default :func:`default_value_config`
    naive : use the full-model reference path instead of the fast path
    progress : a tqdm bar over the steps, shown only once the optimisation has run for
        :data:`PROGRESS_DELAY` seconds and removed when it ends (``TQDM_DISABLE`` also switches it off)

    Returns
    -------
    :class:`ValueResult` with ``target``/``initial`` of shape (u, d_model), float32, on the
    device of decoder layer ``layer``. The model's weights are never modified and receive no
    gradients; ``requires_grad`` flags and train/eval mode are restored.
    """
    facts = checked_facts(facts, tokenizer, purpose="compute values for")
    templates = check_templates(templates)
    config = config if config is not None else default_value_config(spec)
    if not isinstance(config, ValueConfig):
        raise HyperparameterError(f"config must be a ValueConfig; got {type(config).__name__}")
    config.validate()
    if not isinstance(layer, int) or not 0 <= layer < spec.n_layers:
        raise HyperparameterError(f"layer must be an int in [0, {spec.n_layers}); got {layer!r}")
    size = config.max_batch or max(len(facts), 1)
    parts = [_values_of(model, tokenizer, spec, layer, facts[i:i + size], templates, config, naive=naive,
                        progress=progress) for i in range(0, len(facts), size)]
    result = parts[0] if len(parts) == 1 else _concatenate(parts)
    dev = next(get_module(model, spec.layer_path.format(layer)).parameters()).device
    result.target, result.initial = result.target.to(dev), result.initial.to(dev)
    return result


def _values_of(model, tokenizer, spec: ModelSpec, layer: int, facts: Sequence[Fact], templates: Sequence[str],
               config: ValueConfig, *, naive: bool, progress: bool) -> ValueResult:
    """:func:`compute_values` on one batch of checked facts (at most ``config.max_batch``)."""
    rows = _build_rows(tokenizer, facts, templates, config, bos=needs_bos(spec))
    pad = pad_id(tokenizer)
    optimise = _optimise_lbfgs if config.optimizer == "lbfgs" else _optimise

    was_training = model.training
    with requires_grad_set(model, False):
        try:
            model.eval()
            forward: ValueForward | None = None
            if not naive:
                try:
                    forward = FastForward(model, spec, layer, rows, pad,
                                          compute_dtype=_COMPUTE_DTYPES[config.compute_dtype])
                    result = optimise(forward, rows, config, len(facts), path="fast", progress=progress)
                except FastPathUnavailable as exc:
                    log.warning("fast value path unavailable for %s (%s); using the full-model path", spec.family, exc)
                    forward = None
            if forward is None:
                forward = NaiveForward(model, spec, layer, rows, pad)
                result = optimise(forward, rows, config, len(facts), path="naive", progress=progress)
        finally:
            model.train(was_training)
    return result


def _concatenate(parts: list[ValueResult]) -> ValueResult:
    """One :class:`ValueResult` of sub-batches optimised one after the other: per-fact tensors
    concatenated in fact order; the histories are fact-weighted means per evaluation (a part that
    stopped early keeps its last value), ``steps_run`` the most any part took."""
    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if any(v is None for v in values) else torch.cat([v.to(values[0].device) for v in values])

    sizes = [len(p.target) for p in parts]

    def history(name: str) -> list[float]:
        runs = [getattr(p, name) for p in parts]
        n = max(len(r) for r in runs)
        return [sum(s * r[min(i, len(r) - 1)] for s, r in zip(sizes, runs, strict=True) if r) / sum(sizes)
                for i in range(n)]

    dev = parts[0].target.device
    return ValueResult(
        target=torch.cat([p.target.to(dev) for p in parts]), initial=torch.cat([p.initial.to(dev) for p in parts]),
        loss_history=history("loss_history"), nll_history=history("nll_history"),
        steps_run=max(p.steps_run for p in parts), final_loss=cat("final_loss"), final_nll=cat("final_nll"),
        path="naive" if any(p.path == "naive" for p in parts) else parts[0].path, top1=cat("top1"),
        fact_steps=cat("fact_steps"), optimizer=parts[0].optimizer)


def _optimise(forward, rows: _Rows, config: ValueConfig, u: int, *, path: str, progress: bool = True) -> ValueResult:
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
    last_top1 = torch.zeros(u, dtype=torch.bool, device=device) if config.stop_when_top1 else None
    kl_init = None
    fact_steps = torch.zeros(u, dtype=torch.long, device=device)
    result = ValueResult(target=h0, initial=h0, path=path)
    # A small batch ends before the bar's delay and never shows it.
    bar = progress_bar(progress, total=config.steps, desc="value optimisation", unit="step", leave=False,
                       delay=PROGRESS_DELAY)
    with bar, torch.enable_grad():
        for it in range(config.steps):
            bar.update(1)
            poll_interrupts()  # a safe point: Ctrl-C stops the edit here (nothing is changed yet)
            opt.zero_grad(set_to_none=True)
            # Only active facts are evaluated: a finished fact's loss no longer changes.
            keep = active[tok_fact]  # (n_tok,)
            facts_on = active.nonzero()[:, 0]  # (a,)
            n_tok = int(keep.sum())
            fact_steps[facts_on] += 1
            sel_row = torch.cat([tok_row[keep], kl_row[facts_on]])  # (N,)
            sel_pos = torch.cat([tok_pos[keep], kl_pos[facts_on]])
            logp = forward(delta[row_fact], sel_row, sel_pos)  # (N, vocab) float32
            tok_logp = logp[:n_tok].gather(1, labels[keep][:, None])[:, 0]  # (n_tok,)
            row_nll = torch.zeros(n_template_rows, device=device).index_add(0, tok_row[keep], -tok_logp)
            nll = (row_nll / tokens_per_row).view(u, rows.n_templates).mean(dim=1)[facts_on]  # (a,)
            kl_logp = logp[n_tok:]  # (a, vocab)
            if kl_init is None:  # the first evaluation has delta = 0 and every fact active
                kl_init = kl_logp.detach()
                first_nll = nll.detach().clone()  # (u,)
            kl = (kl_logp.exp() * (kl_logp - kl_init[facts_on])).sum(dim=1)  # (a,) KL(edited || unedited)
            decay = config.weight_decay * delta[facts_on].norm(dim=1) / h0_norm[facts_on].pow(2)
            loss = nll + config.kl_factor * kl + decay  # (a,)
            last_loss[facts_on], last_nll[facts_on] = loss.detach(), nll.detach()
            result.loss_history.append(float(last_loss.mean()))
            result.nll_history.append(float(last_nll.mean()))
            bar.set_postfix(loss=f"{result.loss_history[-1]:.3g}", refresh=False)
            result.final_loss, result.final_nll = last_loss.clone(), last_nll.clone()
            still = ~(loss.detach() < config.early_stop_loss)  # (a,)
            if last_top1 is not None:  # MPES: every target token is the argmax in every template row
                wrong = (logp[:n_tok].detach().argmax(dim=1) != labels[keep]).float()  # (n_tok,)
                top1 = torch.zeros(u, device=device).index_add(0, tok_fact[keep], wrong)[facts_on] == 0  # (a,)
                last_top1[facts_on] = top1
                result.top1 = last_top1.clone()
                still = still & ~top1
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
    result.fact_steps = fact_steps
    _check_progress(result, first_nll, config)
    return result


def _optimise_lbfgs(forward, rows: _Rows, config: ValueConfig, u: int, *, path: str,
                    progress: bool = True) -> ValueResult:
    """Per-fact L-BFGS of the published loss (``ValueConfig(optimizer="lbfgs")``; module docstring).

    Every fact carries its own accepted point ``x_i``, its loss and gradient there, its curvature
    pairs and its trial point. One evaluation (forward + backward over the facts still
    optimising) scores every trial point; a trial that lowers the fact's loss enough (Armijo) is
    accepted and gives a new quasi-Newton direction, one that does not is shortened towards
    ``x_i`` and tried at the next evaluation. Facts are independent: each ``delta_i`` only
    enters its own rows, and every dot product below is per fact (row-wise)."""
    h_z = forward.h_z
    device = h_z.device
    h0 = h_z[rows.plain_row.to(device), rows.subject[rows.plain_row].to(device)].float()  # (u, d)
    h0_norm = h0.norm(dim=1)  # (u,)
    radius = config.clamp_norm_factor * h0_norm  # (u,)

    labels = rows.tok_label.to(device)
    tok_row, tok_pos = rows.tok_row.to(device), rows.tok_pos.to(device)
    kl_row, kl_pos = rows.kl_row.to(device), rows.kl_pos.to(device)
    row_fact = rows.fact.to(device)
    tok_fact = row_fact[tok_row]  # (n_tok,)
    n_template_rows = u * rows.n_templates
    tokens_per_row = torch.bincount(tok_row, minlength=n_template_rows).clamp_min(1).float()  # (u*T,)
    kl_init: torch.Tensor | None = None  # (u, vocab) unedited KL-row log-probs (first evaluation)

    def evaluate(point: torch.Tensor, on: torch.Tensor):
        """Loss, NLL, gradient and top-1 flags (or None) of facts ``on`` (a,) at ``point`` (u, d)."""
        nonlocal kl_init
        delta = point.detach().clone().requires_grad_(True)
        is_on = torch.zeros(u, dtype=torch.bool, device=device)
        is_on[on] = True
        keep = is_on[tok_fact]  # (n_tok,)
        n_tok = int(keep.sum())
        sel_row = torch.cat([tok_row[keep], kl_row[on]])
        sel_pos = torch.cat([tok_pos[keep], kl_pos[on]])
        logp = forward(delta[row_fact], sel_row, sel_pos)  # (N, vocab) float32
        tok_logp = logp[:n_tok].gather(1, labels[keep][:, None])[:, 0]  # (n_tok,)
        row_nll = torch.zeros(n_template_rows, device=device).index_add(0, tok_row[keep], -tok_logp)
        nll = (row_nll / tokens_per_row).view(u, rows.n_templates).mean(dim=1)[on]  # (a,)
        kl_logp = logp[n_tok:]  # (a, vocab)
        if kl_init is None:  # the first evaluation: delta = 0, every fact on
            kl_init = kl_logp.detach()
        kl = (kl_logp.exp() * (kl_logp - kl_init[on])).sum(dim=1)  # (a,) KL(edited || unedited)
        decay = config.weight_decay * delta[on].norm(dim=1) / h0_norm[on].pow(2)
        loss = nll + config.kl_factor * kl + decay  # (a,)
        (grad,) = torch.autograd.grad(loss.sum(), delta)
        top1 = None
        if config.stop_when_top1:
            wrong = (logp[:n_tok].detach().argmax(dim=1) != labels[keep]).float()  # (n_tok,)
            top1 = torch.zeros(u, device=device).index_add(0, tok_fact[keep], wrong)[on] == 0  # (a,)
        return loss.detach(), nll.detach(), grad[on], top1

    def project(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """Rows of ``p`` scaled into the balls of radii ``r`` (the published clamp)."""
        n = p.norm(dim=1)
        return p * torch.where(n > r, r / n.clamp_min(1e-30), torch.ones_like(n))[:, None]

    m = config.lbfgs_history
    x = torch.zeros_like(h0)  # accepted points
    trial = torch.zeros_like(h0)  # the next point each fact evaluates
    direction = torch.zeros_like(h0)
    scale = torch.ones(u, device=device)  # fraction of `direction` in the current trial
    f_x = torch.zeros(u, device=device)
    nll_x = torch.zeros(u, device=device)
    g_x = torch.zeros_like(h0)
    S = torch.zeros((m, *h0.shape), device=device)  # curvature pairs, ring buffer per fact
    Y = torch.zeros_like(S)
    rho = torch.zeros((m, u), device=device)  # 1 / (s . y); 0 marks an empty slot
    n_pairs = torch.zeros(u, dtype=torch.long, device=device)
    accepted = torch.zeros(u, dtype=torch.bool, device=device)  # has an accepted point
    active = torch.ones(u, dtype=torch.bool, device=device)
    fact_steps = torch.zeros(u, dtype=torch.long, device=device)
    top1_x = torch.zeros(u, dtype=torch.bool, device=device) if config.stop_when_top1 else None
    first_nll = torch.zeros(u, device=device)
    result = ValueResult(target=h0, initial=h0, path=path, optimizer="lbfgs")
    bar = progress_bar(progress, total=config.steps, desc="value optimisation (L-BFGS)", unit="step", leave=False,
                       delay=PROGRESS_DELAY)
    with bar, torch.enable_grad():
        for it in range(config.steps):
            bar.update(1)
            poll_interrupts()  # a safe point: Ctrl-C stops the edit here (nothing is changed yet)
            on = active.nonzero()[:, 0]  # (a,)
            fact_steps[on] += 1
            loss, nll, grad, top1 = evaluate(trial, on)
            if it == 0:
                first_nll = nll.clone()
            # Armijo on facts that already have an accepted point; a first evaluation is accepted.
            ok = ~accepted[on] | (loss <= f_x[on] + _ARMIJO_C1 * ((trial[on] - x[on]) * g_x[on]).sum(dim=1))
            take = on[ok]
            # Curvature pairs of accepted steps (skipped where s . y is not positive).
            s = trial[take] - x[take]
            y = grad[ok] - g_x[take]
            sy = (s * y).sum(dim=1)
            good = accepted[take] & (sy > 1e-10 * s.norm(dim=1) * y.norm(dim=1))
            if bool(good.any()):
                f_idx = take[good]
                slot = n_pairs[f_idx] % m
                S[slot, f_idx], Y[slot, f_idx], rho[slot, f_idx] = s[good], y[good], 1.0 / sy[good]
                n_pairs[f_idx] += 1
            x[take], f_x[take], nll_x[take], g_x[take] = trial[take], loss[ok], nll[ok], grad[ok]
            accepted[take] = True
            if top1_x is not None and top1 is not None:
                top1_x[take] = top1[ok]
                result.top1 = top1_x.clone()
            result.loss_history.append(float(f_x.mean()))
            result.nll_history.append(float(nll_x.mean()))
            bar.set_postfix(loss=f"{result.loss_history[-1]:.3g}", facts=len(on), refresh=False)
            # Per-fact stop at the accepted point; a fact whose step shrank to nothing stops too.
            done = (nll_x[take] < config.stop_nll) | (f_x[take] < config.early_stop_loss)
            if top1_x is not None:
                done = done | top1_x[take]
            active[take[done]] = False
            rejected = on[~ok]
            scale[rejected] *= _LBFGS_BACKTRACK
            active[rejected[scale[rejected] < _LBFGS_MIN_SCALE]] = False
            if not bool(active.any()) or it == config.steps - 1:
                break
            result.steps_run += 1
            retry = rejected[active[rejected]]
            trial[retry] = project(x[retry] + scale[retry, None] * direction[retry], radius[retry])
            new = take[~done]
            if len(new):
                direction[new] = _lbfgs_direction(g_x[new], S[:, new], Y[:, new], rho[:, new], n_pairs[new],
                                                  h0_norm[new], config)
                scale[new] = 1.0
                trial[new] = project(x[new] + direction[new], radius[new])
    result.target = (h0 + x).float()
    result.initial = h0.clone()
    result.final_loss, result.final_nll = f_x.clone(), nll_x.clone()
    result.fact_steps = fact_steps
    converged = (nll_x < config.stop_nll) | (f_x < config.early_stop_loss)
    _check_progress(result, first_nll, config, unfinished=~converged)
    return result


def _lbfgs_direction(g: torch.Tensor, S: torch.Tensor, Y: torch.Tensor, rho: torch.Tensor, n_pairs: torch.Tensor,
                     h0_norm: torch.Tensor, config: ValueConfig) -> torch.Tensor:
    """Quasi-Newton directions ``-H_i g_i`` (two-loop recursion, per fact) for ``g`` (b, d) from
    the pairs ``S, Y`` (m, b, d), ``rho`` (m, b) (0: empty slot) of ring buffers whose newest pair
    sits at ``(n_pairs - 1) % m``; steepest descent of length ``lbfgs_first_step * ||h0||``
    where a fact has no pair, and every step capped at ``lbfgs_max_step * ||h0||``."""
    m, b = rho.shape
    cols = torch.arange(b, device=g.device)
    q = g.clone()
    alphas = []
    for k in range(m):  # newest to oldest
        slot = (n_pairs - 1 - k) % m
        s, y, r = S[slot, cols], Y[slot, cols], rho[slot, cols] * (k < n_pairs).float()
        a = r * (s * q).sum(dim=1)
        q = q - a[:, None] * y
        alphas.append((a, r, s, y))
    newest = (n_pairs - 1) % m
    s, y = S[newest, cols], Y[newest, cols]
    yy = (y * y).sum(dim=1)
    gamma = torch.where((n_pairs > 0) & (yy > 0), (s * y).sum(dim=1) / yy.clamp_min(1e-30), torch.zeros_like(yy))
    g_norm = g.norm(dim=1).clamp_min(1e-30)
    first = config.lbfgs_first_step * h0_norm / g_norm  # steepest-descent scaling without curvature
    gamma = torch.where(gamma > 0, gamma, first)
    q = q * gamma[:, None]
    for a, r, s, y in reversed(alphas):  # oldest to newest
        beta = r * (y * q).sum(dim=1)
        q = q + (a - beta)[:, None] * s
    p = -q
    uphill = (p * g).sum(dim=1) >= 0  # not a descent direction: steepest descent instead
    p = torch.where(uphill[:, None], -g * first[:, None], p)
    cap = config.lbfgs_max_step * h0_norm
    n = p.norm(dim=1)
    return p * torch.where(n > cap, cap / n.clamp_min(1e-30), torch.ones_like(n))[:, None]


def _check_progress(result: ValueResult, first_nll: torch.Tensor, config: ValueConfig, *,
                    unfinished: torch.Tensor | None = None) -> None:
    """Refuse values that diverged, and warn about facts the optimisation did not move: an edit
    with them "succeeds" and changes nothing (``steps=1`` takes no update; a huge ``lr`` makes
    Adam overshoot and the clamp undo it)."""
    if not torch.isfinite(result.target).all():
        raise NonFiniteError(
            f"the value optimisation diverged (NaN/inf in the target hidden states) with lr={config.lr:g}; "
            f"lower ValueConfig.lr (published: 0.1-0.5)")
    assert result.final_loss is not None and result.final_nll is not None  # set by the last evaluation
    if unfinished is None:
        unfinished = result.final_loss >= config.early_stop_loss  # (u,)
    stuck = unfinished & ~(result.final_nll < first_nll)
    if bool(stuck.any()):
        why = ("steps=1 evaluates the loss and takes no update" if result.steps_run == 0 else
               f"after {result.steps_run} update(s) with lr={config.lr:g}; try a smaller lr or more steps")
        log.warning("value optimisation did not lower the target's NLL for %d of %d fact(s) (%s): "
                    "their edits will not make these targets more likely", int(stuck.sum()), stuck.numel(), why)


def anchor_norms(target: torch.Tensor, reference: torch.Tensor, *, branch: torch.Tensor | None = None,
                 reference_norm: float | None = None, drop_factor: float = 2.0) -> torch.Tensor:
    """Value-norm anchoring of the solved values ``target = z*`` (u, d), given the unedited hidden
    states ``reference = h0`` (u, d) at the same positions; returns the anchored ``z*`` (u, d).

    **NAS** (Norm-Anchor Scaling, arXiv 2602.02543, as its released code does), with ``branch``:
    ``v0`` (u, d), what the MLP branch of the layer adds to the residual stream there before the
    edit, and ``reference_norm``: ``rho``, the layer's reference value norm. The rescaled vector
    is the MLP's value ``v* = z* - h0 + v0`` (the branch output that realises ``z*``), not ``z*``::

        ||v*|| > drop_factor * rho   ->  z = h0                        (the fact's change is dropped)
        otherwise                    ->  z = h0 - v0 + rho v* / ||v*||  (v* rescaled to norm rho)

    (``rho <= 0`` or ``v* = 0`` leave ``z*`` as it is.) ``drop_factor = 2`` is the released one.

    **h0 rule** (rlsedit's earlier anchoring; neither ``branch`` nor ``reference_norm`` given):
    each row of ``z*`` rescaled to the norm of the same row of ``h0``, its direction kept.
    """
    if (branch is None) != (reference_norm is None):
        raise HyperparameterError("anchor_norms takes branch and reference_norm together (NAS) or neither "
                                  "(the h0 rule)")
    tiny = torch.finfo(target.dtype).tiny
    if branch is None:
        scale = reference.norm(dim=1) / target.norm(dim=1).clamp_min(tiny)  # (u,)
        return target * scale[:, None].to(target.dtype)
    if target.shape != reference.shape or branch.shape != target.shape:
        raise HyperparameterError(f"anchor_norms: target, reference and branch must all be (u, d); got "
                                  f"{tuple(target.shape)}, {tuple(reference.shape)} and {tuple(branch.shape)}")
    rho = float(reference_norm)  # type: ignore[arg-type]
    if not (math.isfinite(rho) and drop_factor > 0):
        raise HyperparameterError(f"anchor_norms: reference_norm must be finite and drop_factor > 0; got "
                                  f"{reference_norm!r} and {drop_factor!r}")
    if rho <= 0:
        return target
    h0, v0 = reference.to(target), branch.to(target)
    value = target - h0 + v0  # v* (u, d)
    norm = value.norm(dim=1, keepdim=True)  # (u, 1)
    scaled = torch.where(norm > 0, value * (rho / norm.clamp_min(tiny)), value)
    anchored = h0 - v0 + scaled
    return torch.where(norm > drop_factor * rho, h0, anchored)
