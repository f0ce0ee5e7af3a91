"""UltraEdit (Gu et al., TMLR 2026): a closed-form write from hidden states and gradients, whitened
by running ("lifelong") feature statistics. Method ``"ultraedit"``.

No second-moment statistics and no per-fact value optimisation. Per batch ("turn") of facts, in
one forward and backward pass of the unedited-so-far model:

1. rows: each fact's rewrite prompt followed by its target minus the last token (the tokens of
   :func:`~rlsedit_llm.pipeline.facts.encode_target`, as the scorer and the fine-tuning baseline
   read them); one row per answer position, i.e. the positions whose next-token prediction is a
   target token;
2. per edited layer and answer position: the key ``k`` (input of the edited module, ``d_k``) and
   ``g``, the gradient at the module's output (``d_v``) of the sum over answer positions of the
   target token's negative log-probability;
3. the layer's running statistics of ``z = [k, g]`` (float64 count, mean and sum of squared
   deviations over every position of every turn so far, this turn included) are updated, and
   ``z`` is whitened with them: ``z_hat = (z - mean) / (std + eps)`` (unbiased std, ``eps`` the
   float32 machine epsilon), split into ``k_hat, g_hat``;
4. pseudo-values ``v = -lr ||k_hat||^2 g_hat`` (the output change that a gradient step of size
   ``lr`` on the whitened features would cause at that key) and the ridge solve on the raw keys

       Delta = argmin ||K Delta - V||^2 + ridge ||Delta||^2 = (K^T K + ridge I)^{-1} K^T V,

   computed as ``K^T (K K^T + ridge I)^{-1} V`` when there are fewer rows than ``d_k``; every
   edited layer gets its own ``Delta`` from the same pass and they are added together.

``Fact.weight`` is honoured in the solve: each of a fact's rows (answer positions) counts
``weight`` times in ``||K Delta - V||^2`` (its rows of ``K`` and ``V`` scaled by ``sqrt(weight)``:
weighted ridge regression). The running statistics, which only whiten the features, are not
weighted.

``lr = None`` scales the released ``1e-6`` (Llama-3-8B, ``d_k = 14336``) to the layer's width,
``1e-6 * 14336 / d_k``, so that ``lr ||k_hat||^2 ~ lr d_k`` is the same on any model (as
:class:`~rlsedit_llm.EditConfig` scales ``N``). See docs/theory/relation.md#ultraedit for the
choices and how this differs from the authors' code.

An editor-level method: it speaks the editor protocol through
:class:`~rlsedit_llm.editing.editor_level.EditorLevelMethod` and is registered by name.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlsedit_llm.adapters.hooks import requires_grad_set
from rlsedit_llm.adapters.spec import read_weight, write_weight
from rlsedit_llm.editing.editor_level import ConfigSetting, EditorLevelMethod
from rlsedit_llm.editing.reports import EditReport, fact_report, warn_failures
from rlsedit_llm.errors import NonFiniteError, StateMismatchError
from rlsedit_llm.files import atomic_path
from rlsedit_llm.kernel.method_config import MethodConfig
from rlsedit_llm.kernel.protocol import Capabilities
from rlsedit_llm.pipeline.facts import checked_facts, encode_target
from rlsedit_llm.pipeline.scoring import report_scores
from rlsedit_llm.pipeline.tokens import encode_prompt, input_device, needs_bos, pad_id, right_pad
from rlsedit_llm.presets import method_preset

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rlsedit_llm.pipeline.facts import Fact

__all__ = ["UltraEditor", "UltraEditConfig", "RunningMoments", "ultraedit_shift", "PUBLISHED_LR"]

log = logging.getLogger(__name__)

PUBLISHED_LR = float(method_preset("ultraedit", "lr"))  # the released ``lr`` (used on d_k = 14336)
_PUBLISHED_D_K = int(method_preset("ultraedit", "d_k"))
_EPS = torch.finfo(torch.float32).eps  # the normaliser's epsilon (float32 features, as released)
_FORMAT = "rlsedit-ultraedit-v1"


class RunningMoments:
    """Running mean and variance of feature vectors, in float64, merged batch by batch (Chan et al.).

    Attributes ``count_`` (rows seen), ``mean_`` (d,), ``m2_`` (d,) the sum of squared deviations
    from the mean. :meth:`update` replaces the tensors (never writes into them), so a reference
    snapshot (:meth:`state`) is a valid rollback point.
    """

    def __init__(self, dim: int, *, device: torch.device | str | None = None) -> None:
        self.count_ = 0
        self.mean_ = torch.zeros(dim, dtype=torch.float64, device=device)
        self.m2_ = torch.zeros(dim, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (n, d)."""
        x = x.detach().to(device=self.mean_.device, dtype=torch.float64)
        n = x.shape[0]
        if n == 0:
            return
        total = self.count_ + n
        mean_x = x.mean(dim=0)
        m2_x = ((x - mean_x) ** 2).sum(dim=0)
        delta = mean_x - self.mean_
        self.mean_ = self.mean_ + delta * (n / total)
        self.m2_ = self.m2_ + m2_x + delta.square() * (self.count_ * n / total)
        self.count_ = total

    @property
    def mean(self) -> torch.Tensor:
        return self.mean_

    @property
    def var(self) -> torch.Tensor:
        """Unbiased variance (zeros before two rows have been seen)."""
        if self.count_ < 2:
            return torch.zeros_like(self.m2_)
        return self.m2_ / (self.count_ - 1)

    @property
    def std(self) -> torch.Tensor:
        return self.var.sqrt()

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / (std + eps)`` in float64."""
        x = x.to(device=self.mean_.device, dtype=torch.float64)
        return (x - self.mean_) / (self.std + _EPS)

    def state(self) -> dict:
        return {"count": self.count_, "mean": self.mean_, "m2": self.m2_}

    def load(self, state: dict) -> None:
        self.count_ = int(state["count"])
        self.mean_ = state["mean"].to(device=self.mean_.device, dtype=torch.float64)
        self.m2_ = state["m2"].to(device=self.mean_.device, dtype=torch.float64)


def ultraedit_shift(K: torch.Tensor, G: torch.Tensor, moments: RunningMoments, *, lr: float,
                    ridge: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """UltraEdit's closed-form weight change ``Delta (d_k, d_v)`` for keys ``K (n, d_k)`` and output
    gradients ``G (n, d_v)``, whitened with ``moments`` (already updated with this turn).

    ``Delta = argmin sum_r w_r ||k_r Delta - v_r||^2 + ridge ||Delta||^2`` with the pseudo-values
    ``V = -lr ||k_hat||^2 g_hat`` of the whitened features and the row weights ``weights (n,)``
    (None: all 1); float64.
    """
    K = K.detach().to(device=moments.mean_.device, dtype=torch.float64)
    z_hat = moments.normalise(torch.cat([K, G.detach().to(K)], dim=1))  # (n, d_k + d_v)
    d_k = K.shape[1]
    k_hat, g_hat = z_hat[:, :d_k], z_hat[:, d_k:]
    V = -lr * k_hat.square().sum(dim=1, keepdim=True) * g_hat  # (n, d_v)
    if weights is not None:  # weighted least squares: rows scaled by sqrt(w)
        scale = weights.detach().to(K).sqrt()[:, None]
        K, V = K * scale, V * scale
    n = K.shape[0]
    if n < d_k:  # the push-through identity: an (n, n) system instead of (d_k, d_k)
        S = K @ K.mT + ridge * torch.eye(n, dtype=K.dtype, device=K.device)
        return K.mT @ torch.linalg.solve(S, V)
    S = K.mT @ K + ridge * torch.eye(d_k, dtype=K.dtype, device=K.device)
    return torch.linalg.solve(S, K.mT @ V)


@dataclass(frozen=True)
class UltraEditConfig(MethodConfig):
    """UltraEdit's settings.

    lr : scale of the pseudo-values (> 0), or None: the released ``1e-6`` scaled to the layer's
        width, ``1e-6 * 14336 / d_k``
    ridge : weight of ``||Delta||^2`` in the closed form (> 0; released: 1)
    batch_size : facts per forward/backward pass (int >= 1; memory only: the result does not
        depend on it)
    """

    method = "ultraedit"
    lr: float | None = None
    ridge: float = float(method_preset("ultraedit", "ridge"))
    batch_size: int = 16
    checks = {"lr": "positive or None", "ridge": "positive", "batch_size": "count"}


class UltraEditor(EditorLevelMethod):
    """UltraEdit on the edited layers' MLP output projections (see the module docstring).

    Takes ``model``, ``tokenizer`` and ``layers`` as
    :class:`~rlsedit_llm.editing.editor_level.EditorLevelMethod` describes, then ``lr``, ``ridge``
    and ``batch_size``, the fields of :class:`UltraEditConfig`. Attributes: the base class's, and
    ``lr_`` (the resolved lr), ``moments_`` (layer -> :class:`RunningMoments` of ``[k, g]``) and
    ``n_rows_``.
    """

    name = "ultraedit"
    capabilities = Capabilities()
    config_cls = UltraEditConfig
    state_file = "ultraedit.json"
    method_config: UltraEditConfig
    lr = ConfigSetting[float | None](float)
    ridge = ConfigSetting(float)
    batch_size = ConfigSetting(int)

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *,
                 layers: Sequence[int] | None = None, lr: float | None = UltraEditConfig.lr,
                 ridge: float = UltraEditConfig.ridge, batch_size: int = UltraEditConfig.batch_size) -> None:
        super().__init__(model, tokenizer, layers, UltraEditConfig.build(lr=lr, ridge=ridge, batch_size=batch_size))
        self.lr_ = float(lr) if lr is not None else PUBLISHED_LR * _PUBLISHED_D_K / self.spec_.d_k
        self.moments_ = {}
        for l in self.layers_:
            d_k, d_v = self.W0_[l].shape
            self.moments_[l] = RunningMoments(d_k + d_v, device=self._module(l).weight.device)  # type: ignore[arg-type]
        self.n_rows_ = 0

    # -- features ----------------------------------------------------------------------------
    def features(self, facts: Iterable[Fact | Mapping[str, Any]]
                 ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Keys ``K[l] (n, d_k)`` and output gradients ``G[l] (n, d_v)`` (float32) at every answer
        position of ``facts`` (fact-major, positions in order), on the current model; changes nothing."""
        facts = checked_facts(facts, self.tokenizer, purpose="edit")
        rows = []
        for f in facts:
            p = encode_prompt(self.tokenizer, f.text(), bos=needs_bos(self.model))
            t = encode_target(self.tokenizer, f.target)
            rows.append((p, t))
        modules = {l: self._module(l) for l in self.layers_}
        device, pad = input_device(self.model), pad_id(self.tokenizer)
        keys: dict[int, list[torch.Tensor]] = {l: [] for l in self.layers_}
        grads: dict[int, list[torch.Tensor]] = {l: [] for l in self.layers_}
        was_training = self.model.training
        with requires_grad_set(self.model, False):  # every flag put back, whatever interrupts the block
            try:
                self._collect(rows, modules, device, pad, keys, grads)
            finally:
                for m in modules.values():
                    m.weight.grad = None
                self.model.train(was_training)
        return ({l: torch.cat(v) for l, v in keys.items()}, {l: torch.cat(v) for l, v in grads.items()})

    def _collect(self, rows, modules, device, pad, keys, grads) -> None:
        """Append each batch's keys and output gradients at the edited modules to ``keys`` / ``grads``."""
        for m in modules.values():  # so that the modules' outputs are part of the autograd graph
            m.weight.requires_grad_(True)
        self.model.eval()
        for lo in range(0, len(rows), self.batch_size):
            chunk = rows[lo: lo + self.batch_size]
            ids, mask = right_pad([p + t[:-1] for p, t in chunk], pad, device)
            row_of = torch.cat([torch.full((len(t),), i) for i, (p, t) in enumerate(chunk)])
            pos = torch.cat([torch.arange(len(p) - 1, len(p) + len(t) - 1) for p, t in chunk])
            labels = torch.tensor([x for _, t in chunk for x in t])
            seen_in: dict[int, torch.Tensor] = {}  # layer -> the edited module's input (its keys)
            seen_out: dict[int, torch.Tensor] = {}  # layer -> its output

            def hook(layer, seen_in=seen_in, seen_out=seen_out):  # this batch's dicts, bound now
                def fn(module, args, output):
                    seen_in[layer], seen_out[layer] = args[0], output
                return fn

            handles = []
            try:
                for l, m in modules.items():  # each handle kept as it is made: all removed below
                    handles.append(m.register_forward_hook(hook(l)))
                with torch.enable_grad():
                    logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                    picked = logits[row_of.to(logits.device), pos.to(logits.device)].float()  # (n, vocab)
                    nll = -torch.log_softmax(picked, dim=-1).gather(1, labels[:, None].to(picked.device)).sum()
                    outs = [seen_out[l] for l in self.layers_]
                    g_all = torch.autograd.grad(nll, outs)
            finally:
                for h in handles:
                    h.remove()
            for l, g in zip(self.layers_, g_all, strict=True):  # one gradient per layer's output
                x = seen_in[l]
                keys[l].append(x[row_of.to(x.device), pos.to(x.device)].detach().float())
                grads[l].append(g[row_of.to(g.device), pos.to(g.device)].detach().float())

    # -- editing -------------------------------------------------------------------------------
    def edit(self, facts: Iterable[Fact | Mapping[str, Any]]) -> EditReport:
        """Write one turn of facts; return an :class:`~rlsedit_llm.EditReport` (its ``extras`` hold
        ``rows``, the answer positions written, and ``delta_norm``, the mean ``||Delta||_F`` over
        layers; there are no value residuals). Bad facts raise :class:`FactError`; a failure
        half-way restores the weights and the statistics. ``Fact.weight`` weighs each fact's rows
        in the solve (see the module docstring); the facts that did not take
        (:attr:`EditReport.failed`) are named in a ``logging`` warning."""
        facts = checked_facts(facts, self.tokenizer, purpose="edit")
        tic = time.perf_counter()
        before = report_scores(self.model, self.tokenizer, facts, after=False,
                               accuracies=self.report_accuracies)
        seconds = {"score": time.perf_counter() - tic}
        tic = time.perf_counter()
        K, G = self.features(facts)
        seconds["features"] = time.perf_counter() - tic
        tic = time.perf_counter()
        saved_weights = {l: read_weight(self._module(l)) for l in self.layers_}
        saved_moments = {l: m.state() for l, m in self.moments_.items()}
        row_weights = None  # fact-major rows, one per answer position, as features() returns them
        if any(f.weight != 1 for f in facts):
            row_weights = torch.cat([torch.full((len(encode_target(self.tokenizer, f.target)),), float(f.weight),
                                                dtype=torch.float64) for f in facts])
        norms = []
        try:
            new = {}
            for l in self.layers_:
                self.moments_[l].update(torch.cat([K[l], G[l]], dim=1))
                delta = ultraedit_shift(K[l], G[l], self.moments_[l], lr=self.lr_, ridge=self.ridge,
                                        weights=row_weights)
                if not torch.isfinite(delta).all():
                    raise NonFiniteError(f"layer {l}: the UltraEdit update produced NaN/inf")
                W = saved_weights[l]
                new[l] = (W.to(torch.float64) + delta.to(W.device)).to(W.dtype)
                norms.append(float(torch.linalg.norm(delta)))
            for l, W in new.items():
                write_weight(self._module(l), W)
        except BaseException:
            for l, W in saved_weights.items():
                write_weight(self._module(l), W)
            for l, state in saved_moments.items():
                self.moments_[l].load(state)
            raise
        seconds["update"] = time.perf_counter() - tic
        after = report_scores(self.model, self.tokenizer, facts, after=True,
                              accuracies=self.report_accuracies)
        n_rows = int(next(iter(K.values())).shape[0])
        edit_id = self.n_batches_
        self.n_edits_ += len(facts)
        self.n_batches_ += 1
        self.n_rows_ += n_rows
        # no value residual (NaN): UltraEdit optimises no target hidden state
        reports = [fact_report(f, b, a, weight=float(f.weight)) for f, b, a in zip(facts, before, after, strict=True)]
        log.info("UltraEdit turn %d: %d fact(s), %d rows", self.n_batches_, len(facts), n_rows)
        report = EditReport(edit_id, self.layers_, reports, seconds,
                            extras={"rows": float(n_rows), "delta_norm": sum(norms) / len(norms)})
        warn_failures(log, report, f"UltraEdit turn {edit_id}",
                      "a larger lr (UltraEditConfig), or a higher weight for those facts")
        return report

    # -- persistence: ultraedit.safetensors, then ultraedit.json (which carries its SHA-256) -----
    def _save_tensors(self, directory: Path) -> dict:
        from safetensors.torch import save_file

        tensors = {}
        for l in self.layers_:
            tensors[f"weight.{l}"] = read_weight(self._module(l)).cpu().contiguous()
            tensors[f"mean.{l}"] = self.moments_[l].mean_.cpu().contiguous()
            tensors[f"m2.{l}"] = self.moments_[l].m2_.cpu().contiguous()
        path = directory / "ultraedit.safetensors"
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return {"format": _FORMAT, "n_rows": self.n_rows_,
                "counts": {str(l): self.moments_[l].count_ for l in self.layers_}, "sha256": digest}

    @classmethod
    def _check_meta(cls, directory: Path, meta: dict) -> None:
        if meta.get("format") != _FORMAT:
            raise StateMismatchError(f"{directory} holds no UltraEdit state of format {_FORMAT!r}")

    def _load_tensors(self, directory: Path, meta: dict) -> None:
        from safetensors.torch import load_file

        path = directory / "ultraedit.safetensors"
        if hashlib.sha256(path.read_bytes()).hexdigest() != meta["sha256"]:
            raise StateMismatchError(f"{path} does not match its ultraedit.json (an interrupted save?)")
        tensors = load_file(str(path))
        for l in self.layers_:
            W = tensors.get(f"weight.{l}")
            if W is None or W.shape != self.W0_[l].shape or tensors[f"mean.{l}"].shape != self.moments_[l].mean_.shape:
                raise StateMismatchError(f"the saved UltraEdit state does not match layer {l} of this model")
        for l in self.layers_:
            write_weight(self._module(l), tensors[f"weight.{l}"].to(self.W0_[l].dtype))
            self.moments_[l].load({"count": meta["counts"][str(l)], "mean": tensors[f"mean.{l}"],
                                   "m2": tensors[f"m2.{l}"]})
        self.n_rows_ = int(meta["n_rows"])
