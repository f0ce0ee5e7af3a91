"""The benchmark's report: tables (Markdown, CSV) and figures from the :class:`.results.Results` of a run."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from rlsedit_llm.evaluation import plots
from rlsedit_llm.evaluation.protocol import SHADOW_LEADER as LEADER
from rlsedit_llm.evaluation.protocol import base_summary, immediate_summary
from rlsedit_llm.evaluation.results import MethodRecord, Results, Scores
from rlsedit_llm.files import atomic_write_text

__all__ = ["write_report"]


def _pct(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}"


def _num(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _method_row(name: str, rec: MethodRecord) -> dict[str, Any]:
    final = rec.final
    fa = final.all if final is not None else Scores()
    fr = final.retention if final is not None else None
    imm = immediate_summary(rec)
    last_ret = rec.checkpoints[-1].retention if rec.checkpoints else Scores()
    n_b = rec.batches_done
    row: dict[str, Any] = {
        "method": name, "edits": rec.edits_done, "done": rec.done,
        "sec_per_batch_edit": round(rec.seconds_edit / n_b, 2) if n_b else None,
        "sec_per_batch_update": round(sum(e.seconds_update or 0 for e in rec.immediate) / n_b, 4) if n_b else None,
        "seconds_edit": rec.seconds_edit, "seconds_eval": rec.seconds_eval, "seconds_wall": rec.seconds_wall}
    for k in ("efficacy", "generalization", "specificity", "score", "efficacy_magnitude",
              "generalization_magnitude", "specificity_magnitude", "efficacy_acc", "generalization_acc",
              "specificity_acc", "wild"):
        row[f"final_{k}"] = fa.get(k)
    for k in ("efficacy", "generalization", "specificity", "score", "wild"):
        row[f"immediate_{k}"] = imm.get(k)
        row[f"retention_{k}"] = (fr if fr is not None else last_ret).get(k)
    ratios = [e.residual_ratio for e in rec.immediate if e.residual_ratio is not None]
    row["residual_ratio"] = round(sum(ratios) / len(ratios), 4) if ratios else None
    row["fluency"] = final.fluency if final is not None else None
    row["generation_nll"] = final.generation_nll if final is not None else None
    row["glue_mean"] = final.glue.mean if final is not None and final.glue is not None else None
    return row


def _generation_samples(results: Results, n: int = 2, width: int = 200) -> list[str]:
    """Markdown: the first ``n`` fluency generations of the unedited model and of each method,
    cut to ``width`` characters, to read beside the fluency and generation-NLL columns."""
    parts = [("unedited", results.base)] + [(name, rec.final) for name, rec in results.methods.items()]
    kept = [(name, part.generations[:n]) for name, part in parts if part is not None and part.generations]
    if not kept:
        return []
    lines = ["", f"The first {n} fluency generations (prompt, then the continuation; cut to {width} "
                 "characters):", ""]
    for name, gens in kept:
        for g in gens:
            text = g.text if g.text.strip() else "(nothing: it stops at once)"
            text = " ".join((g.prompt + " → " + text).split())  # one line: newlines become spaces
            text = text if len(text) <= width else text[:width] + " …"
            lines.append(f"- **{name}**: {text.replace('|', '/')}")
    return lines


def _full_checkpoint_tables(results: Results) -> list[str]:
    """Markdown: every edit so far re-scored at the full checkpoints (``--score-all-at``)."""
    points = [(name, p) for name, rec in results.methods.items() for p in rec.checkpoints if p.all is not None]
    if not points:
        return []
    lines = ["", "Every edit so far, re-scored mid-stream (x100):", "",
             "| method | after edits | ES | PS | NS | score | wild |", "|---|---|---|---|---|---|---|"]
    for name, p in sorted(points, key=lambda x: (x[1].edits, x[0])):
        a = p.all
        assert a is not None
        lines.append(f"| {name} | {p.edits} | {_pct(a.efficacy)} | {_pct(a.generalization)} | "
                     f"{_pct(a.specificity)} | {_pct(a.score)} | {_pct(a.wild)} |")
    return lines


def _shadow_gap_table(results: Results) -> list[str]:
    """Markdown: how far each shadow's weights are from its leader's, at every checkpoint."""
    lines = []
    for name, rec in results.methods.items():
        pts = [p for p in rec.checkpoints if p.leader_gap]
        if not pts:
            continue
        lines += ["", f"Weight gap of {name} to {LEADER} on the same keys and values, "
                      "max over layers of ||W - W_leader||_F / ||W_leader - W0||_F and of the largest entry gap:", "",
                  "| after edits | relative gap | max entry gap |", "|---|---|---|"]
        for p in pts:
            gaps = (p.leader_gap or {}).values()
            rel = [g.rel for g in gaps if g.rel is not None]
            mx = [g.max_abs for g in gaps if g.max_abs is not None]
            lines.append(f"| {p.edits} | {max(rel):.2e} | {max(mx):.2e} |" if rel and mx else f"| {p.edits} | — | — |")
    return lines


_CURVE_KEYS = ("efficacy", "generalization", "specificity", "score", "wild")
_DEVIATION_KEYS = ("fro", "anchor", "t3a", "t3b")


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


def write_report(results: Results, out: str | Path, *, figures: bool = True) -> None:
    """Write ``summary.csv``, ``curves.csv``, ``deviation.csv``, ``results.md`` and (``figures``)
    the PNG figures of ``results`` into ``out`` (partial results are reported as such)."""
    out = Path(out)
    methods = results.methods
    rows = [_method_row(n, r) for n, r in methods.items()]
    if rows:
        _write_csv(out / "summary.csv", list(rows[0]), [list(r.values()) for r in rows])
    curves: list[list[Any]] = [[name, "immediate", e.batch, e.edits, *(e.scores.get(k) for k in _CURVE_KEYS)]
              for name, rec in methods.items() for e in rec.immediate]
    curves += [[name, "retention", p.batch, p.edits, *(p.retention.get(k) for k in _CURVE_KEYS)]
               for name, rec in methods.items() for p in rec.checkpoints]
    curves.sort(key=lambda row: list(methods).index(row[0]))  # grouped by method, as the methods ran
    _write_csv(out / "curves.csv", ["method", "kind", "batch", "edits", *_CURVE_KEYS], curves)
    deviation = [[name, p.edits, layer, *(getattr(d, k) for k in _DEVIATION_KEYS)]
                 for name, rec in methods.items() for p in rec.checkpoints for layer, d in p.deviation.items()]
    _write_csv(out / "deviation.csv", ["method", "edits", "layer", *_DEVIATION_KEYS], deviation)
    if figures and any(r.immediate for r in methods.values()):
        plots.plot_scores(results, out / "scores.png")
        plots.plot_retention(results, out / "retention.png")
        plots.plot_deviation(results, out / "deviation.png")
        plots.plot_norms(results, out / "norms.png")
    atomic_write_text(out / "results.md", _markdown(results, rows))


def _base_row(results: Results) -> list[str]:
    """Markdown: the unedited model's row, over as many cases as the methods' final scoring."""
    base = results.base
    if base is None:
        return []
    n_final = max([rec.final.edits or rec.edits_done for rec in results.methods.values() if rec.final] or [0])
    ba = base_summary(base, n_final) if base.cases and n_final else base.all
    br, bfl = base.retention, base.fluency
    return [f"| unedited ({ba.n} cases) | 0 | {_pct(ba.efficacy)} | {_pct(ba.generalization)} | "
            f"{_pct(ba.specificity)} | {_pct(ba.score)} | {_pct(ba.wild)} | "
            f"{_num(None if bfl is None else 100 * bfl)} | {_num(base.generation_nll, 2)} | "
            f"{_pct(base.glue.mean if base.glue is not None else None)} | "
            f"— | — | — | — | {_pct(br.efficacy)} | {_pct(br.generalization)} | "
            f"{_pct(br.specificity)} | {_pct(br.score)} | — |"]


def _main_table(results: Results, rows: list[dict]) -> list[str]:
    """Markdown: final, immediate and retention scores, fluency and GLUE per method."""
    n_edits = results.config.n_edits if results.config is not None else None
    head = ("| method | edits | final ES | final PS | final NS | final score | wild | fluency | gen. NLL | GLUE | "
            "imm. ES | imm. PS | imm. NS | imm. score | ret. ES | ret. PS | ret. NS | ret. score | s/batch |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)] + _base_row(results)
    for r in rows:
        edits = f"{r['edits']}" + ("" if r["done"] else f" of {n_edits} (running/stopped)")
        if r["method"] in results.settings.shadow:
            edits += f" (shadow of {LEADER}: its keys and values)"
        fl = r["fluency"]
        lines.append(
            f"| {r['method']} | {edits} | {_pct(r['final_efficacy'])} | {_pct(r['final_generalization'])} | "
            f"{_pct(r['final_specificity'])} | {_pct(r['final_score'])} | {_pct(r['final_wild'])} | "
            f"{_num(None if fl is None else 100 * fl)} | {_num(r['generation_nll'], 2)} | {_pct(r['glue_mean'])} | "
            f"{_pct(r['immediate_efficacy'])} | {_pct(r['immediate_generalization'])} | "
            f"{_pct(r['immediate_specificity'])} | {_pct(r['immediate_score'])} | "
            f"{_pct(r['retention_efficacy'])} | {_pct(r['retention_generalization'])} | "
            f"{_pct(r['retention_specificity'])} | {_pct(r['retention_score'])} | {_num(r['sec_per_batch_edit'])} |")
    return lines + [""]


def _magnitude_and_time_tables(dataset: str, rows: list[dict]) -> list[str]:
    """Markdown: CounterFact's magnitudes and accuracies, and the wall time per method."""
    lines = []
    if dataset in ("counterfact", "counterfact_simple") and rows:
        lines += ["Magnitudes (mean probability differences, x100) and all-tokens-argmax accuracies, final:", "",
                  "| method | ES mag. | PS mag. | NS mag. | ES acc | PS acc | NS acc |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['method']} | {_pct(r['final_efficacy_magnitude'])} | "
                         f"{_pct(r['final_generalization_magnitude'])} | {_pct(r['final_specificity_magnitude'])} | "
                         f"{_pct(r['final_efficacy_acc'])} | {_pct(r['final_generalization_acc'])} | "
                         f"{_pct(r['final_specificity_acc'])} |")
        lines.append("")
    lines += ["Wall time per method (seconds): editing (values, keys and the solver update), of which "
              "the solver update per batch, evaluation, total (including checkpoint saves); and the mean "
              "share of the value residual ||z* - h|| left after each write (Editor methods).", "",
              "| method | edit | update / batch | eval | total | residual left |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {_num(r['seconds_edit'], 0)} | {_num(r['sec_per_batch_update'], 3)} | "
                     f"{_num(r['seconds_eval'], 0)} | {_num(r['seconds_wall'], 0)} | {_num(r['residual_ratio'], 3)} |")
    return lines


