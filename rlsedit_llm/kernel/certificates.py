"""Certificates: proof, per edited layer, that the weights are the exact minimiser of ``J_t``, how
far the carried inverse has drifted, and the theorems' bounds next to the measured deviations.

Per layer, with the journal's stacked keys ``K (n, d_k)`` and absolute values ``V (n, d_v)``, the
anchor Gram ``gram0 = K0^T K0 = N E[k k^T]`` kept by the solver, ``A = alpha I + beta gram0``,
``Delta = W_t - W0`` and the initial demand ``R0 = V - K W0``:

- **optimality**: ``||grad J_t(W)|| / ||B_t||`` where ``grad J_t(W) / 2 = G_t W - B_t =
  A (W - W0) + K^T (K W - V)`` and ``B_t = A W0 + K^T V`` (the anchor's values are implicit,
  ``V0 = K0 W0``). Zero up to round-off for the exact minimiser (T1). Measured at the state's
  master copy and at the weights the model actually holds (rounded to the model's dtype);
- **drift**: ``max_j ||C_t (G_t x_j) - x_j|| / ||x_j||`` over a few random probes ``x_j`` — how
  far the recursion's ``C_t`` is from ``G_t^{-1}``, at the cost of a few matrix-vector products
  (no ``d_k^3`` factorisation);
- **T3(a)** ``||W_t - W0||_F <= ||R0||_F / (2 sqrt(alpha))`` (vacuous when ``alpha = 0``, the
  published setting), **T3(b)** ``||K0 (W_t - W0)||_F = sqrt(tr(Delta^T gram0 Delta)) <=
  ||R0||_F / (2 sqrt(beta))``, **T3** ``||Delta||_A^2 <= ||R0||_F^2 / 4`` and the exact energy
  identity ``||R0||^2 = ||K W_t - V||^2 + ||K Delta||^2 + 2 ||Delta||_A^2``;
- for the most recent journal entry, taken as the last step (exact whatever undo/replace did
  since, because ``W*_t`` does not depend on the order of the data, T1): **T4(a)**
  ``||W_t - W_{t-1}||_{G_{t-1}} <= ||r_t||_F / 2``, **T4(c)** ``||W_t - W_{t-1}||_F <=
  ||C_{t-1} K_t^T||_2 ||r_t||_F`` and **T2** ``||V_t - K_t W_t||_F <= ||r_t||_F / (1 +
  lambda_min(K_t C_{t-1} K_t^T))``. ``W_{t-1}, C_{t-1}`` come from a downdate that is computed
  and not committed.

Everything is computed in the state dtype on the layer's device with matrix products only, so
each number carries that dtype's round-off: :meth:`LayerCertificate.holds` compares them with a
tolerance of ``10 eps cond(G_t)`` (``eps`` of the state dtype, ``cond`` estimated by a few power
iterations), never below ``1e-8`` (the float64 tolerance this certificate always had) and
capped at ``1e-3`` (a state that cannot be certified to 0.1% is not certified). The
results use :class:`rlsedit_theory.bounds.Bound` / :class:`~rlsedit_theory.bounds.Identity`, the
types of the NumPy statements of the same theorems (tests check the numbers agree).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from rlsedit_theory.bounds import Bound, Identity

if TYPE_CHECKING:
    from rlsedit_llm.kernel.protocol import LayerSolver

__all__ = ["Certificate", "LayerCertificate", "layer_certificate", "Deviation", "weight_deviation",
           "layer_deviation", "tolerance_for"]

RTOL_FLOOR = 1e-8  # the float64 tolerance of holds() before it depended on the dtype
RTOL_CAP = 1e-3
ROUNDOFF_FACTOR = 10.0


@dataclass
class LayerCertificate:
    """The certificate of one edited layer (see the module docstring for every quantity)."""

    layer: int
    n_rows: int  # rows (facts) in the journal for this layer
    gradient: float  # ||grad J_t|| / ||B_t|| at the state's master weights
    gradient_model: float  # the same at the weights the model holds (its dtype)
    weights_match: bool  # the model holds exactly the master weights cast to its dtype
    drift: float  # max_j ||C_t G_t x_j - x_j|| / ||x_j||
    metric: Bound  # T3  ||Delta||_A^2 <= ||R0||^2 / 4
    energy: Identity  # T3 energy identity
    deviation: Bound | None  # T3(a); None when alpha = 0 (vacuous)
    anchor: Bound | None  # T3(b); None when beta = 0 or no anchor
    step_metric: Bound | None = None  # T4(a) for the last journal entry
    step: Bound | None = None  # T4(c)
    adherence: Bound | None = None  # T2
    last_edit_id: int | None = None
    condition: float = float("nan")  # estimate of cond(G_t) (power iterations)
    tolerance: float = RTOL_FLOOR  # what holds() allows by default: see tolerance_for

    def bounds(self) -> list[Bound]:
        return [b for b in (self.metric, self.deviation, self.anchor, self.step_metric, self.step,
                            self.adherence) if b is not None]

    def holds(self, rtol: float | None = None) -> bool:
        """Every bound holds up to ``rtol`` times its right-hand side, the energy identity to
        ``rtol``, and the state is what it claims to be: the minimiser (``gradient <= rtol``) with
        ``C_t = G_t^{-1}`` (``drift <= rtol``). ``rtol`` defaults to :attr:`tolerance`, set from
        the state dtype and the condition (see :func:`tolerance_for`)."""
        tol = self.tolerance if rtol is None else rtol
        return all(b.holds(tol * max(abs(b.rhs), abs(b.lhs))) for b in self.bounds()) and \
            self.energy.holds(max(tol, 1e-10)) and self.gradient <= tol and self.drift <= tol

    def lines(self) -> list[str]:
        def cmp(label: str, b: Bound | None, vacuous: str) -> str:
            if b is None:
                return f"  {label}: {vacuous}"
            pct = "" if not math.isfinite(b.ratio) or b.rhs == 0 else f"  ({100 * b.ratio:.1f}% of the bound)"
            return f"  {label}: {b.lhs:.4g} <= {b.rhs:.4g}{pct}"

        out = [
            f"layer {self.layer}: {self.n_rows} row(s)"
            + (f", last edit {self.last_edit_id}" if self.last_edit_id is not None else ""),
            f"  optimality ||grad J_t|| / ||B_t||: {self.gradient:.3g} (state), {self.gradient_model:.3g} "
            f"(model weights{'' if self.weights_match else ', DIFFER from the state'})",
            f"  drift ||C_t G_t x - x|| / ||x||: {self.drift:.3g}",
            f"  tolerance {self.tolerance:.2g} (state round-off at cond(G_t) ~ {self.condition:.2g})",
            f"  T3 energy identity: relative error {self.energy.relative_error:.3g}",
            cmp("T3  ||W_t - W0||_A^2 <= ||R0||^2/4", self.metric, ""),
            cmp("T3a ||W_t - W0||_F <= ||R0||/(2 sqrt alpha)", self.deviation, "vacuous (alpha = 0)"),
            cmp("T3b ||K0 (W_t - W0)||_F <= ||R0||/(2 sqrt beta)", self.anchor, "vacuous (beta = 0)"),
        ]
        if self.step is not None:
            out += [
                cmp("T4a last step ||W_t - W_t-1||_G <= ||r_t||/2", self.step_metric, ""),
                cmp("T4c last step ||W_t - W_t-1||_F <= ||C K^T|| ||r_t||", self.step, ""),
                cmp("T2  last residual ||V_t - K_t W_t|| <= shrink ||r_t||", self.adherence, ""),
            ]
        return out


@dataclass
class Certificate:
    """Per-layer certificates of an editor's state (``str()`` to read; built by
    :meth:`rlsedit_llm.Editor.certificate` from :func:`layer_certificate`)."""

    layers: list[LayerCertificate]
    n_edits: int
    alpha: float
    beta: float
    state_dtype: str
    n_probes: int = 8
    notes: list[str] = field(default_factory=list)

    @property
    def gradient(self) -> float:
        """Worst relative gradient over the layers (state weights)."""
        return max((c.gradient for c in self.layers), default=0.0)

    @property
    def drift(self) -> float:
        """Worst drift over the layers."""
        return max((c.drift for c in self.layers), default=0.0)

    def holds(self, rtol: float | None = None) -> bool:
        """Every layer's certificate holds (see :meth:`LayerCertificate.holds`; ``None``: each
        layer's own dtype- and condition-aware tolerance)."""
        return all(c.holds(rtol) for c in self.layers)

    def __str__(self) -> str:
        head = (f"RLSEdit certificate: {self.n_edits} edit(s) in the journal, alpha={self.alpha:g}, "
                f"beta={self.beta:g}, state {self.state_dtype}, drift from {self.n_probes} random probes")
        lines = [head]
        for c in self.layers:
            lines += c.lines()
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def tolerance_for(dtype: torch.dtype, condition: float) -> float:
    """The default tolerance of :meth:`LayerCertificate.holds` for a state in ``dtype`` whose
    ``G_t`` has condition ``condition``: ``10 eps cond`` (the round-off a quantity computed
    through ``C_t`` carries), at least :data:`RTOL_FLOOR` and at most :data:`RTOL_CAP`.

    A float64 state of condition 200 gets ``1e-8`` (as before); a float32 one ``2.4e-4``,
    where one ordinary edit leaves a drift of about ``3e-6`` and a relative error of the energy
    identity of about ``1e-7``, far above ``1e-8``."""
    scaled = ROUNDOFF_FACTOR * torch.finfo(dtype).eps * condition
    return min(max(RTOL_FLOOR, scaled), RTOL_CAP) if math.isfinite(scaled) else RTOL_CAP


