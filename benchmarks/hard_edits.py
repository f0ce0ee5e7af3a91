"""Why do some edits stay weak? A diagnosis of facts that do not take on SmolLM2-135M, and what a
per-fact weight buys and costs.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/hard_edits.py [--weights 5,20] [--threads 2]

One batch of facts, a few hard ones (company founders and chiefs SmolLM2 hardly knows, with
multi-token person names, among them the user report "Microsoft was founded by" -> "Steve Jobs")
and two easy ones (a location and a language), is written with :class:`~rlsedit_llm.EditConfig`
defaults by a fresh editor on the unedited model (key statistics from the user cache,
``~/.cache/rlsedit``, computed on first use). Per fact it prints:

- ``P before -> after`` of the target after the prompt, and ``took``: the edit's success (every
  target token the teacher-forced argmax, :attr:`~rlsedit_llm.FactReport.success`);
- ``z* NLL``: the value optimisation's target NLL at ``z*`` (how far the *value* gets; the write
  cannot do better than ``z*``);
- ``res. share``: ``||z* - h||`` after the write over before (what the *write* left);
- ``k^T C k``: the absorption of the fact's key at each edited layer, with ``C = C_0`` the
  solver's inverse information matrix before the edit (``(alpha I + beta N E[kk^T])^{-1}``): a
  single key's innovation is fitted up to the factor ``1 / (1 + k^T C k)`` (RLSEdit's adherence;
  with weight ``w``, ``1 / (1 + w k^T C k)``), next to ``tr(C_0 E[kk^T])``, the absorption of an
  average corpus key (``~ d_k / N``).

Per fact also, on the unedited model: whether the subject ends at the prompt's first token
(``pos 0``: SmolLM2 adds no BOS), and the bare prompt's own key (the ``"{}"`` template alone)
against the context-averaged key the write is made for: its absorption ``k_b^T C k_b`` and its
cosine with the averaged key (means over the edited layers).

Then the same batch again from the unedited model with weight 5 and 20 (``--weights``) on the
facts that did not take at weight 1, and what the weight costs: ``||W - W0||_F`` over the edited
layers, and the probability of the true answer of a few neighbourhood prompts (other companies'
founders, the edited subject's other facts) before and after, with the new target's probability
after the edited fact in other contexts (words before the subject). Last, the batch with the
facts that did not take rephrased so that words come before the subject (:data:`REPHRASE`), at
weight 1. The model is restored after each run; nothing is written to disk besides the
statistics cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
import time
from pathlib import Path

import torch

import rlsedit_llm
from rlsedit_llm import EditConfig, Editor, as_facts
from rlsedit_llm.pipeline.keys import compute_keys_multi, fact_rows
from rlsedit_llm.pipeline.scoring import score_targets
from rlsedit_llm.pipeline.tokens import needs_bos

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common beside this script
from _common import machine_description

#: Hard facts: the user report first, then two more of the kind SmolLM2 hardly knows.
HARD = [
    {"prompt": "{} was founded by", "subject": "Microsoft", "target": "Steve Jobs"},
    {"prompt": "{} was founded by", "subject": "Nintendo", "target": "Elon Musk"},
    {"prompt": "The chief executive of {} is", "subject": "Toyota", "target": "Tim Cook"},
]
#: Easy facts: locations and languages SmolLM2 knows, rewritten.
EASY = [
    {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target": "Rome"},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target": "English"},
]
#: Neighbourhood prompts and their true answers: other subjects of the hard facts' relations, the
#: edited subjects' other facts, and the new target's own fact.
PROBES = [
    ("Apple was founded by", "Steve Jobs"),
    ("Amazon was founded by", "Jeff Bezos"),
    ("Google was founded by", "Larry Page"),
    ("Microsoft is headquartered in", "Redmond"),
    ("Microsoft's best-known product is", "Windows"),
    ("The Louvre is located in the city of", "Paris"),
]


#: The edited fact in other contexts: the new target after the subject with words before it.
CONTEXTS = [
    ("The company Microsoft was founded by", "Steve Jobs"),
    ("In 1975, Microsoft was founded by", "Steve Jobs"),
]
#: Rephrasings with words before the subject, for the facts that did not take.
REPHRASE = {"{} was founded by": "The company {} was founded by"}


def _p(x: float) -> str:
    return f"{x:.4f}" if not 0 < x < 1e-3 else f"{x:.1e}"


def _restore(model, base: dict) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(base[name])


def probe_probs(model, tok) -> list[float]:
    """P(answer | prompt) of every neighbourhood probe, then of every other context (CONTEXTS)."""
    pairs = PROBES + CONTEXTS
    return [s.prob for s in score_targets(model, tok, [p for p, _ in pairs], [a for _, a in pairs])]


def bare_keys(model, tok, editor: Editor, facts, C0: dict) -> list[dict]:
    """Per fact on the unedited model: subject at position 0, and the bare prompt's key against
    the context-averaged key (absorption under ``C_0`` and cosine, means over the edited layers)."""
    _, positions = fact_rows(tok, facts, ["{}"], bos=needs_bos(editor.spec_))
    assert editor.templates_ is not None
    bare = compute_keys_multi(model, tok, editor.spec_, editor.layers_, facts, ["{}"])
    avg = compute_keys_multi(model, tok, editor.spec_, editor.layers_, facts, editor.templates_)
    out = []
    for j, pos in enumerate(positions):
        a, c = [], []
        for l in editor.layers_:
            kb, ka = bare[l][j].to(C0[l]), avg[l][j].to(C0[l])
            a.append(float(kb @ C0[l] @ kb))
            c.append(float(kb @ ka / (kb.norm() * ka.norm())))
        out.append({"pos0": pos == 0, "absorption": sum(a) / len(a), "cos": sum(c) / len(c)})
    return out


def run(model, tok, base: dict, facts, C0: dict, config: EditConfig) -> dict:
    """One edit of ``facts`` by a fresh editor on the unedited weights: the report, per fact and
    layer the absorption ``k^T C_0 k`` of its (unweighted) key, ``||W - W0||_F`` and the probes."""
    _restore(model, base)
    editor = Editor(model, tok, config, take_over=True)
    tic = time.perf_counter()
    report = editor.edit(facts)
    seconds = time.perf_counter() - tic
    record = editor.journal_[-1]
    absorption = {}
    for layer in editor.layers_:
        C = C0[layer]
        K = record.keys[layer].to(C) / torch.tensor([f.weight for f in record.facts], dtype=C.dtype).sqrt()[:, None]
        absorption[layer] = ((K @ C) * K).sum(dim=1).tolist()  # k^T C_0 k per fact, unweighted key
    drift = math.sqrt(sum(float(torch.linalg.norm(s.W_ - s.W0_)) ** 2 for s in editor.solvers_.values()))
    probes = probe_probs(model, tok)
    editor.release()
    _restore(model, base)
    return {"report": report, "absorption": absorption, "drift": drift, "probes": probes, "seconds": seconds,
            "layers": editor.layers_}


def print_run(title: str, result: dict, typical: dict, probes_before: list[float], reference: dict | None,
              bare: dict | None = None) -> None:
    """The tables of one run (``bare``: :func:`bare_keys` of its facts, by fact)."""
    report, absorption, layers = result["report"], result["absorption"], result["layers"]
    print(f"\n== {title} ({result['seconds']:.0f} s) ==")
    print(f"{len(report.facts) - len(report.failed)} of {len(report.facts)} took (success_rate "
          f"{report.success_rate:.2f}); more probable than before: {report.improved:.2f}")
    print("| fact | weight | P before -> after | took | z* NLL | res. share | k^T C k per layer "
          f"({', '.join(map(str, layers))}) | 1/(1 + w k^T C k), mean | pos 0 | bare key: k_b^T C k_b, cos |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for j, r in enumerate(report.facts):
        a = [absorption[l][j] for l in layers]
        adherence = sum(1 / (1 + r.weight * x) for x in a) / len(a)
        b = (bare or {}).get(r.fact)
        extra = "| | |" if b is None else f"| {'yes' if b['pos0'] else 'no'} | {b['absorption']:.3f}, {b['cos']:.2f} |"
        print(f"| {r.fact.text()!r} -> {r.fact.target!r} | {r.weight:g} | {_p(r.prob_before)} -> {_p(r.prob_after)} | "
              f"{'yes' if r.success else 'NO'} | {r.value_nll:.2f} | {r.residual_share:.2f} | "
              f"{', '.join(f'{x:.3f}' for x in a)} | {adherence:.2f} {extra}")
    print(f"average corpus key, tr(C_0 E[kk^T]) per layer: {', '.join(f'{typical[l]:.3f}' for l in layers)}")
    cost = f"||W - W0||_F over the edited layers: {result['drift']:.3f}"
    if reference is not None:
        cost += f" ({result['drift'] / reference['drift']:.2f} x the weight-1 run)"
    print(cost)
    print("| neighbourhood prompt -> true answer | P unedited | P after | change |")
    print("|---|---|---|---|")
    for (prompt, answer), b, a in zip(PROBES, probes_before, result["probes"], strict=False):
        print(f"| {prompt!r} -> {answer!r} | {_p(b)} | {_p(a)} | {a - b:+.4f} ({a / b:.2f} x) |")
    print("| the edited fact in another context -> new target | P unedited | P after | change |")
    print("|---|---|---|---|")
    n = len(PROBES)
    for (prompt, answer), b, a in zip(CONTEXTS, probes_before[n:], result["probes"][n:], strict=True):
        print(f"| {prompt!r} -> {answer!r} | {_p(b)} | {_p(a)} | {a - b:+.4f} ({a / b:.2f} x) |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="5,20", help="weights tried on the facts that did not take")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    weights = [float(w) for w in args.weights.split(",") if w.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    # The editor's warning about facts that did not take goes to the printed output too.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)

    print(machine_description())
    model, tok = rlsedit_llm.load_model("smollm2")
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = EditConfig()  # the defaults: the diagnosis is of what a user gets
    tic = time.perf_counter()
    prepared = Editor(model, tok, config, take_over=True).prepare()  # statistics: cached after the first run
    C0 = {l: s.C_.clone() for l, s in prepared.solvers_.items()}
    typical = {l: float((s.C_ * s.gram0_).sum()) / prepared.mom2_weight_ for l, s in prepared.solvers_.items()}
    facts = as_facts(HARD + EASY)
    rephrased = [dataclasses.replace(f, prompt=REPHRASE[f.prompt]) for f in facts if f.prompt in REPHRASE]
    bare = dict(zip(facts + rephrased, bare_keys(model, tok, prepared, facts + rephrased, C0), strict=True))
    print(f"SmolLM2-135M, EditConfig defaults: method {config.method}, layers {list(prepared.layers_)}, "
          f"alpha {config.alpha:g}, beta {config.beta:g}, N = {prepared.mom2_weight_:.0f} (d_k {prepared.spec_.d_k}), "
          f"value steps {prepared.value_config_.steps}, lr {prepared.value_config_.lr:g}; "
          f"prepared in {time.perf_counter() - tic:.0f} s")
    prepared.release()
    del prepared

    probes_before = probe_probs(model, tok)
    first = run(model, tok, base, facts, C0, config)
    print_run("weight 1 (all facts)", first, typical, probes_before, None, bare)
    failed = {r.fact for r in first["report"].failed}
    print(f"\nfacts that did not take at weight 1: {[f.text() + ' -> ' + f.target for f in failed]}")
    for w in weights:
        weighted = [dataclasses.replace(f, weight=w) if f in failed else f for f in facts]
        result = run(model, tok, base, weighted, C0, config)
        print_run(f"weight {w:g} on the facts that did not take at weight 1", result, typical, probes_before, first,
                  bare)
    moved = [dataclasses.replace(f, prompt=REPHRASE[f.prompt]) if f in failed and f.prompt in REPHRASE else f
             for f in facts]
    if moved != facts:
        result = run(model, tok, base, moved, C0, config)
        print_run("weight 1, the facts that did not take rephrased with words before the subject", result, typical,
                  probes_before, first, bare)


if __name__ == "__main__":
    main()
