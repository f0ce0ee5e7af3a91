"""The Woodbury step applied in place: one rank-``u`` update of ``C``, no ``d_k^2`` temporaries.

``rlsedit_llm.kernel.rls.woodbury_update`` (behind ``LayerRLS.propose``) is a pure function: it returns a
new ``C`` and makes several ``d_k^2`` temporaries (``L F^T``, the difference, ``C + C^T`` and its
half). At ``d_k = 14336`` in float64 each is 1.64 GB and the update runs at several times its
memory-traffic floor. :func:`woodbury_update_` computes the same step on a ``C`` it may
overwrite:

    F = C K^T                     (d_k, u)   one read of C
    S = I + sign K F = L_S L_S^T  (u, u)
    G = F L_S^{-T}                (d_k, u)   so F S^{-1} F^T = G G^T
    W += sign G (L_S^{-1} R)      (d_k, d_v)
    C -= sign G G^T               one read and one write of C (a single addmm_)

That is three passes over ``C``, the floor of the Woodbury update. ``G G^T`` is computed by one
GEMM whose every entry is a dot product over the same ``u`` terms in the same order, so
``(G G^T)_{ij}`` and ``(G G^T)_{ji}`` are the same products summed the same way: a symmetric
``C`` stays bitwise symmetric for ``u = 1`` in any BLAS. For ``u > 1`` a BLAS may block the
inner dimension differently for different tiles; ``symmetrize="mirror"`` then copies the upper
triangle onto the lower in cache-sized blocks (about one more pass), ``"auto"`` (the default)
mirrors only when ``u > 1`` and a cheap probe (a few rows against the matching columns) finds an
asymmetry.
"""

from __future__ import annotations

import torch

from rlsedit_llm.errors import NotPositiveDefiniteError, ShapeError

__all__ = ["woodbury_update_", "mirror_upper_"]


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


def woodbury_update_(C: torch.Tensor, W: torch.Tensor, K: torch.Tensor, R: torch.Tensor, *,
                     sign: int = 1, symmetrize: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Add (``sign=1``) or remove (``sign=-1``) the batch ``K (u, d_k)`` with innovation
    ``R = V - K W (u, d_v)``, overwriting ``C (d_k, d_k)`` (symmetric) and ``W (d_k, d_v)``.

    The same step as ``LayerRLS.update(K, K @ W + R)`` (``kernel.rls.woodbury_update``); ``K`` and ``R`` are cast to
    ``C``'s dtype and device. ``symmetrize``: ``"auto"``, ``"mirror"`` or ``"none"`` (see the
    module docstring). Raises :class:`NotPositiveDefiniteError` before touching ``C`` or ``W``
    when ``I + sign K C K^T`` is not positive definite. Returns ``(C, W)``.
    """
    if C.ndim != 2 or C.shape[0] != C.shape[1] or not C.is_contiguous():
        raise ShapeError(f"C must be a contiguous square matrix; got shape {tuple(C.shape)}")
    d_k = C.shape[0]
    if K.ndim != 2 or K.shape[1] != d_k or W.shape[0] != d_k or R.shape != (K.shape[0], W.shape[1]):
        raise ShapeError(f"shapes do not match: C {tuple(C.shape)}, W {tuple(W.shape)}, "
                         f"K {tuple(K.shape)}, R {tuple(R.shape)}")
    if symmetrize not in ("auto", "mirror", "none"):
        raise ValueError(f"symmetrize must be 'auto', 'mirror' or 'none'; got {symmetrize!r}")
    K = K.to(device=C.device, dtype=C.dtype)
    R = R.to(device=C.device, dtype=C.dtype)
    u = K.shape[0]
    F = torch.mm(C, K.mT)  # (d_k, u): C symmetric, so this is also (K C)^T
    S = torch.addmm(torch.eye(u, dtype=C.dtype, device=C.device), K, F, alpha=sign)
    L, info = torch.linalg.cholesky_ex((S + S.mT) / 2)
    if int(info) != 0:
        raise NotPositiveDefiniteError(
            "I + K C K^T is not SPD: the state is corrupted" if sign > 0 else
            "I - K C K^T is not positive definite: this batch was never added to the state")
    G = torch.linalg.solve_triangular(L, F.mT, upper=False).mT.contiguous()  # F L^{-T}  (d_k, u)
    Y = torch.linalg.solve_triangular(L, R, upper=False)  # L^{-1} R  (u, d_v)
    W.addmm_(G, Y, alpha=sign)
    C.addmm_(G, G.mT, alpha=-sign)
    if symmetrize == "mirror" or (symmetrize == "auto" and u > 1 and _asymmetric(C)):
        mirror_upper_(C)
    return C, W
