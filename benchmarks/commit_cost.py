"""What the resumable in-place update costs: ``C += alpha G G^T`` staged panel by panel (the
library's :class:`~rlsedit_llm.kernel.inplace.SymmetricRankUpdate`, which an interrupt can never
leave half-applied) against the same panel update done directly in ``C`` (``addmm_`` on the panel,
the form it replaced, which an interrupt could leave half-applied).

Both compute the upper triangle by one GEMM per panel and mirror it; the staged form computes each
panel's new rows into a ``block x d_k`` buffer first and then copies them into ``C``: one more pass
over half of ``C``. Prints seconds per update (best of ``--trials``) and the ratio, per ``d_k``.

    python benchmarks/commit_cost.py                     # d_k 2048, 4096, 8192; u = 100; float64
    python benchmarks/commit_cost.py --dk 1024 --trials 2 --threads 1
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from rlsedit_llm.kernel.inplace import DEFAULT_BLOCK, SymmetricRankUpdate

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common beside this script, also when imported by path
from _common import best_of


def direct_update_(C: torch.Tensor, G: torch.Tensor, alpha: float, block: int = DEFAULT_BLOCK) -> None:
    """The unstaged panel update: each panel's GEMM straight into ``C``, then its mirror."""
    n = C.shape[0]
    for i in range(0, n, block):
        i1 = min(i + block, n)
        C[i:i1, i:].addmm_(G[i:i1], G[i:].mT, alpha=alpha)
        diag = C[i:i1, i:i1]
        diag.copy_(torch.triu(diag) + torch.triu(diag, 1).mT)
        for j in range(i1, n, block):
            j1 = min(j + block, n)
            C[j:j1, i:i1].copy_(C[i:i1, j:j1].mT)


def time_updates(d_k: int, u: int, trials: int, gen: torch.Generator) -> tuple[float, float]:
    """Seconds of one direct and one staged update at ``d_k`` (best of ``trials``)."""
    X = torch.randn(d_k, d_k, generator=gen, dtype=torch.float64)
    C = X @ X.mT / d_k + torch.eye(d_k, dtype=torch.float64)
    G = torch.randn(d_k, u, generator=gen, dtype=torch.float64) / d_k
    # each trial adds and removes the term, so C stays the same matrix throughout
    direct = best_of(lambda: (direct_update_(C, G, -1.0), direct_update_(C, G, 1.0)), trials) / 2
    staged = best_of(lambda: (SymmetricRankUpdate(C, G, -1.0).run(), SymmetricRankUpdate(C, G, 1.0).run()), trials) / 2
    return direct, staged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dk", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--u", type=int, default=100)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float64, u = {args.u}, "
          f"block {DEFAULT_BLOCK}, best of {args.trials}")
    print(f"{'d_k':>6} {'direct (s)':>11} {'staged (s)':>11} {'staged / direct':>16}")
    gen = torch.Generator().manual_seed(0)
    for d_k in args.dk:
        direct, staged = time_updates(d_k, args.u, args.trials, gen)
        print(f"{d_k:>6} {direct:>11.4f} {staged:>11.4f} {staged / direct:>16.2f}")


if __name__ == "__main__":
    main()
