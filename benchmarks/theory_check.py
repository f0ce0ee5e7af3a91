"""Theory against measurement: the bounds of T2-T5 and C4 next to what a real stream did.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/theory_check.py STATE --out OUT [--layers 3,5]

``STATE`` is a saved editor (``Editor.save``; e.g. ``OUT/state/rlsedit`` of an
``rlsedit bench --keep-state`` run) of a method whose weights minimise the cumulative objective
``J_t`` (RLSEdit, MEMIT-seq). Nothing but the save is read: per edited layer it holds the
pre-trained weights ``W0``, the anchor Gram ``gram0 = N E[k k^T]``, ``alpha``, ``beta`` and the
final weights ``W``; its journal holds the keys ``K_t`` and absolute values ``V_t`` every batch
wrote. No model is loaded.

Per layer the stream is replayed in float64 with :class:`rlsedit_theory.RecursiveLS` on
``rlsedit_theory.Problem(W0, alpha, beta, gram0)`` (so ``A = alpha I + beta N E[k k^T]``), and at
every batch ``t`` the functions of :mod:`rlsedit_theory.bounds` are evaluated on the replayed
states:

- **T2** the residual the write leaves, ``||V_t - K_t W_t||``, against
  ``||r_t|| / (1 + lambda_min(K_t C_{t-1} K_t^T))`` (and the innovation ``||r_t||`` itself);
- **T3** ``||W_t - W0||_A^2 <= ||R0||^2 / 4``, T3(a) ``||W_t - W0|| <= ||R0|| / (2
  sqrt(lambda_min(A)))`` and T3(b) ``||K0 (W_t - W0)|| <= ||R0|| / (2 sqrt(beta))``;
- **T4** the step ``W_t - W_{t-1}``: T4(a) in the ``G_{t-1}`` norm and T4(b) in Frobenius norm;
- **T5** for every earlier batch ``j < t``: the one-step interference ``||K_j (W_t - W_{t-1})||``
  (T5a, spec form and sharp form) and the cumulative drift ``||K_j (W_t - W_j)||`` (T5b); the
  change of batch ``j``'s own residual is at most the drift (triangle inequality) and is kept too;
- **C4** the information floor ``lambda_min(A) + t lambda_min(S_hat_t) <= lambda_min(G_t)`` and
  the plasticity it implies for T2's shrink factor (:func:`rlsedit_theory.bounds.c4_plasticity_bound`).

Every comparison is a :class:`~rlsedit_theory.bounds.Bound` ``lhs <= rhs``; its ``ratio`` is
``lhs / rhs``, at most 1 when the bound holds: measured / bound for the upper bounds, bound /
measured for the two lower bounds of C4. The replay is checked against the save (the replayed
final ``W`` and ``C`` against the saved ones) and against the exact identities of T2, T3 and T5(a).

Output in ``OUT`` (created): ``theory_check.json`` (every figure), ``theory_check.md`` (the
consistency checks, the worst ratio per bound, and per layer and batch measured vs bound) and
``theory_check.png`` (prediction and measurement together, one panel per theorem).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from rlsedit_llm.editing.config import EditConfig
from rlsedit_llm.files import atomic_write_text
from rlsedit_llm.kernel.registry import capabilities
from rlsedit_theory import Problem, RecursiveLS
from rlsedit_theory import bounds as B

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common beside this script, also when imported by path
from _common import read_saved_state

log = logging.getLogger("theory_check")

#: Bound keys in the order of the summary, with their theorem and what is compared.
BOUNDS = {
    "T2": "T2 residual left by the write  ||V_t - K_t W_t|| <= ||r_t|| / (1 + lambda_min(K_t C_{t-1} K_t^T))",
    "T3": "T3 A-norm deviation  ||W_t - W0||_A^2 <= ||R0||^2 / 4  (squares)",
    "T3a": "T3(a) deviation  ||W_t - W0|| <= ||R0|| / (2 sqrt(lambda_min(A)))",
    "T3b": "T3(b) anchor drift  ||K0 (W_t - W0)|| <= ||R0|| / (2 sqrt(beta))",
    "T4a": "T4(a) step  ||W_t - W_{t-1}||_{G_{t-1}} <= ||r_t|| / 2",
    "T4b": "T4(b) step  ||W_t - W_{t-1}|| <= ||r_t|| / (2 sqrt(lambda_min(G_{t-1})))",
    "T5a": "T5(a) one-step interference  ||K_j (W_t - W_{t-1})|| <= ||K_j C_t K_t^T|| ||r_t||",
    "T5b": "T5(b) drift of batch j  ||K_j (W_t - W_j)|| <= ||K_j C_j K_j^T||^(1/2) ||R^(j)|| / 2",
    "C4": "C4 floor (lower bound)  lambda_min(A) + t lambda_min(S_hat_t) <= lambda_min(G_t)",
    "C4p": "C4 plasticity (lower bound)  1/(1 + lambda_min(K_t K_t^T)/f_{t-1}) <= T2 shrink factor",
}
LOWER = {"C4", "C4p"}  # the bound is the left side, the measurement the right one


# ---------------------------------------------------------------------------------------------
# Reading the save
# ---------------------------------------------------------------------------------------------
def read_stream(directory: str | Path, layers: list[int] | None = None) -> dict:
    """The save at ``directory`` as float64 NumPy arrays, after the save's own checks.

    Returns ``{"manifest", "layers", "solvers": {layer: {"W0", "W", "C" (or None), "gram0" (or
    None), "alpha", "beta", "dtype"}}, "batches": [{"edit_id", "facts", "K": {layer: (u, d_k)},
    "V": {layer: (u, d_v)}}]}`` with the batches in journal order; ``manifest`` is the state dict
    without its tensors (config, spec, layers, ...).
    """
    state = read_saved_state(directory)
    method = state["config"]["method"]
    if not capabilities(method).cumulative_objective:
        raise ValueError(f"the save is of method {method!r}, whose weights do not minimise J_t: the theorems do not "
                         f"apply")
    saved = list(state["layers"])
    chosen = saved if layers is None else [int(l) for l in layers]
    unknown = sorted(set(chosen) - set(saved))
    if unknown:
        raise ValueError(f"layers {unknown} were not edited; the save holds {saved}")

    def array(t: torch.Tensor | None) -> np.ndarray | None:
        return None if t is None else t.double().numpy()

    solvers = {}
    for layer in chosen:
        solver = state["solvers"][layer]
        tensors = solver["tensors"]
        solvers[layer] = {"W0": array(tensors["W0"]), "W": array(tensors["W"]), "C": array(tensors.get("C")),
                          "gram0": array(tensors.get("gram0")), "alpha": float(solver["scalars"]["alpha"]),
                          "beta": float(solver["scalars"]["beta"]), "dtype": solver.get("dtype")}
    batches = [{"edit_id": e["edit_id"], "facts": len(e["facts"]),
                "K": {l: array(e["keys"][l]) for l in chosen}, "V": {l: array(e["values"][l]) for l in chosen}}
               for e in state["journal"]]
    manifest = {k: v for k, v in state.items() if k not in ("solvers", "journal")}
    return {"manifest": manifest, "layers": chosen, "solvers": solvers, "batches": batches}


# ---------------------------------------------------------------------------------------------
# The replay and the bounds
# ---------------------------------------------------------------------------------------------
def _record(key: str, bound: B.Bound, layer: int, t: int, j: int | None = None, **extra) -> dict:
    lower = key in LOWER
    return {"bound": key, "layer": layer, "t": t, "j": j,
            "measured": bound.rhs if lower else bound.lhs, "predicted": bound.lhs if lower else bound.rhs,
            "kind": "lower" if lower else "upper", "ratio": bound.ratio, **extra}


def check_layer(layer: int, solver: dict, batches: list[dict], bar=None) -> tuple[list[dict], dict]:
    """Replay one layer's stream; return its bound records and its consistency checks."""
    problem = Problem(solver["W0"], solver["alpha"], solver["beta"], gram0=solver["gram0"])
    edits = [(b["K"][layer], b["V"][layer]) for b in batches]
    rls = RecursiveLS(problem, track_information=True)
    Ws, Cs = [rls.W_], [rls.C_]  # W*_j, C_j for j = 0..t
    records, identities = [], {"T2": 0.0, "T3 energy": 0.0, "T5a": 0.0}
    for t, (K, V) in enumerate(edits, start=1):
        W_prev, C_prev, G_prev = rls.W_, rls.C_, rls.G_  # update() makes new arrays
        rls.update(K, V)
        W_t, C_t = rls.W_, rls.C_
        Ws.append(W_t)
        Cs.append(C_t)
        seen = edits[:t]
        r_norm = float(np.linalg.norm(V - K @ W_prev))
        # T2
        t2 = B.t2_adherence_bound(K, V, W_prev, W_t, C_prev)
        records.append(_record("T2", t2, layer, t, innovation=r_norm))
        identities["T2"] = max(identities["T2"], B.t2_residual_identity(K, V, W_prev, W_t, C_prev).relative_error)
        # T3 (a Gram-only anchor has V0 = K0 W0, so W*_0 = W0)
        certificate = B.deviation_certificate(problem, seen, W_t)
        records.append(_record("T3", certificate["metric"], layer, t))
        records.append(_record("T3a", certificate["from_preservation_state"], layer, t))
        if "anchor_drift" in certificate:
            records.append(_record("T3b", certificate["anchor_drift"], layer, t))
        identities["T3 energy"] = max(identities["T3 energy"],
                                      B.t3_energy_identity(problem, seen, W_t).relative_error)
        # T4
        records.append(_record("T4a", B.t4a_metric_bound(K, V, W_prev, W_t, C_prev, G_prev=G_prev), layer, t))
        records.append(_record("T4b", B.t4b_step_bound(K, V, W_prev, W_t, C_prev, G_prev=G_prev), layer, t))
        # T5: every earlier batch j
        for j in range(1, t):
            K_j, V_j = edits[j - 1]
            spec, sharp, _ = B.t5a_interference_bounds(K_j, K, V, W_prev, W_t, C_prev)
            records.append(_record("T5a", sharp, layer, t, j, spec_form=spec.rhs))
            identities["T5a"] = max(identities["T5a"], B.t5a_interference_identity(
                K_j, K, V, W_prev, W_t, C_prev).relative_error)
            drift = B.t5b_drift_bound(problem, seen, j, W_t, W_j=Ws[j], C_j=Cs[j])
            records.append(_record("T5b", drift, layer, t, j,
                                   residual_then=float(np.linalg.norm(V_j - K_j @ Ws[j])),
                                   residual_now=float(np.linalg.norm(V_j - K_j @ W_t))))
        # C4
        # The measured side is read off the replayed state (lambda_min(G_t) = 1 / lambda_max(C_t), C_t
        # from the Woodbury steps), not recomputed from the keys by the function that predicts it.
        floor = B.information_floor_bound(problem, seen)
        records.append(_record("C4", B.Bound(floor.lhs, 1.0 / float(np.linalg.eigvalsh(C_t)[-1]), floor.name),
                               layer, t, closed_form_rhs=floor.rhs))
        records.append(_record("C4p", B.c4_plasticity_bound(problem, edits[: t - 1], K, C_prev), layer, t))
        if bar is not None:
            bar.update(1)
    W_T, W_saved = rls.W_, solver["W"]
    edit_norm = float(np.linalg.norm(W_saved - solver["W0"]))
    consistency = {
        "W_gap_relative_to_edit": float(np.linalg.norm(W_T - W_saved)) / edit_norm if edit_norm else 0.0,
        "W_max_abs_gap": float(np.abs(W_T - W_saved).max()),
        "C_gap_relative": (float(np.linalg.norm(rls.C_ - solver["C"]) / np.linalg.norm(solver["C"]))
                           if solver["C"] is not None else None),
        "identities_relative_error": identities,
        "lambda_min_A": float(np.linalg.eigvalsh(problem.metric)[0]),
        "edit_norm": edit_norm,
    }
    return records, consistency


