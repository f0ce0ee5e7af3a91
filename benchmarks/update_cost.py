"""Cost of one RLSEdit update on this machine: flat in the history length, near the memory floor?

Measures, for the Woodbury recursion of ``rlsedit_theory.recursive``:

1. time of one update ``woodbury_update`` against the history length ``t`` (the state is really
   advanced through ``t`` single-row updates before the update at ``t`` is timed);
2. time of one update against ``d_k`` for batch sizes ``u`` in {1, 10, 100}, next to the time of a
   closed-form re-solve at the same point (Cholesky of the kept ``G_t`` plus a solve);
3. the memory-traffic floor of an update: one read of ``C`` to form ``F = C K^T`` and one read plus
   one write of ``C`` for ``C - F S^{-1} F^T``, i.e. ``3 * 8 * d_k^2`` bytes, divided by the copy
   bandwidth measured with ``np.copyto`` on a large array (a copy moves 2 bytes per byte copied:
   one read and one write). For large ``u`` the flop count ``4 d_k^2 u`` (``F`` and the rank-``u``
   update) at the measured ``dgemm`` rate is the binding floor; the table shows both.

Besides the library function it times other implementations of the same step (see
``CANDIDATES``), so that each implementation choice is measured against its alternatives:

- ``naive``: the textbook form of ``woodbury_update`` (``C - L F^T`` with ``L = F S^{-1}``, then
  ``(C + C^T) / 2``). The symmetrisation reads ``C^T`` with a stride of ``8 d_k`` bytes and the
  products allocate ``d_k^2`` temporaries: about ten passes over ``C``, several of them
  cache-hostile.
- ``library``: ``rlsedit_theory.woodbury_update``: a copy of ``C``, then
  ``C -= G G^T`` in place by one BLAS ``dgemm`` (``G = F R^{-T}``, ``S = R R^T``), plus a
  cache-blocked copy of the upper triangle onto the lower one when ``u > 1``. Five passes for
  ``u = 1``.
- ``syrk``: ``C - G @ G.T``: NumPy forms ``G G^T`` by ``dsyrk`` and mirrors it itself (exactly
  symmetric, one ``d_k^2`` temporary).
- ``inplace``: the library step without the copy, as a stateful estimator that owns ``C`` could
  run it: three passes, i.e. the floor as defined above.

Run ``python benchmarks/update_cost.py`` (about 5 minutes on 2 cores) or ``--quick`` (seconds);
``--long`` adds the ``d_k = 4096`` history up to ``t = 10^4``.
Environment variables that change BLAS behaviour (``OPENBLAS_NUM_THREADS``,
``OPENBLAS_CORETYPE``) are reported, not changed; compare runs with them set and unset from the
shell.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import scipy
import scipy.linalg
from scipy.linalg import blas

try:  # optional: only used to report the BLAS in use
    import threadpoolctl
except ImportError:  # pragma: no cover - depends on the environment
    threadpoolctl = None

from rlsedit_theory import Problem, RecursiveLS, woodbury_update

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common beside this script
from _common import best_of, cpu_name

# ---------------------------------------------------------------------------------------------
# Candidate implementations of the same step (maths identical to recursive.woodbury_update).
# ---------------------------------------------------------------------------------------------


def _factor(C: np.ndarray, K: np.ndarray):
    F = C @ K.T  # (d_k, u): one read of C
    S = np.eye(K.shape[0]) + K @ F  # (u, u)
    R = scipy.linalg.cholesky((S + S.T) / 2, lower=True)  # S = R R^T
    L = scipy.linalg.cho_solve((R, True), F.T).T  # F S^{-1}
    return L @ R, L  # G = F R^{-T} (G G^T = F S^{-1} F^T), gain


def update_naive(C, W, K, V):
    """The textbook step (``C - L F^T``, then ``(C + C^T) / 2``): the baseline of the comparison."""
    r = V - K @ W
    F = C @ K.T
    S = np.eye(K.shape[0]) + K @ F
    L = scipy.linalg.cho_solve(scipy.linalg.cho_factor((S + S.T) / 2, lower=True), F.T).T
    C_new = C - L @ F.T
    C_new = (C_new + C_new.T) / 2
    return C_new, W + L @ r


def update_syrk(C, W, K, V):
    r = V - K @ W
    G, L = _factor(C, K)
    return C - G @ G.T, W + L @ r


def update_inplace(C, W, K, V):
    r = V - K @ W
    G, L = _factor(C, K)
    res = blas.dgemm(-1.0, G, G, beta=1.0, c=C.T, trans_b=True, overwrite_c=True)
    assert np.shares_memory(res, C)
    W += L @ r
    return C, W


def update_library(C, W, K, V):
    C_new, W_new, _ = woodbury_update(C, W, K, V)
    return C_new, W_new


CANDIDATES: dict[str, Callable] = {
    "naive": update_naive,
    "library": update_library,
    "syrk": update_syrk,
    "inplace": update_inplace,
}

# ---------------------------------------------------------------------------------------------
# Measurement helpers.
# ---------------------------------------------------------------------------------------------


def _on_scratch(C: np.ndarray, W: np.ndarray, K: np.ndarray, V: np.ndarray, repeats: int) -> Callable[[], object]:
    """``update_inplace`` on a fresh copy of ``C`` and ``W`` per call (copied before the timing),
    so the timed calls leave the state as it was."""
    copies = iter([C.copy() for _ in range(repeats)])
    return lambda: update_inplace(next(copies), W.copy(), K, V)


def copy_bandwidth(n_bytes: int, repeats: int) -> float:
    """Bytes moved per second by ``np.copyto`` (read + write counted: ``2 * n_bytes`` per copy)."""
    src = np.ones(n_bytes // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch the pages
    return 2 * n_bytes / best_of(lambda: np.copyto(dst, src), repeats)


def gemm_rate(n: int, k: int, repeats: int) -> float:
    """Flop rate of ``C -= A B^T`` (``n x n``, inner size ``k``) in place: the kernel of the update."""
    rng = np.random.default_rng(0)
    A = rng.standard_normal((n, k))
    Cf = np.asfortranarray(rng.standard_normal((n, n)))
    return 2 * n * n * k / best_of(
        lambda: blas.dgemm(-1.0, A, A, beta=1.0, c=Cf, trans_b=True, overwrite_c=True), repeats
    )


def make_problem(d_k: int, d_v: int, seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    K_anchor = rng.standard_normal((2 * d_k, d_k)) / np.sqrt(2 * d_k)
    return Problem(rng.standard_normal((d_k, d_v)), 0.5, 1.0, gram0=K_anchor.T @ K_anchor)


def key_batches(rng, u: int, d_k: int, d_v: int):
    while True:
        yield rng.standard_normal((u, d_k)) / np.sqrt(d_k), rng.standard_normal((u, d_v))


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.3f}"


# ---------------------------------------------------------------------------------------------
# The two experiments.
# ---------------------------------------------------------------------------------------------


def time_vs_history(d_k: int, d_v: int, ts: list[int], repeats: int, variant: str, seed: int = 1):
    """Advance the state with single-row updates of ``variant`` and time the update at each ``t``
    (the timed updates are trial steps on the state at ``t``; the state then moves on)."""
    step = CANDIDATES[variant]
    problem = make_problem(d_k, d_v)
    rls = RecursiveLS(problem, track_information=False)
    C, W = rls.C_.copy(), rls.W_.copy()
    rng = np.random.default_rng(seed)
    batches = key_batches(rng, 1, d_k, d_v)
    t, out = 0, {}
    for target in sorted(ts):
        while t < target:  # really perform the t updates
            K, V = next(batches)
            C, W = step(C, W, K, V)
            t += 1
        K, V = next(batches)
        if variant == "inplace":  # time on scratch copies, so the state is not advanced here
            out[target] = best_of(_on_scratch(C, W, K, V, repeats), repeats)
        else:
            out[target] = best_of(partial(step, C, W, K, V), repeats)
    return out


def time_vs_size(d_k: int, d_v: int, u: int, variants: list[str], repeats: int, t_warm: int = 10):
    """Times at ``t = t_warm`` for each variant, and for a closed-form re-solve with ``G_t`` kept."""
    problem = make_problem(d_k, d_v)
    rls = RecursiveLS(problem, track_information=True)
    rng = np.random.default_rng(2)
    batches = key_batches(rng, u, d_k, d_v)
    B = problem.rhs0.copy()
    for _ in range(t_warm):
        K, V = next(batches)
        rls.update(K, V)
        B += K.T @ V
    K, V = next(batches)
    G_next, B_next = rls.G_ + K.T @ K, B + K.T @ V
    res = {}
    for name in variants:
        if name == "inplace":
            res[name] = best_of(_on_scratch(rls.C_, rls.W_, K, V, repeats), repeats)
        else:
            res[name] = best_of(partial(CANDIDATES[name], rls.C_, rls.W_, K, V), repeats)
    res["closed_form"] = best_of(
        lambda: scipy.linalg.cho_solve(scipy.linalg.cho_factor(G_next, lower=True), B_next),
        max(1, min(repeats, 3)),
    )
    # Same result? (relative to the library step, for the record)
    C_ref, W_ref = update_library(rls.C_, rls.W_, K, V)
    agree = {}
    for name in variants:
        C_x, W_x = CANDIDATES[name](rls.C_.copy(), rls.W_.copy(), K, V)
        agree[name] = max(
            np.linalg.norm(C_x - C_ref) / np.linalg.norm(C_ref),
            np.linalg.norm(W_x - W_ref) / np.linalg.norm(W_ref),
        )
    return res, agree


def describe_environment() -> list[str]:
    lines = [
        f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}",
        f"cpu: {cpu_name()}, os.cpu_count() = {os.cpu_count()}",
    ]
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_CORETYPE", "MKL_NUM_THREADS"):
        lines.append(f"{var} = {os.environ.get(var, '(unset)')}")
    if threadpoolctl is not None:
        for info in threadpoolctl.threadpool_info():
            lines.append(
                f"BLAS: {info.get('internal_api')} {info.get('version')} "
                f"arch={info.get('architecture')} threads={info.get('num_threads')}"
            )
    else:
        cfg = np.show_config(mode="dicts") if "mode" in np.show_config.__code__.co_varnames else None
        blas_cfg = (cfg or {}).get("Build Dependencies", {}).get("blas", {})
        lines.append(
            f"BLAS (numpy build config; threadpoolctl not installed): {blas_cfg.get('name')} "
            f"{blas_cfg.get('version')}"
        )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and short histories")
    parser.add_argument("--long", action="store_true",
                        help="also run d_k=4096 to t=10000 (about 10-15 more minutes)")
    parser.add_argument("--history-only", action="store_true", help="skip the d_k x u table")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (best is kept)")
    parser.add_argument("--variants", default="naive,library,syrk,inplace",
                        help="comma-separated subset of: " + ",".join(CANDIDATES))
    parser.add_argument("--history-variants", default="library",
                        help="variants whose time is measured against t (naive is slow: ~20 ms "
                        "per step at d_k=1024, so it is run only up to d_k=256 unless listed here)")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    for v in variants + args.history_variants.split(","):
        if v not in CANDIDATES:
            parser.error(f"unknown variant {v!r}; choose from {sorted(CANDIDATES)}")

    d_v = 8
    if args.quick:
        repeats = args.repeats or 5
        sizes, us = [256, 1024], [1, 10, 100]
        hist = {256: [1, 10, 100, 1000], 1024: [1, 10, 100]}
        bw_bytes = 64 << 20
    else:
        repeats = args.repeats or 7
        sizes, us = [256, 512, 1024, 2048, 4096], [1, 10, 100]
        hist = {256: [1, 10, 100, 1000, 10000], 1024: [1, 10, 100, 1000, 10000], 4096: [1, 10, 100, 1000]}
        bw_bytes = 256 << 20
        if args.long:
            hist[4096].append(10000)

    print("# RLSEdit update cost")
    for line in describe_environment():
        print("#", line)
    bw = copy_bandwidth(bw_bytes, repeats)
    rate = gemm_rate(1024, 64, 3)
    print(f"# copy bandwidth (np.copyto, {bw_bytes >> 20} MiB, read+write counted): {bw / 1e9:.1f} GB/s")
    print(f"# dgemm rate (C -= A A^T, n=1024, k=64): {rate / 1e9:.1f} GFLOP/s")
    print("# floor(update) = max(3 * 8 * d_k^2 bytes / bandwidth, 4 d_k^2 u flops / dgemm rate)")

    # 1. time vs history length
    print(f"\n## Update time (ms) against history length t (u = 1, d_v = {d_v})")
    flat_checks = []
    for d_k, ts in hist.items():
        names = args.history_variants.split(",")
        if d_k <= 256 and "naive" not in names:
            names.append("naive")
        for variant in names:
            started = time.perf_counter()
            res = time_vs_history(d_k, d_v, ts, repeats, variant)
            row = "  ".join(f"t={t}: {fmt_ms(s).strip()}" for t, s in res.items())
            print(f"d_k={d_k:5d} {variant:8s} {row}   ({time.perf_counter() - started:.0f} s to run)")
            if 10 in res and max(res) >= 1000:
                flat_checks.append((d_k, variant, max(res), res[max(res)] / res[10]))

    # 2. time vs size
    print(f"\n## Update time (ms) against d_k and u (t = 10, d_v = {d_v}); closed form = Cholesky "
          "of kept G_t + solve")
    header = f"{'d_k':>5} {'u':>4} " + " ".join(f"{v:>9}" for v in variants)
    header += f" {'closed':>9} {'mem floor':>9} {'floor':>9} " + " ".join(f"{v + '/fl':>10}" for v in variants)
    print(header)
    floor_checks = []
    for d_k in [] if args.history_only else sizes:
        for u in us:
            res, agree = time_vs_size(d_k, d_v, u, variants, repeats)
            mem_floor = 3 * 8 * d_k**2 / bw
            floor = max(mem_floor, 4 * d_k**2 * u / rate)
            line = f"{d_k:5d} {u:4d} " + " ".join(fmt_ms(res[v]) for v in variants)
            line += f" {fmt_ms(res['closed_form'])} {fmt_ms(mem_floor)} {fmt_ms(floor)} "
            line += " ".join(f"{res[v] / floor:10.2f}" for v in variants)
            print(line)
            worst = max(agree.values())
            if worst > 1e-12:
                print(f"      !! a variant differs from the library step by {worst:.1e}")
            if d_k >= 1024 and u == 1:
                floor_checks.extend((d_k, v, res[v] / mem_floor) for v in variants)

    print("\n## Target checks")
    for d_k, variant, t_max, ratio in flat_checks:
        verdict = "PASS" if ratio <= 1.2 else "FAIL"
        print(f"flat in t:   d_k={d_k} {variant}: time(t={t_max}) / time(t=10) = {ratio:.2f}  [{verdict}, <= 1.2]")
    for d_k, variant, ratio in floor_checks:
        verdict = "PASS" if ratio <= 3 else "FAIL"
        print(f"near floor:  d_k={d_k} u=1 {variant}: time / memory floor = {ratio:.2f}  [{verdict}, <= 3]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