def _largest_eigenvalue(apply, X: torch.Tensor, iters: int = 16) -> float:
    """A lower estimate of ``lambda_max`` of the symmetric PSD operator ``apply``: the best
    Rayleigh quotient after a few power iterations from the columns of ``X`` (``O(d^2)`` each)."""
    def unit(Y):  # scaled by the largest entry first, so tiny or huge iterates keep their norm
        Y = Y / Y.abs().amax(dim=0).clamp_min(torch.finfo(Y.dtype).tiny)
        return Y / Y.norm(dim=0).clamp_min(torch.finfo(Y.dtype).tiny)

    X = unit(X)
    for _ in range(iters):
        X = unit(apply(X))
    return float((apply(X) * X).sum(dim=0).max())


def _fro(X: torch.Tensor) -> float:
    return float(torch.linalg.norm(X)) if X.numel() else 0.0


@torch.no_grad()
def layer_certificate(solver: Any, K: torch.Tensor, V: torch.Tensor, held: torch.Tensor, *, layer: int,
                      last: tuple[torch.Tensor, torch.Tensor, int] | None = None, n_probes: int = 8,
                      seed: int = 0) -> LayerCertificate:
    """The certificate of one solver (a method that minimises ``J_t`` and keeps ``C_t``).

    ``K (n, d_k)`` and ``V (n, d_v)`` are every row the solver has absorbed (stacked in any order:
    ``W*_t`` does not depend on it, T1); ``held`` is what the model holds for this layer
    ``(d_k, d_v)`` in its dtype; ``last = (K_t, V_t, edit_id)`` the most recent batch, taken as
    the last step for T4 and T2. Changes nothing."""
    dtype, device = solver.dtype, solver.C_.device
    alpha, beta = solver.alpha, solver.beta
    gram0 = getattr(solver, "gram0_", None)
    W0, W, C = solver.W0_, solver.W_, solver.C_
    K, V = K.to(device=device, dtype=dtype), V.to(device=device, dtype=dtype)  # (n, d_k), (n, d_v)

    def apply_A(X):  # A X = alpha X + beta gram0 X
        out = alpha * X
        return out + beta * (gram0 @ X) if gram0 is not None and beta != 0 else out

    def metric_sq(X):  # ||X||_A^2
        return max(float((X * apply_A(X)).sum()), 0.0)

    def gradient_rel(Wx):  # ||A (W - W0) + K^T (K W - V)|| / ||A W0 + K^T V||
        grad = apply_A(Wx - W0) + K.mT @ (K @ Wx - V)
        return _fro(grad) / max(_fro(apply_A(W0) + K.mT @ V), torch.finfo(dtype).tiny)

    weights_match = bool(torch.equal(held, W.to(device=held.device, dtype=held.dtype)))
    gradient = gradient_rel(W)
    gradient_model = gradient_rel(held.to(device=device, dtype=dtype))

    gen = torch.Generator(device="cpu").manual_seed(seed)
    X = torch.randn(W.shape[0], n_probes, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    def apply_G(Y):  # G_t Y = A Y + K^T K Y
        return apply_A(Y) + K.mT @ (K @ Y)

    GX = apply_G(X)
    drift = float(((C @ GX - X).norm(dim=0) / X.norm(dim=0)).max())
    # cond(G_t) = lambda_max(G_t) lambda_max(C_t); a C_t off by a small relative amount (what the
    # drift measures) changes this estimate by as little, so a corrupted state cannot hide behind it.
    condition = _largest_eigenvalue(apply_G, X) * _largest_eigenvalue(lambda Y: C @ Y, X)

    Delta = W - W0
    R0 = V - K @ W0
    r0 = _fro(R0)
    metric = Bound(metric_sq(Delta), r0**2 / 4, "T3 ||W_t - W0||_A^2 <= ||R0||^2 / 4")
    energy = Identity(r0**2, _fro(K @ W - V) ** 2 + _fro(K @ Delta) ** 2 + 2 * metric_sq(Delta),
                      "T3 ||R0||^2 = ||K W_t - V||^2 + ||K Delta||^2 + 2||Delta||_A^2")
    deviation = (Bound(_fro(Delta), r0 / (2 * math.sqrt(alpha)), "T3a ||W_t - W0|| <= ||R0|| / (2 sqrt(alpha))")
                 if alpha > 0 else None)
    anchor = None
    if beta > 0 and gram0 is not None:
        anchor = Bound(math.sqrt(max(float((Delta * (gram0 @ Delta)).sum()), 0.0)), r0 / (2 * math.sqrt(beta)),
                       "T3b ||K0 (W_t - W0)|| <= ||R0|| / (2 sqrt(beta))")

    cert = LayerCertificate(layer, K.shape[0], gradient, gradient_model, weights_match, drift,
                            metric, energy, deviation, anchor, condition=condition,
                            tolerance=tolerance_for(dtype, condition))
    if last is not None:
        Kt, Vt, edit_id = last
        Kt, Vt = Kt.to(device=device, dtype=dtype), Vt.to(device=device, dtype=dtype)  # (u, d_k), (u, d_v)
        prev = solver.propose_removal(Kt, Vt)  # the state without the last entry, not committed
        W_prev = prev.W
        r = Vt - Kt @ W_prev  # innovation of the last step (u, d_v)
        D = W - W_prev
        # ||D||_{G_{t-1}}^2 = tr(D^T G_t D) - ||K_t D||^2, with G_t D = A D + K^T K D.
        g_sq = metric_sq(D) + _fro(K @ D) ** 2 - _fro(Kt @ D) ** 2
        cert.step_metric = Bound(math.sqrt(max(g_sq, 0.0)), _fro(r) / 2,
                                 "T4a ||W_t - W_{t-1}||_{G_{t-1}} <= ||r_t|| / 2")
        gain = _after(solver, prev, "C_", Kt.mT)  # C_{t-1} K_t^T  (d_k, u)
        cert.step = Bound(_fro(D), float(torch.linalg.matrix_norm(gain, ord=2)) * _fro(r),
                          "T4c ||W_t - W_{t-1}|| <= ||C_{t-1} K_t^T|| ||r_t||")
        M = Kt @ gain
        lam = max(float(torch.linalg.eigvalsh((M + M.mT) / 2)[0]), 0.0)
        cert.adherence = Bound(_fro(Vt - Kt @ W), _fro(r) / (1 + lam),
                               "T2 ||V_t - K_t W_t|| <= ||r_t|| / (1 + lambda_min(K_t C_{t-1} K_t^T))")
        cert.last_edit_id = edit_id
    return cert


def _after(solver, step, attr: str, X: torch.Tensor) -> torch.Tensor:
    """``M X`` for ``M`` the attribute ``attr`` as ``step`` would leave it, without forming ``M``:
    a new tensor in ``step.state``, or the current one plus the step's in-place terms."""
    if attr in step.state:
        return step.state[attr] @ X
    Y = getattr(solver, attr) @ X
    for name, F, alpha in step.inplace:
        if name == attr:
            Y = Y + alpha * (F @ (F.mT @ X))
    return Y


@dataclass(frozen=True)
class Deviation:
    """How far one layer's weights moved from ``W0``, next to the theory's bounds.

    ``fro = ||W_t - W0||_F``; ``anchor = ||K0 (W_t - W0)||_F`` with ``K0^T K0 = gram0`` (None
    without anchor statistics); for a method that minimises ``J_t`` the right-hand sides of
    T3(a) ``||R0||_F / (2 sqrt(lambda_min(A)))`` (``A = alpha I + beta gram0``, so at least as
    tight as ``1 / (2 sqrt(alpha))``) and T3(b) ``||R0||_F / (2 sqrt(beta))`` over the rows
    absorbed so far (None when vacuous or not applicable); ``condition`` = ``cond(G_t)`` for a
    solver that carries one.
    """

    fro: float
    anchor: float | None = None
    t3a: float | None = None
    t3b: float | None = None
    condition: float | None = None


@torch.no_grad()
def weight_deviation(W0: torch.Tensor, W: torch.Tensor, gram0: torch.Tensor | None = None) -> Deviation:
    """:class:`Deviation` of weights ``W (d_k, d_v)`` from ``W0`` (float64), without bounds: for
    methods that keep no solver (fine-tuning, UltraEdit)."""
    D = W.detach().to("cpu", torch.float64) - W0.detach().to("cpu", torch.float64)  # (d_k, d_v)
    anchor = None
    if gram0 is not None:
        G = gram0.detach().to("cpu", torch.float64)
        anchor = math.sqrt(max(float((D * (G @ D)).sum()), 0.0))
    return Deviation(_fro(D), anchor)


@torch.no_grad()
def layer_deviation(solver: LayerSolver, K: torch.Tensor, V: torch.Tensor) -> Deviation:
    """:class:`Deviation` of one layer solver whose absorbed rows are ``K (n, d_k)``, ``V (n, d_v)``.

    The bounds are given when the solver's class declares ``cumulative_objective`` (its weights
    minimise ``J_t`` with the solver's own identity and anchor weights)."""
    gram0 = getattr(solver, "gram0_", None)
    base = weight_deviation(solver.W0_, solver.W_, gram0)
    t3a = t3b = None
    if solver.capabilities.cumulative_objective and K.shape[0] > 0:
        W0 = solver.W0_.to("cpu", torch.float64)
        r0 = _fro(V.to("cpu", torch.float64) - K.to("cpu", torch.float64) @ W0)  # ||R0||_F
        alpha, beta = solver.identity_weight, solver.beta
        lam = alpha  # lambda_min(A) = alpha + beta lambda_min(gram0): one d_k^3 eigensolve
        if gram0 is not None and beta > 0:
            lam += beta * max(float(torch.linalg.eigvalsh(gram0.to("cpu", torch.float64))[0]), 0.0)
        t3a = r0 / (2 * math.sqrt(lam)) if lam > 0 else None
        t3b = r0 / (2 * math.sqrt(beta)) if beta > 0 and gram0 is not None else None
    return Deviation(base.fro, base.anchor, t3a, t3b, solver.condition_number())