def summarize(records: list[dict], tol: float) -> dict:
    """Per bound: the worst (largest) and smallest ratio, the median, and whether all hold."""
    out = {}
    for key in BOUNDS:
        ratios = [r["ratio"] for r in records if r["bound"] == key]
        if not ratios:
            continue
        worst = max(records, key=lambda r: r["ratio"] if r["bound"] == key else -math.inf)
        out[key] = {"statement": BOUNDS[key], "n": len(ratios), "worst_ratio": max(ratios),
                    "smallest_ratio": min(ratios), "median_ratio": statistics.median(ratios),
                    "worst_at": {"layer": worst["layer"], "t": worst["t"], "j": worst["j"]},
                    "holds": all(x <= 1 + tol for x in ratios)}
    return out


def run(state, out, *, layers=None, tol: float = 1e-9, replay_tol: float = 1e-8) -> dict:
    """Replay the save at ``state``, write the three files into ``out``; return the results."""
    tic = time.perf_counter()
    out = Path(out)
    stream = read_stream(state, layers)
    manifest, batches = stream["manifest"], stream["batches"]
    spec = manifest["spec"]
    log.info("%s: %d edits in %d batches, layers %s, d_k %d, d_v %d", state, sum(b["facts"] for b in batches),
             len(batches), stream["layers"], spec["d_k"], spec["d_model"])
    records, consistency = [], {}
    with tqdm(total=len(stream["layers"]) * len(batches), desc="theory check", unit="step",
              disable=not log.isEnabledFor(logging.INFO)) as bar:
        for layer in stream["layers"]:
            layer_records, consistency[str(layer)] = check_layer(layer, stream["solvers"][layer], batches, bar)
            records += layer_records
            c = consistency[str(layer)]
            log.info("layer %d: replayed W vs saved W %.2e (relative to the edit), C %.2e", layer,
                     c["W_gap_relative_to_edit"], c["C_gap_relative"] if c["C_gap_relative"] is not None else math.nan)
    replay_ok = all(c["W_gap_relative_to_edit"] <= replay_tol and
                    (c["C_gap_relative"] is None or c["C_gap_relative"] <= replay_tol) and
                    all(e <= replay_tol for e in c["identities_relative_error"].values())
                    for c in consistency.values())
    config = EditConfig.from_dict(manifest["config"])
    results = {
        "state": str(state),
        "stream": {"method": config.method, "edits": sum(b["facts"] for b in batches), "batches": len(batches),
                   "batch_sizes": [b["facts"] for b in batches], "layers": stream["layers"],
                   "d_k": spec["d_k"], "d_v": spec["d_model"], "alpha": config.alpha, "beta": config.beta,
                   "mom2_weight": config.resolved_mom2_weight(spec["d_k"]),
                   "state_dtype": {str(l): s["dtype"] for l, s in stream["solvers"].items()}},
        "tolerances": {"ratio": tol, "replay": replay_tol},
        "consistency": consistency, "replay_consistent": replay_ok,
        "summary": summarize(records, tol), "records": records,
        "seconds": round(time.perf_counter() - tic, 1),
    }
    results["all_bounds_hold"] = all(s["holds"] for s in results["summary"].values())
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "theory_check.json", json.dumps(results, indent=1))
    atomic_write_text(out / "theory_check.md", markdown(results))
    plot(results, out / "theory_check.png")
    log.info("replay consistent: %s; every bound holds: %s; worst ratios: %s", replay_ok, results["all_bounds_hold"],
             ", ".join(f"{k} {s['worst_ratio']:.3g}" for k, s in results["summary"].items()))
    log.info("wrote %s (%.1f s)", out, results["seconds"])
    return results


