"""PNG figures of a benchmark's results (matplotlib, Agg backend; nothing is shown on screen).

The run figures take the :class:`.results.Results` of a run and a file path; a method without
data for a figure is left out of it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rlsedit_llm.evaluation.results import MethodRecord, Results, Scores
from rlsedit_llm.kernel.registry import method_names

__all__ = ["plot_scores", "plot_retention", "plot_deviation", "plot_norms", "plot_lengths", "METRIC_LABELS"]

METRIC_LABELS = {
    "efficacy": "efficacy",
    "generalization": "generalization (paraphrase)",
    "specificity": "specificity (neighbourhood)",
    "score": "score (harmonic mean)",
    "wild": "generation check (no teacher forcing)",
}
_PANELS = ("efficacy", "generalization", "specificity", "score")
# Methods can coincide (RLSEdit and MEMIT-seq are the same estimator), so the first registered
# method is drawn as a wide translucent line and the others thin, every other one dashed, each
# with its own marker: curves on top of each other all stay visible.
_MARKERS = ("o", "x", "s", "^", "v", "D", "P", "*", "<", ">")


def _style(name: str, *, line: bool = True) -> dict:
    """Matplotlib keyword arguments that tell method ``name`` apart from the others."""
    names = method_names()
    rank = names.index(name) if name in names else len(names)
    out = {"marker": _MARKERS[rank % len(_MARKERS)], "ms": 4}
    if line:
        out.update({"lw": 3.0, "alpha": 0.55} if rank == 0 else
                   {"lw": 1.4, **({"ls": (0, (3, 2))} if rank % 2 else {})})
    return out


def _label_styles(labels) -> dict[str, dict]:
    """Styles for run labels ``"method [qualifiers]"`` across runs: the method (first word) picks
    colour and marker, a second run of one method another marker, and a shadow (the method on
    another's values) a thin dotted line with hollow markers."""
    names = method_names()
    runs_of: dict[str, int] = {}
    out: dict[str, dict] = {}
    for label in labels:
        method = label.split()[0]
        style = {**_style(method), "color": f"C{names.index(method) % 10 if method in names else 9}"}
        nth = runs_of[method] = runs_of.get(method, -1) + 1
        if nth:
            style["marker"] = _MARKERS[(_MARKERS.index(style["marker"]) + 3 * nth) % len(_MARKERS)]
        if "shadow" in label:
            style.update(ls=":", lw=1.2, alpha=1.0, mfc="none")
        out[label] = style
    return out


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:  # an optional dependency: the figures only
        raise ImportError("the benchmark's figures need matplotlib, part of the bench extra: "
                          "pip install 'rlsedit[bench]' (or pip install matplotlib)") from exc

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _pct(x: float | None) -> float:
    return math.nan if x is None else 100 * x


def _rolling(values, window: int):
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1): i + 1] if v is not None]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out


def _methods(results: Results) -> list[tuple[str, MethodRecord]]:
    return [(name, rec) for name, rec in results.methods.items() if rec.immediate]


def _title(results: Results, what: str) -> str:
    c = results.config
    if c is None:
        return f"{what}: ? on ?, batches of ?"
    return f"{what}: {c.dataset} on {c.model}, batches of {c.batch_size}"


