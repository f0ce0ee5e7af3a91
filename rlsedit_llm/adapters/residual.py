"""What the residual stream receives from the edited module, and how the last hidden state becomes
logits: the per-family facts behind the editor's absolute targets (:func:`module_target`: a norm
after the MLP, a scaled residual branch) and the logit transforms (:func:`final_logits`)."""

from __future__ import annotations

import torch
from torch import nn

from rlsedit_llm.adapters.spec import ModelSpec, _rms_norm_parts, get_module
from rlsedit_llm.errors import NonFiniteError, ShapeError

__all__ = ["module_target", "residual_contribution", "final_logits", "transform_logits"]


# --------------------------------------------------------------------------------------------
# What the residual stream receives from the edited module
# --------------------------------------------------------------------------------------------
def residual_contribution(model: nn.Module, spec: ModelSpec, layer: int, module_output: torch.Tensor) -> torch.Tensor:
    """What the residual stream receives when the edited module of ``layer`` outputs ``module_output``.

    ``residual_multiplier * postnorm(module_output)`` (the norm only where the family has one).
    """
    out = module_output
    if spec.post_mlp_norm_path is not None:
        norm = get_module(model, spec.post_mlp_norm_path.format(layer))
        out = norm(out)
    return out * spec.residual_multiplier if spec.residual_multiplier != 1.0 else out


def module_target(model: nn.Module, spec: ModelSpec, layer: int, current_output: torch.Tensor,
                  residual_delta: torch.Tensor) -> torch.Tensor:
    """The edited module's output ``m'`` that changes the residual stream by ``residual_delta``
    (as nearly as any output can).

    current_output : ``m`` (u, d_model), the module's output at the edited positions (``K W``)
    residual_delta : ``r`` (u, d_model), the wanted change of the residual stream

    * no post-MLP norm: ``m + r / residual_multiplier`` (exact; ``m + r`` for all but Granite).
    * RMSNorm after the MLP (Gemma 2/3, OLMo 2), ``N(x) = g x / rho(x)``, ``rho(x) = sqrt(mean(x^2) + eps)``:
      every output of ``N`` at the level of ``m`` lies on the ellipsoid
      ``E = {c : sum_j (c_j / g_j)^2 = sum_j (m_j / rho(m))^2}`` (sums over coordinates with
      ``g_j != 0``). The wanted contribution ``y = N(m) + r / residual_multiplier`` is replaced by
      its nearest point ``c`` on ``E`` (Euclidean: ``c_j = y_j g_j^2 / (g_j^2 + lam)``, ``lam`` the
      root of a monotone scalar equation) and ``m' = rho(m) c / g``, so that ``N(m') = c`` exactly:
      ``r`` itself when ``y`` is reachable (always for ``r = 0``, where ``m' = m``), else the reachable
      change closest to it; the rest is left to the layers above (the editor recomputes the
      residual after every layer). Coordinates with ``g_j = 0`` never reach the residual: ``m'``
      keeps ``m`` there and ``r`` is dropped. See docs/llm/pipeline.md, "Families with a norm after
      the MLP".

    Computed in float64, returned in ``current_output``'s dtype. Raises :class:`ShapeError` or
    :class:`NonFiniteError` for bad input.
    """
    if not (isinstance(current_output, torch.Tensor) and isinstance(residual_delta, torch.Tensor)):
        raise ShapeError("current_output and residual_delta must be tensors")
    if current_output.shape != residual_delta.shape or current_output.shape[-1] != spec.d_model:
        raise ShapeError(f"current_output and residual_delta must both be (u, {spec.d_model}); got "
                         f"{tuple(current_output.shape)} and {tuple(residual_delta.shape)}")
    if not (torch.isfinite(current_output).all() and torch.isfinite(residual_delta).all()):
        raise NonFiniteError("module_target: NaN/inf in current_output or residual_delta")
    m = current_output.double()
    r = residual_delta.to(device=m.device, dtype=torch.float64) / spec.residual_multiplier
    if spec.post_mlp_norm_path is None:
        return (m + r).to(current_output.dtype)
    norm = get_module(model, spec.post_mlp_norm_path.format(layer))
    g, eps = _rms_norm_parts(norm, spec.post_mlp_norm_path.format(layer), spec.d_model)
    g = g.to(m.device)
    rho = torch.sqrt(m.pow(2).mean(-1, keepdim=True) + eps)  # (u, 1)
    u = m / rho  # N(m) = g * u
    live = g.abs() > 1e-12 * float(g.abs().max().clamp_min(1e-300))
    # Coordinates with a zero gain (Gemma 3 270M has some: 1 + weight = 0) never reach the residual:
    # they keep their normalised value; the part of r on them is unreachable and dropped.
    gl = g[live]  # (n,)
    y = gl * u[:, live] + r[:, live]  # (u, n) wanted contribution on the live coordinates
    budget = u[:, live].pow(2).sum(-1, keepdim=True)  # (u, 1): sum (c/g)^2 of every output at this level
    c = _nearest_on_ellipsoid(y, gl, budget)
    out = u.clone()
    out[:, live] = c / gl
    return (rho * out).to(current_output.dtype)