# ---------------------------------------------------------------------------------------------
# Report and plot
# ---------------------------------------------------------------------------------------------
def _g(x) -> str:
    if x is None:
        return "—"
    return f"{x:.3g}" if math.isfinite(x) else str(x)


def markdown(results: dict) -> str:
    st = results["stream"]
    lines = [f"# Theory against measurement: `{results['state']}`", "",
             f"{st['method']}, {st['edits']} edits in {st['batches']} batches {st['batch_sizes']}, layers "
             f"{st['layers']}, d_k {st['d_k']}, d_v {st['d_v']}, alpha {st['alpha']:g}, beta {st['beta']:g}, "
             f"N {st['mom2_weight']:g}. Replayed in float64 by `rlsedit_theory` from the save alone.", "",
             "## Replay against the save", "",
             "| layer | W gap / ‖W − W0‖ | C gap (relative) | T2 identity | T3 energy identity | T5(a) identity "
             "| λmin(A) |",
             "|---|---|---|---|---|---|---|"]
    for layer, c in results["consistency"].items():
        e = c["identities_relative_error"]
        lines.append(f"| {layer} | {_g(c['W_gap_relative_to_edit'])} | {_g(c['C_gap_relative'])} | {_g(e['T2'])} | "
                     f"{_g(e['T3 energy'])} | {_g(e['T5a'])} | {_g(c['lambda_min_A'])} |")
    lines += ["", f"Replay consistent (every gap and identity error <= {results['tolerances']['replay']:g}): "
              f"**{results['replay_consistent']}**.", "",
              "## Per bound", "",
              "ratio = measured / bound for an upper bound, bound / measured for a lower bound (C4): "
              "at most 1 when the bound holds; near 1 means tight.", "",
              "| bound | statement | cases | worst ratio (at layer, t, j) | median | smallest | holds |",
              "|---|---|---|---|---|---|---|"]
    for key, s in results["summary"].items():
        at = s["worst_at"]
        where = f"{at['layer']}, {at['t']}" + (f", {at['j']}" if at["j"] is not None else "")
        statement = s["statement"].split("  ", 1)[-1].replace("||", "‖")  # a bare | would split the cell
        lines.append(f"| {key} | {statement} | {s['n']} | {_g(s['worst_ratio'])} ({where}) | "
                     f"{_g(s['median_ratio'])} | {_g(s['smallest_ratio'])} | {'yes' if s['holds'] else '**NO**'} |")
    lines += ["", "## Per layer and batch", "",
              "| layer | t | j | bound | measured | bound value | ratio |", "|---|---|---|---|---|---|---|"]
    for r in results["records"]:
        lines.append(f"| {r['layer']} | {r['t']} | {r['j'] if r['j'] is not None else ''} | {r['bound']} | "
                     f"{_g(r['measured'])} | {_g(r['predicted'])} | {_g(r['ratio'])} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Six panels (T2, T3, T4, T5(b) for the first batch, C4 floor, C4 plasticity), one colour per
    layer: measurement solid with dots, prediction dashed."""
    from rlsedit_llm.evaluation.plots import _pyplot

    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator
    records = results["records"]
    layers = results["stream"]["layers"]
    colours = {l: plt.get_cmap("tab10")(i % 10) for i, l in enumerate(layers)}

    def series(key, layer, j=None):
        rows = sorted((r for r in records if r["bound"] == key and r["layer"] == layer and (j is None or r["j"] == j)),
                      key=lambda r: r["t"])
        return [r["t"] for r in rows], [r["measured"] for r in rows], [r["predicted"] for r in rows], rows

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    panels = [
        (axes[0, 0], "T2", None, "T2: residual left by write t", "||V_t - K_t W_t||"),
        (axes[0, 1], "T3a", None, "T3: deviation from W0 (o) and anchor drift (s)", "norm"),
        (axes[0, 2], "T4b", None, "T4(b): step ||W_t - W_{t-1}||", "||W_t - W_{t-1}||"),
        (axes[1, 0], "T5b", 1, "T5(b): drift of batch 1, ||K_1 (W_t - W_1)||", "||K_1 (W_t - W_1)||"),
        (axes[1, 1], "C4", None, "C4: lambda_min(G_t) and its floor", "lambda_min(G_t)"),
        (axes[1, 2], "C4p", None, "C4 via T2: shrink factor and its floor", "1/(1 + lambda_min(K_t C_{t-1} K_t^T))"),
    ]
    for ax, key, j, title, ylabel in panels:
        for layer in layers:
            ts, measured, predicted, rows = series(key, layer, j)
            if not ts:
                continue
            c = colours[layer]
            ax.plot(ts, measured, "-o", color=c, ms=4, label=f"layer {layer}")
            ax.plot(ts, predicted, "--", color=c, alpha=0.8)
            if key == "T2":
                ax.plot(ts, [r["innovation"] for r in rows], ":", color=c, alpha=0.6)
            if key == "T3a":
                ts_b, m_b, p_b, _ = series("T3b", layer)
                ax.plot(ts_b, m_b, "-s", color=c, ms=4)
                ax.plot(ts_b, p_b, "-.", color=c, alpha=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("batch t")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel, fontsize=8)
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].legend(fontsize=7)
    axes[0, 0].text(0.02, 0.02, "dotted: innovation ||r_t||", transform=axes[0, 0].transAxes, fontsize=7)
    axes[0, 1].text(0.02, 0.02, "dashed: T3(a) bound, dash-dot: T3(b) bound", transform=axes[0, 1].transAxes,
                    fontsize=7)
    if not any(r["bound"] == "T5b" for r in records):
        axes[1, 0].text(0.5, 0.5, "one batch: no earlier edit", ha="center", transform=axes[1, 0].transAxes)
    st = results["stream"]
    fig.suptitle(f"Theory (dashed) against measurement (solid): {st['method']}, {st['edits']} edits in "
                 f"{st['batches']} batches, alpha {st['alpha']:g}, N {st['mom2_weight']:g}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("state", help="a saved editor folder (Editor.save, e.g. OUT/state/rlsedit of rlsedit bench)")
    parser.add_argument("--out", required=True, help="folder for theory_check.{json,md,png} (created)")
    parser.add_argument("--layers", default=None, help="comma-separated edited layers (default: all in the save)")
    parser.add_argument("--tol", type=float, default=1e-9, help="a bound holds when its ratio is <= 1 + tol")
    parser.add_argument("--replay-tol", type=float, default=1e-8,
                        help="largest relative gap between the replay and the save (and identity error)")
    parser.add_argument("--quiet", action="store_true", help="warnings only, no progress bar")
    args = parser.parse_args(argv)
    if not log.handlers and not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    layers = None if args.layers is None else [int(x) for x in args.layers.split(",") if x.strip()]
    return run(args.state, args.out, layers=layers, tol=args.tol, replay_tol=args.replay_tol)


if __name__ == "__main__":
    main()