def _save_panels(plt, fig, axes, path: str | Path, ylabel: str, title: str) -> Path:
    """Label the score panels (one per metric, 0-100), add the legend and title, write the PNG."""
    for ax, key in zip(axes, _PANELS, strict=True):
        ax.set_title(METRIC_LABELS[key], fontsize=10)
        ax.set_xlabel("edits written")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    axes[-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_scores(results: Results, path: str | Path, *, window: int = 5) -> Path:
    """Immediate scores of each batch (rolling mean over ``window`` batches) against edits."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(_PANELS), figsize=(4.2 * len(_PANELS), 3.6), sharex=True)
    for name, rec in _methods(results):
        xs = [e.edits for e in rec.immediate]
        for ax, key in zip(axes, _PANELS, strict=False):
            ys = _rolling([e.scores.get(key) for e in rec.immediate], window)
            ax.plot(xs, [100 * y for y in ys], label=name, **{**_style(name), "marker": None})
    return _save_panels(plt, fig, axes, path, f"immediate score x100 (rolling mean, {window} batches)",
                        _title(results, "Immediate scores"))


def plot_retention(results: Results, path: str | Path) -> Path:
    """Scores of the first edits of the stream (the retention set) at every checkpoint.

    The method keys may be run labels (``"memit (shadow)"``, see :func:`_label_styles`), as when
    ``benchmarks/combine_bench.py`` puts several runs of one stream in one figure."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(_PANELS), figsize=(4.2 * len(_PANELS), 3.6), sharex=True)
    base = results.base.retention if results.base is not None else None
    methods = _methods(results)
    styles = _label_styles([name for name, _ in methods])
    for name, rec in methods:
        pts = rec.checkpoints
        xs = [p.edits for p in pts]
        for ax, key in zip(axes, _PANELS, strict=False):
            ys = [p.retention.get(key) for p in pts]
            ax.plot(xs, [100 * y if y is not None else math.nan for y in ys], label=name, **styles[name])
    for ax, key in zip(axes, _PANELS, strict=True):
        before = base.get(key) if base is not None else None
        if before is not None:
            ax.axhline(100 * before, color="grey", ls=":", lw=1, label="before editing")
    n = results.config.retention_size if results.config is not None else "?"
    return _save_panels(plt, fig, axes, path, f"score x100 of the first {n} edits",
                        _title(results, "Retention of early edits"))


def plot_deviation(results: Results, path: str | Path) -> Path:
    """Per edited layer: ``||W_t - W0||_F`` (top) and the anchor drift ``||K0 (W_t - W0)||_F``
    (bottom) against edits, with the T3(a) / T3(b) bounds (dashed) where they are defined."""
    plt = _pyplot()
    layers: list[Any] = sorted({layer for _, rec in _methods(results) for p in rec.checkpoints
                                for layer in p.deviation})
    if not layers:
        layers = ["?"]
    fig, axes = plt.subplots(2, len(layers), figsize=(3.4 * len(layers), 6.2), squeeze=False)
    colours: dict[str, Any] = {}
    for name, rec in _methods(results):
        pts = rec.checkpoints
        for j, layer in enumerate(layers):
            xs = [p.edits for p in pts if layer in p.deviation]
            rows = [p.deviation[layer] for p in pts if layer in p.deviation]
            for i, (lhs, rhs) in enumerate((("fro", "t3a"), ("anchor", "t3b"))):
                ax = axes[i][j]
                ys = [getattr(r, lhs) for r in rows]
                if not any(y is not None for y in ys):
                    continue
                (line,) = ax.plot(xs, [y if y is not None else math.nan for y in ys], label=name,
                                  color=colours.get(name), **_style(name, line=False))
                colours[name] = line.get_color()
                bs = [getattr(r, rhs) for r in rows]
                if any(b is not None and math.isfinite(b) for b in bs):
                    ax.plot(xs, [b if b is not None else math.nan for b in bs], ls="--", lw=1,
                            color=colours[name], label=f"{name}: bound {rhs.upper()}")
    for j, layer in enumerate(layers):
        axes[0][j].set_title(f"layer {layer}", fontsize=10)
        for i in range(2):
            axes[i][j].set_yscale("log")
            axes[i][j].grid(alpha=0.3, which="both")
            axes[1][j].set_xlabel("edits written")
    axes[0][0].set_ylabel("||W_t - W0||_F")
    axes[1][0].set_ylabel("||K0 (W_t - W0)||_F")
    handles, labels = axes[0][0].get_legend_handles_labels()
    h2, l2 = axes[1][0].get_legend_handles_labels()
    for h, l in zip(h2, l2, strict=False):
        if l not in labels:
            handles.append(h)
            labels.append(l)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8)
    fig.suptitle(_title(results, "Weight deviation vs theory bounds"), fontsize=11)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_norms(results: Results, path: str | Path) -> Path:
    """The value-norm instruments along the stream: the written value's norm over the model's norm
    there before the edit (per batch), the written module outputs' norm over the unedited
    module's output at the same keys (per batch, mean over layers), and the condition number of
    each method's information matrix (per checkpoint, worst layer)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    drawn = False
    for name, rec in _methods(results):
        imm = rec.immediate
        xs = [e.edits for e in imm]
        z = [e.norms.get("value_norm_ratio") for e in imm]
        if any(v is not None for v in z):
            axes[0].plot(xs, [v if v is not None else math.nan for v in z], label=name, **_style(name))
            drawn = True
        layer_keys = sorted({k for e in imm for k in e.norms if k.startswith("layer_value_ratio.")})
        if layer_keys:
            ys = [float(sum(e.norms[k] or 0.0 for k in layer_keys if e.norms.get(k) is not None) / len(layer_keys))
                  for e in imm]
            axes[1].plot(xs, ys, label=name, **_style(name))
        pts = [p for p in rec.checkpoints if any(r.cond is not None for r in p.deviation.values())]
        if pts:
            axes[2].plot([p.edits for p in pts],
                         [max(r.cond or 0.0 for r in p.deviation.values()) for p in pts],
                         label=name, **_style(name))
    axes[0].set_ylabel("||z*|| / ||h|| before the edit")
    axes[1].set_ylabel("||V|| / ||K W0|| (mean over layers)")
    axes[2].set_ylabel("cond(G_t), worst layer")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("edits written")
        ax.grid(alpha=0.3)
    if drawn:
        axes[0].legend(fontsize=8)
    fig.suptitle(_title(results, "Value norms and conditioning"), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_lengths(points: dict[str, list[tuple[int, Scores, Scores | None]]], path: str | Path, *,
                 title: str = "", base: dict[int, Scores] | None = None) -> Path:
    """Scores against stream length across runs (``benchmarks/combine_bench.py``).

    ``points[label]`` lists ``(edits, every edit's scores, first edits' scores or None)``; the
    label picks the line style (:func:`_label_styles`). ``base[edits]``: the unedited model's
    scores of the same edits, drawn as a grey dotted line."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 3.8), sharex=True)
    styles = _label_styles(points)
    for label, pts in points.items():
        pts = sorted(pts, key=lambda p: p[0])
        style = styles[label]
        axes[0].plot([p[0] for p in pts], [_pct(p[1].score) for p in pts], label=label, **style)
        kept = [p for p in pts if p[2] is not None]
        axes[1].plot([p[0] for p in kept], [_pct(p[2].efficacy) for p in kept if p[2] is not None], label=label,
                     **style)
    if base:
        xs = sorted(base)
        axes[0].plot(xs, [_pct(base[x].score) for x in xs], color="grey", ls=":", lw=1, label="unedited")
    axes[0].set_title("score of every edit so far (harmonic mean)", fontsize=10)
    axes[1].set_title("efficacy of the stream's first edits", fontsize=10)
    for ax in axes:
        ax.set_xlabel("edits written")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("x100")
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="center left", bbox_to_anchor=(0.8, 0.5))
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.8, 1))  # the legend sits right of the panels
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
