"""The benchmark's report: tables (Markdown, CSV) and figures from the results dict of :mod:`.bench`."""

from __future__ import annotations

import csv
from pathlib import Path

from rlsedit_llm.evaluation import plots
from rlsedit_llm.evaluation.protocol import SHADOW_LEADER as LEADER
from rlsedit_llm.evaluation.protocol import base_summary, immediate_summary
from rlsedit_llm.files import atomic_write_text

__all__ = ["write_report"]


def _pct(x, digits: int = 1) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}"


def _num(x, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _method_row(name: str, rec: dict) -> dict:
    final = rec.get("final") or {}
    fa, fr = final.get("all") or {}, final.get("retention") or {}
    imm = immediate_summary(rec)
    last_ret = (rec.get("checkpoints") or [{}])[-1].get("retention", {}) if rec.get("checkpoints") else {}
    n_b = rec.get("batches_done", 0)
    row = {"method": name, "edits": rec.get("edits_done", 0), "done": rec.get("done", False),
           "sec_per_batch_edit": round(rec["seconds_edit"] / n_b, 2) if n_b else None,
           "sec_per_batch_update": (round(sum(e.get("seconds_update") or 0 for e in rec["immediate"]) / n_b, 4)
                                    if n_b else None),
           "seconds_edit": rec.get("seconds_edit"), "seconds_eval": rec.get("seconds_eval"),
           "seconds_wall": rec.get("seconds_wall")}
    for k in ("efficacy", "generalization", "specificity", "score", "efficacy_magnitude",
              "generalization_magnitude", "specificity_magnitude", "efficacy_acc", "generalization_acc",
              "specificity_acc", "wild"):
        row[f"final_{k}"] = fa.get(k)
    for k in ("efficacy", "generalization", "specificity", "score", "wild"):
        row[f"immediate_{k}"] = imm.get(k)
        row[f"retention_{k}"] = (fr or last_ret).get(k)
    ratios = [e["residual_ratio"] for e in rec.get("immediate", []) if e.get("residual_ratio") is not None]
    row["residual_ratio"] = round(sum(ratios) / len(ratios), 4) if ratios else None
    row["fluency"] = final.get("fluency")
    row["generation_nll"] = final.get("generation_nll")
    row["glue_mean"] = (final.get("glue") or {}).get("mean")
    return row


def _generation_samples(results: dict, n: int = 2, width: int = 200) -> list[str]:
    """Markdown: the first ``n`` fluency generations of the unedited model and of each method,
    cut to ``width`` characters, to read beside the fluency and generation-NLL columns."""
    parts = [("unedited", results.get("base") or {})]
    parts += [(name, rec.get("final") or {}) for name, rec in results.get("methods", {}).items()]
    parts = [(name, part["generations"][:n]) for name, part in parts if part.get("generations")]
    if not parts:
        return []
    lines = ["", f"The first {n} fluency generations (prompt, then the greedy continuation; cut to {width} "
                 "characters):", ""]
    for name, gens in parts:
        for g in gens:
            text = g["text"] if g["text"].strip() else "(nothing: it stops at once)"
            text = " ".join((g["prompt"] + " → " + text).split())  # one line: newlines become spaces
            text = text if len(text) <= width else text[:width] + " …"
            lines.append(f"- **{name}**: {text.replace('|', '/')}")
    return lines


def _full_checkpoint_tables(results: dict) -> list[str]:
    """Markdown: every edit so far re-scored at the full checkpoints (``--score-all-at``)."""
    points = [(name, p) for name, rec in results.get("methods", {}).items()
              for p in rec.get("checkpoints", []) if p.get("all")]
    if not points:
        return []
    lines = ["", "Every edit so far, re-scored mid-stream (x100):", "",
             "| method | after edits | ES | PS | NS | score | wild |", "|---|---|---|---|---|---|---|"]
    for name, p in sorted(points, key=lambda x: (x[1]["edits"], x[0])):
        a = p["all"]
        lines.append(f"| {name} | {p['edits']} | {_pct(a.get('efficacy'))} | {_pct(a.get('generalization'))} | "
                     f"{_pct(a.get('specificity'))} | {_pct(a.get('score'))} | {_pct(a.get('wild'))} |")
    return lines


def _shadow_gap_table(results: dict) -> list[str]:
    """Markdown: how far each shadow's weights are from its leader's, at every checkpoint."""
    lines = []
    for name, rec in results.get("methods", {}).items():
        pts = [p for p in rec.get("checkpoints", []) if p.get("leader_gap")]
        if not pts:
            continue
        lines += ["", f"Weight gap of {name} to {LEADER} on the same keys and values, "
                      "max over layers of ||W - W_leader||_F / ||W_leader - W0||_F and of the largest entry gap:", "",
                  "| after edits | relative gap | max entry gap |", "|---|---|---|"]
        for p in pts:
            rel = [g["rel"] for g in p["leader_gap"].values() if g.get("rel") is not None]
            mx = [g["max_abs"] for g in p["leader_gap"].values() if g.get("max_abs") is not None]
            lines.append(f"| {p['edits']} | {max(rel):.2e} | {max(mx):.2e} |" if rel and mx else f"| {p['edits']} | — | — |")
    return lines


def write_report(results: dict, out) -> None:
    """Write ``summary.csv``, ``curves.csv``, ``deviation.csv``, ``results.md`` and the PNG
    figures of ``results`` into ``out`` (partial results are reported as such)."""
    out = Path(out)
    methods = results.get("methods", {})
    rows = [_method_row(n, r) for n, r in methods.items()]
    base = results.get("base") or {}
    if rows:
        with open(out / "summary.csv", "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    keys = ("efficacy", "generalization", "specificity", "score", "wild")
    with open(out / "curves.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "kind", "batch", "edits", *keys])
        for name, rec in methods.items():
            for e in rec.get("immediate", []):
                w.writerow([name, "immediate", e["batch"], e["edits"], *(e.get(k) for k in keys)])
            for p in rec.get("checkpoints", []):
                w.writerow([name, "retention", p["batch"], p["edits"], *(p["retention"].get(k) for k in keys)])
    with open(out / "deviation.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["method", "edits", "layer", "fro", "anchor", "t3a", "t3b"])
        for name, rec in methods.items():
            for p in rec.get("checkpoints", []):
                for layer, d in p["deviation"].items():
                    w.writerow([name, p["edits"], layer, *(d.get(k) for k in ("fro", "anchor", "t3a", "t3b"))])
    if any(r.get("immediate") for r in methods.values()):
        plots.plot_scores(results, out / "scores.png")
        plots.plot_retention(results, out / "retention.png")
        plots.plot_deviation(results, out / "deviation.png")
        plots.plot_norms(results, out / "norms.png")
    atomic_write_text(out / "results.md", _markdown(results, rows, base))


def _markdown(results: dict, rows: list[dict], base: dict) -> str:
    c = results.get("config", {})
    ds = c.get("dataset", "?")
    lines = [f"# Sequential editing benchmark: {ds}, {c.get('n_edits')} edits in batches of "
             f"{c.get('batch_size')} on {c.get('model')}", ""]
    lines += ["Scores x100. *Final*: every edit of the stream re-scored after the last batch. "
              "*Immediate*: each batch scored right after it was written. *Retention*: the first "
              f"{c.get('retention_size')} edits, re-scored at the end. Wild = greedy decoding "
              "produces the target (no teacher forcing). Fluency: weighted 2/3-gram entropy x100. Gen. NLL: "
              "the unedited model's mean negative log-likelihood (nats per token) of the fluency "
              "generations; entropy cannot tell incoherent text from varied prose, this can "
              "(a high entropy with a high NLL is noise, see the generations below).", ""]
    head = ("| method | edits | final ES | final PS | final NS | final score | wild | fluency | gen. NLL | GLUE | "
            "imm. ES | imm. PS | imm. NS | imm. score | ret. ES | ret. PS | ret. NS | ret. score | s/batch |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    n_final = max([(r.get("final") or {}).get("edits") or r.get("edits_done", 0)
                   for r in results.get("methods", {}).values() if r.get("final")] or [0])
    ba = base_summary(base, n_final) if base.get("cases") and n_final else (base.get("all") or {})
    bfl, br = base.get("fluency"), base.get("retention") or {}
    if ba:
        lines.append(f"| unedited ({ba.get('n')} cases) | 0 | {_pct(ba.get('efficacy'))} | {_pct(ba.get('generalization'))} | "
                     f"{_pct(ba.get('specificity'))} | {_pct(ba.get('score'))} | {_pct(ba.get('wild'))} | "
                     f"{_num(None if bfl is None else 100 * bfl)} | {_num(base.get('generation_nll'), 2)} | "
                     f"{_pct((base.get('glue') or {}).get('mean'))} | "
                     f"— | — | — | — | {_pct(br.get('efficacy'))} | {_pct(br.get('generalization'))} | "
                     f"{_pct(br.get('specificity'))} | {_pct(br.get('score'))} | — |")
    shadows = (results.get("settings") or {}).get("shadow") or []
    for r in rows:
        edits = f"{r['edits']}" + ("" if r["done"] else f" of {c.get('n_edits')} (running/stopped)")
        if r["method"] in shadows:
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
    lines.append("")
    if ds in ("counterfact", "counterfact_simple") and rows:
        lines += ["Magnitudes (mean probability differences, x100) and all-tokens-argmax accuracies, final:", "",
                  "| method | ES mag. | PS mag. | NS mag. | ES acc | PS acc | NS acc |", "|---|---|---|---|---|---|---|"]
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
    lines += _full_checkpoint_tables(results)
    lines += _generation_samples(results)
    lines += _shadow_gap_table(results)
    sessions = results.get("sessions") or []
    if sessions:
        m = sessions[-1]["machine"]
        lines += ["", f"Machine: {m.get('processor')}, {m.get('cpu_count')} CPUs, torch threads "
                      f"{m.get('torch_threads')}, GPU {m.get('cuda') or 'none'}; torch {m.get('torch')}, "
                      f"transformers {m.get('transformers')}."]
    lines += ["", "![immediate scores](scores.png)", "", "![retention](retention.png)", "",
              "![deviation](deviation.png)", "", "![value norms and conditioning](norms.png)", ""]
    return "\n".join(lines)