def _nearest_on_ellipsoid(y: torch.Tensor, g: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    """Row-wise nearest point ``c`` to ``y`` (u, n) on ``{c : sum_j (c_j / g_j)^2 = budget}``.

    Lagrange: ``c_j = y_j g_j^2 / (g_j^2 + lam)`` with ``lam > -min_j g_j^2`` the root of
    ``f(lam) = sum_j y_j^2 g_j^2 / (g_j^2 + lam)^2 = budget`` (``f`` decreases from +inf to 0 there),
    found by bisection on ``log(lam + min g^2)``; ``c`` is then rescaled onto the ellipsoid
    exactly (this also covers the degenerate case ``f(-min g^2) < budget``). A ``y`` on the
    ellipsoid is returned as is (``lam = 0``) up to rounding. Float64.
    """
    g2 = g.pow(2)  # (n,)
    g2min = g2.min()
    yy = y.pow(2) * g2  # (u, n)

    def f(lam):  # lam (u, 1)
        return (yy / (g2 + lam).pow(2)).sum(-1, keepdim=True)

    # t = lam + g2min in (0, inf); f(t = hi) <= budget for hi >= g2min + sqrt(sum y^2 g^2 / budget) + max g^2
    scale = torch.sqrt(yy.sum(-1, keepdim=True) / budget.clamp_min(1e-300))
    lo = torch.full_like(budget, float(g2min) * 1e-16 + 1e-300).log()
    hi = (scale + g2.max() + g2min + 1.0).log()
    for _ in range(200):  # plenty for float64 over the few hundred orders of magnitude of [lo, hi]
        mid = 0.5 * (lo + hi)
        above = f(mid.exp() - g2min) > budget  # root lies at larger lam
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    lam = (0.5 * (lo + hi)).exp() - g2min
    c = y * g2 / (g2 + lam)
    level = (c.pow(2) / g2).sum(-1, keepdim=True)
    return c * torch.sqrt(budget / level.clamp_min(1e-300))


# --------------------------------------------------------------------------------------------
# From the last hidden state to logits
# --------------------------------------------------------------------------------------------
def final_logits(model: nn.Module, spec: ModelSpec, hidden: torch.Tensor) -> torch.Tensor:
    """Logits the model computes from the last decoder layer's output ``hidden`` (..., d_model):
    final norm, LM head, then the family's logit transform (Granite divides by
    ``config.logits_scaling``; Gemma 2 soft-caps with ``config.final_logit_softcapping``)."""
    logits = get_module(model, spec.lm_head_path)(get_module(model, spec.final_norm_path)(hidden))
    return transform_logits(model, logits)


def transform_logits(model: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """The family's transform of the LM head's output, read from ``model.config``: Granite divides
    by ``logits_scaling``, Gemma 2 soft-caps with ``final_logit_softcapping``; identity elsewhere.
    For callers that apply the LM head themselves (``head(base_model(...)[0])``)."""
    config = getattr(model, "config", None)
    scale = getattr(config, "logits_scaling", None) if getattr(config, "model_type", None) == "granite" else None
    if scale is not None and scale != 1:
        logits = logits / scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits
