"""The Woodbury step applied in place: one rank-``u`` update of ``C``, no ``d_k^2`` temporaries.

The convention is the theory's (:mod:`rlsedit_theory.recursive`) everywhere in the kernel: row
keys ``K (u, d_k)``, absolute targets ``V (u, d_v)``, and ``sign = -1`` adds a batch, ``+1``
removes it, so the new state is ``W - sign G Y`` and ``C + sign G G^T``.

``rlsedit_llm.kernel.rls.woodbury_update`` is a pure function (the theory's torch twin, tested
against it; MEMIT's one-shot write uses it): it returns a new ``C`` and makes several ``d_k^2`` temporaries (``L F^T``,
the difference, ``C + C^T`` and its half). At ``d_k = 14336`` in float64 each is 1.64 GB.
:func:`woodbury_update_` computes the same step on a ``C`` it may overwrite, in two parts that
:class:`~rlsedit_llm.kernel.rls.LayerRLS` also uses separately (``propose`` computes the factors,
``commit`` applies them):

:func:`woodbury_factors` (reads ``C`` once, changes nothing)::

    F^T = K C                     (u, d_k)   one read of C (C symmetric: F = C K^T)
    S = I - sign K F = L L^T      (u, u)     I + K F adding, I - K F removing
    G = F L^{-T}                  (d_k, u)   so F S^{-1} F^T = G G^T
    Y = L^{-1} (V - K W)          (u, d_v)   the innovation, whitened

then ``W -= sign G Y`` and ``C += sign G G^T`` by :func:`symmetric_rank_update_`.

``F`` is computed as ``K C`` (row-major ``C`` read along its rows: about twice the rate of
``C K^T`` with OpenBLAS at ``d_k = 14336``).

The symmetric rank-``u`` update
-------------------------------
:func:`symmetric_rank_update_` adds ``alpha G G^T`` to ``C`` by row panels of ``block`` rows:
for the panel ``i`` it computes the upper part ``C[i, i:] += alpha G[i] G[i:]^T`` with one fused
GEMM (``addmm_``, no temporary), makes the diagonal block exactly symmetric (its upper triangle
copied onto its lower one) and copies each block ``C[i, j]`` (``j > i``) transposed onto
``C[j, i]``. Every entry below the diagonal is therefore a copy of its mirror: ``C`` is bitwise
symmetric after the update by construction, whatever the BLAS (a full ``G G^T`` by one GEMM is
not: OpenBLAS's ``dgemm`` rounds the two triangles differently for ``u > 1``), and only the upper
triangle's ``d_k^2 u`` multiply-adds are computed (half of the full GEMM). The transposed block
copies cost about as much as the flops saved: at ``d_k = 14336``, ``u = 100`` the whole update
takes about the time of one full ``addmm_`` (see docs/llm/scale.md).

``symmetrize`` selects the rank-``u`` part of :func:`woodbury_update_`: ``"symmetric"`` (the
default, above), or the earlier full GEMM ``C.addmm_(G, G^T)`` followed by ``"none"`` (nothing:
symmetric for ``u = 1`` in any BLAS, up to rounding otherwise), ``"mirror"`` (copy the upper
triangle onto the lower, about three more passes over ``C``) or ``"auto"`` (mirror when ``u > 1``
and a probe of a few rows against the matching columns finds an asymmetry).

Interrupted updates finish
--------------------------
An in-place update cannot be taken back bit for bit without a copy of ``C``, so it is made to
finish instead. :class:`SymmetricRankUpdate` is the update as a resumable object: each panel's
new rows are first computed out of place (``C`` untouched), then copied into ``C`` and mirrored,
and only then is the panel counted as done. Re-running :meth:`SymmetricRankUpdate.run` after an
exception at any bytecode therefore finishes the update exactly once: a panel whose copy may
have happened is copied again from the same staged rows, one whose rows were not staged yet is
computed from the untouched ``C``. :func:`symmetric_rank_update_` runs it with Ctrl-C deferred
(:func:`rlsedit_llm.interrupts.deferred_interrupts`) and, if anything else interrupts it, finishes
it before the exception propagates: ``C`` is always either untouched or fully updated.
The staging costs one ``block x d_k`` buffer per panel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rlsedit_llm.errors import NotPositiveDefiniteError, ShapeError
from rlsedit_llm.interrupts import deferred_interrupts

__all__ = ["woodbury_update_", "woodbury_factors", "symmetric_rank_update_", "SymmetricRankUpdate", "finish",
           "mirror_upper_", "DEFAULT_BLOCK"]

#: Rows per panel of :func:`symmetric_rank_update_` (and the size of its transposed block copies).
DEFAULT_BLOCK = 512

_MODES = ("symmetric", "auto", "mirror", "none")


def mirror_upper_(C: torch.Tensor, block: int = 512) -> torch.Tensor:
    """Copy the upper triangle of the square ``C`` onto its lower triangle in place, block by
    block (each block pair is cache-sized, so the transposed read is not strided over the whole
    matrix). Returns ``C``."""
    n = C.shape[0]
    for i in range(0, n, block):
        i1 = min(i + block, n)
        diag = C[i:i1, i:i1]
        diag.copy_(torch.triu(diag) + torch.triu(diag, 1).mT)
        for j in range(i1, n, block):
            j1 = min(j + block, n)
            C[j:j1, i:i1].copy_(C[i:i1, j:j1].mT)
    return C


def _asymmetric(C: torch.Tensor, probes: int = 4) -> bool:
    n = C.shape[0]
    idx = torch.linspace(0, n - 1, steps=min(probes, n)).round().long().unique().tolist()
    return any(not torch.equal(C[i], C[:, i]) for i in idx)


def _mirror_panel_(C: torch.Tensor, i: int, i1: int, block: int) -> None:
    """Copy the upper rows ``i:i1`` right of the diagonal block onto columns ``i:i1`` below it."""
    n = C.shape[0]
    for j in range(i1, n, block):
        j1 = min(j + block, n)
        C[j:j1, i:i1].copy_(C[i:i1, j:j1].mT)


class SymmetricRankUpdate:
    """``C += alpha G G^T`` in place for a square ``C (n, n)`` and ``G (n, u)``, resumable.

    :meth:`run` updates the upper triangle panel by panel (``n^2 u`` multiply-adds, half a full
    GEMM) and copies it onto the lower one, so ``C`` is bitwise symmetric afterwards (the lower
    triangle of the input is not read). If :meth:`run` is interrupted at any point, calling it
    again finishes the update exactly once (see the module docstring). ``G`` is cast to ``C``'s
    dtype and device.
    """

    def __init__(self, C: torch.Tensor, G: torch.Tensor, alpha: float = 1.0, *, block: int = DEFAULT_BLOCK) -> None:
        if C.ndim != 2 or C.shape[0] != C.shape[1] or C.stride(1) != 1:
            raise ShapeError(f"C must be a square matrix with unit column stride; got shape {tuple(C.shape)}")
        if G.ndim != 2 or G.shape[0] != C.shape[0]:
            raise ShapeError(f"G must have shape ({C.shape[0]}, u); got {tuple(G.shape)}")
        if not (isinstance(block, int) and block >= 1):
            raise ValueError(f"block must be an int >= 1; got {block!r}")
        self.C = C
        self.G = G.to(device=C.device, dtype=C.dtype)
        self.alpha = float(alpha)
        self.block = block
        self.next_row = 0  # rows [0, next_row) are updated in C and mirrored
        self.started = False  # whether C may have been written
        self._staged: tuple[int, torch.Tensor] | None = None  # (first row, its new upper rows)

    @property
    def done(self) -> bool:
        return self.next_row >= self.C.shape[0]

    def run(self) -> torch.Tensor:
        """Apply the update, or finish an interrupted one; returns ``C``."""
        C, G, n, block = self.C, self.G, self.C.shape[0], self.block
        self.started = True
        while self.next_row < n:
            i = self.next_row
            i1 = min(i + block, n)
            staged = self._staged
            if staged is None or staged[0] != i:
                rows = torch.addmm(C[i:i1, i:], G[i:i1], G[i:].mT, alpha=self.alpha)  # (i1-i, n-i); C untouched
                diag = rows[:, : i1 - i]
                diag.copy_(torch.triu(diag) + torch.triu(diag, 1).mT)  # the diagonal block exactly symmetric
                staged = self._staged = (i, rows)
            C[i:i1, i:].copy_(staged[1])  # idempotent: the same staged rows every time
            _mirror_panel_(C, i, i1, block)
            self.next_row = i1
        self._staged = None
        return C


def finish(run: Callable[[], Any]) -> Any:
    """Call ``run`` (a resumable, idempotent step) with Ctrl-C deferred; if it raises, call it again
    to finish, then re-raise (the step is complete either way)."""
    with deferred_interrupts():
        try:
            return run()
        except BaseException:
            run()
            raise


def symmetric_rank_update_(C: torch.Tensor, G: torch.Tensor, alpha: float = 1.0, *,
                           block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """``C += alpha G G^T`` in place for a square ``C (n, n)`` and ``G (n, u)``; returns ``C``.

    Computes the upper triangle (``n^2 u`` multiply-adds, half a full GEMM) and copies it onto
    the lower one, so ``C`` is bitwise symmetric afterwards (see the module docstring; the lower
    triangle of the input is not read). ``G`` is cast to ``C``'s dtype and device. Never stops
    half-way: Ctrl-C waits until the update is complete, and any other exception is raised after
    the update was finished (:class:`SymmetricRankUpdate`).
    """
    return finish(SymmetricRankUpdate(C, G, alpha, block=block).run)


def woodbury_factors(C: torch.Tensor, W: torch.Tensor, K: torch.Tensor, V: torch.Tensor, *,
                     sign: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors ``(G (d_k, u), Y (u, d_v))`` of the step adding (``sign=-1``, the theory's
    convention) or removing (``sign=+1``) the batch ``K (u, d_k)`` with absolute targets
    ``V (u, d_v)`` from the state ``(C, W)``: the new state is ``W - sign G Y`` and
    ``C + sign G G^T``. Reads ``C`` (symmetric) once; changes nothing.

    ``K`` and ``V`` are cast to ``C``'s dtype and device. Raises
    :class:`NotPositiveDefiniteError` when ``I - sign K C K^T`` is not positive definite.
    """
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ShapeError(f"C must be a square matrix; got shape {tuple(C.shape)}")
    d_k = C.shape[0]
    if (K.ndim != 2 or K.shape[1] != d_k or W.ndim != 2 or W.shape[0] != d_k
            or V.ndim != 2 or V.shape != (K.shape[0], W.shape[1])):
        raise ShapeError(f"shapes do not match: C {tuple(C.shape)}, W {tuple(W.shape)}, K {tuple(K.shape)}, "
                         f"V {tuple(V.shape)}")
    if sign not in (1, -1):
        raise ValueError(f"sign must be -1 (add) or +1 (remove); got {sign!r}")
    K = K.to(device=C.device, dtype=C.dtype)
    R = V.to(device=C.device, dtype=C.dtype) - K @ W.to(device=C.device, dtype=C.dtype)  # innovation (u, d_v)
    u = K.shape[0]
    Ft = torch.mm(K, C)  # (u, d_k) = (C K^T)^T for a symmetric C
    S = torch.addmm(torch.eye(u, dtype=C.dtype, device=C.device), Ft, K.mT, alpha=-sign)
    L, info = torch.linalg.cholesky_ex((S + S.mT) / 2)
    if int(info) != 0:
        raise NotPositiveDefiniteError(
            "I + K C K^T is not SPD: the state is corrupted" if sign < 0 else
            "I - K C K^T is not positive definite: this batch was never added to the state")
    Gt = torch.linalg.solve_triangular(L, Ft, upper=False)  # L^{-1} F^T  (u, d_k), contiguous
    Y = torch.linalg.solve_triangular(L, R, upper=False)  # L^{-1} R  (u, d_v)
    return Gt.mT, Y


def woodbury_update_(C: torch.Tensor, W: torch.Tensor, K: torch.Tensor, V: torch.Tensor, *,
                     sign: int = -1, symmetrize: str = "symmetric",
                     block: int = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Add (``sign=-1``) or remove (``sign=+1``) the batch ``K (u, d_k)`` with absolute targets
    ``V (u, d_v)``, overwriting ``C (d_k, d_k)`` (symmetric) and ``W (d_k, d_v)``.

    The in-place twin of :func:`rlsedit_llm.kernel.rls.woodbury_update` (``sign=-1``) and
    ``woodbury_downdate`` (``sign=+1``); ``K`` and ``V`` are cast to ``C``'s dtype and device.
    ``symmetrize``: ``"symmetric"`` (default), ``"auto"``, ``"mirror"`` or ``"none"`` (see the
    module docstring); ``block``: the panel size of ``"symmetric"``. Raises
    :class:`NotPositiveDefiniteError` before touching ``C`` or ``W`` when ``I - sign K C K^T`` is
    not positive definite. Returns ``(C, W)``.
    """
    if C.ndim != 2 or C.shape[0] != C.shape[1] or not C.is_contiguous():
        raise ShapeError(f"C must be a contiguous square matrix; got shape {tuple(C.shape)}")
    d_k = C.shape[0]
    if K.ndim != 2 or K.shape[1] != d_k or W.shape[0] != d_k or V.shape != (K.shape[0], W.shape[1]):
        raise ShapeError(f"shapes do not match: C {tuple(C.shape)}, W {tuple(W.shape)}, "
                         f"K {tuple(K.shape)}, V {tuple(V.shape)}")
    if symmetrize not in _MODES:
        raise ValueError(f"symmetrize must be one of {_MODES}; got {symmetrize!r}")
    G, Y = woodbury_factors(C, W, K, V, sign=sign)
    W.addmm_(G, Y, alpha=-sign)
    if symmetrize == "symmetric":
        symmetric_rank_update_(C, G, sign, block=block)
        return C, W
    C.addmm_(G, G.mT, alpha=sign)
    if symmetrize == "mirror" or (symmetrize == "auto" and K.shape[0] > 1 and _asymmetric(C)):
        mirror_upper_(C)
    return C, W