def _protocol_line(results: Results) -> str:
    """Markdown: which stream and which scoring protocol the run used (runs recorded before these
    choices existed: stream 0, ``greedy-eos`` fluency, zsRE toward ``alt``)."""
    cfg = results.settings.stream
    fluency = {"rome": "rome (top-5 sampling to a fixed length of prompt plus generation, no early stop, "
                       "Treebank-style words; the literature's)",
               "greedy-eos": "greedy-eos (greedy decoding stopped at end-of-sequence, regex words)"}
    line = (f"Protocol: stream {cfg.stream_seed}" + (" (the data set's file order)" if cfg.stream_seed == 0 else "")
            + f"; fluency {fluency.get(cfg.fluency_protocol, cfg.fluency_protocol)}, {cfg.fluency_tokens} tokens")
    if cfg.dataset == "zsre":
        line += "; zsRE target " + ("alt (EasyEdit's)" if cfg.zsre_target == "alt" else "answers[0] (MEMIT's)")
    return line + "."


def _markdown(results: Results, rows: list[dict]) -> str:
    c = results.config
    ds = c.dataset if c is not None else "?"
    n_edits, batch, model, kept = (c.n_edits, c.batch_size, c.model, c.retention_size) if c is not None else (None,) * 4
    lines = [f"# Sequential editing benchmark: {ds}, {n_edits} edits in batches of {batch} on {model}", ""]
    lines += [_protocol_line(results), ""]
    lines += ["Scores x100. *Final*: every edit of the stream re-scored after the last batch. "
              "*Immediate*: each batch scored right after it was written. *Retention*: the first "
              f"{kept} edits, re-scored at the end. Wild = greedy decoding "
              "produces the target (no teacher forcing). Fluency: weighted 2/3-gram entropy x100. Gen. NLL: "
              "the unedited model's mean negative log-likelihood (nats per token) of the fluency "
              "generations; entropy cannot tell incoherent text from varied prose, this can "
              "(a high entropy with a high NLL is noise, see the generations below).", ""]
    lines += _main_table(results, rows)
    lines += _magnitude_and_time_tables(ds, rows)
    lines += _full_checkpoint_tables(results)
    lines += _generation_samples(results)
    lines += _shadow_gap_table(results)
    if results.sessions:
        m = results.sessions[-1].machine
        lines += ["", f"Machine: {m.get('processor')}, {m.get('cpu_count')} CPUs, torch threads "
                      f"{m.get('torch_threads')}, GPU {m.get('cuda') or 'none'}; torch {m.get('torch')}, "
                      f"transformers {m.get('transformers')}."]
    lines += ["", "![immediate scores](scores.png)", "", "![retention](retention.png)", "",
              "![deviation](deviation.png)", "", "![value norms and conditioning](norms.png)", ""]
    return "\n".join(lines)
