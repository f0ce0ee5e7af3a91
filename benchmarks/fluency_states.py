"""Fluency and generation NLL of saved editor states on more prompts than a bench run used, with paired errors.

    .venv/bin/python benchmarks/fluency_states.py --prompts 50 \
        bench-runs/smol1000s/state/rlsedit bench-runs/smol1000s_anchor/state/rlsedit

``rlsedit bench`` scores fluency on a few prompts (``--fluency-cases``, often 10) and keeps only
the mean, so two runs' fluencies cannot be told apart from noise. This script loads each state
(a folder written by ``Editor.save``, e.g. ``OUT/state/METHOD`` of ``rlsedit bench --keep-state``)
onto a fresh copy of the model, generates from the first ``--prompts`` prompts of the stream the
bench used (the prompts the bench's fluency starts with, and as many tokens), and prints each state's mean
fluency (x100) and the unedited model's mean NLL of its generations (nats per token: entropy cannot
tell incoherent text from varied prose, this can), with every state's paired difference from the
unedited model (mean +- standard error over prompts), which is always the first row. Two rows give
the NLL a scale: the unedited model's NLL of Wikipedia prose and of the same words shuffled.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch

from rlsedit_llm.adapters.loading import load_model
from rlsedit_llm.editing.editor import Editor
from rlsedit_llm.evaluation import metrics
from rlsedit_llm.evaluation.data import load_stream
from rlsedit_llm.evaluation.protocol import fluency_prompts
from rlsedit_llm.pipeline.corpus import load_corpus

log = logging.getLogger("fluency_states")


def _run_settings(state: Path) -> dict:
    """The bench settings of the run a state folder belongs to (``OUT/state/METHOD``)."""
    results = state.parent.parent / "results.json"
    if not results.exists():
        raise SystemExit(f"{state}: no bench results.json two folders up; pass states of an "
                         f"`rlsedit bench --keep-state` run")
    return json.loads(results.read_text())["settings"]


def per_prompt_scores(settings: dict, state: Path | None, n_prompts: int, unedited) -> tuple[list[float], list[float]]:
    """Per fluency prompt of the bench's first ``n_prompts`` cases, on the run's model with
    ``state`` loaded (None: the unedited model), generating as many tokens as the run did: the
    fluency (bits) and the ``unedited`` model's NLL of the generation (nats per token; NaN for an
    empty one)."""
    model, tok = load_model(settings["model"])
    if state is not None:
        Editor.load(model, tok, state)
    facts = load_stream(settings["dataset"], settings["n_edits"], tok, batch_size=settings["batch_size"])
    prompts = fluency_prompts(facts, n_prompts)
    if len(prompts) < 2:
        raise SystemExit(f"only {len(prompts)} fluency prompt(s) among the stream's first {n_prompts} cases; "
                         "raise --prompts (a standard error needs two)")
    texts = metrics.generate_texts(model, tok, prompts, settings["fluency_tokens"])
    fluency = [metrics.ngram_entropy(p + t) for p, t in zip(prompts, texts, strict=True)]
    return fluency, metrics.continuation_nll(unedited, tok, prompts, texts)


def prose_nll(unedited, tokenizer, n: int, *, seed: int = 0) -> tuple[float, float]:
    """For scale: the ``unedited`` model's mean NLL (nats per token) of human prose, the 75 words
    after the first 20 of up to ``n`` articles of the shipped Wikipedia sample, and of the same
    words shuffled (word salad). A healthy model's greedy text is far likelier than either."""
    words = [d.split() for d in load_corpus("enwiki_sample")["text"]]
    words = [w for w in words if len(w) >= 95][:n]
    prompts = [" ".join(w[:20]) for w in words]
    rng = np.random.default_rng(seed)
    prose = metrics.continuation_nll(unedited, tokenizer, prompts, [" " + " ".join(w[20:95]) for w in words])
    salad = metrics.continuation_nll(unedited, tokenizer, prompts,
                                     [" " + " ".join(rng.permutation(w[20:95])) for w in words])
    return float(np.mean(prose)), float(np.mean(salad))


def paired(a, b, *, scale: float = 100, digits: int = 1) -> str:
    """``a - b`` over prompts, times ``scale``: mean +- standard error of the mean, over the
    prompts where both are finite (an empty generation has no NLL)."""
    d = scale * (np.asarray(a, dtype=float) - np.asarray(b, dtype=float))
    d = d[np.isfinite(d)]
    if len(d) < 2:
        return "— (fewer than 2 paired prompts)"
    return f"{d.mean():+.{digits}f} +- {d.std(ddof=1) / np.sqrt(len(d)):.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("states", type=Path, nargs="+", help="OUT/state/METHOD folders of bench runs on one stream")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.prompts < 2:
        parser.error("--prompts must be at least 2 (a standard error needs two prompts)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    settings = [_run_settings(s) for s in args.states]
    stream = {(s["model"], s["dataset"], s["batch_size"], s["fluency_tokens"]) for s in settings}
    if len(stream) != 1:
        raise SystemExit(f"the states come from runs of different models, data sets, batch sizes or fluency "
                         f"lengths: {sorted(stream)}")
    first = max(settings, key=lambda s: s["n_edits"])  # the longest stream has every run's first prompts

    unedited, tok = load_model(first["model"])
    columns = {"unedited": per_prompt_scores(first, None, args.prompts, unedited)}
    for state in args.states:
        label = f"{state.parent.parent.name}/{state.name}"
        log.info("generating with %s", label)
        columns[label] = per_prompt_scores(first, state, args.prompts, unedited)

    base_fl, base_nll = (np.array(x) for x in columns["unedited"])
    print(f"Fluency x100 and generation NLL (the unedited model's, nats per token) on the first {len(base_fl)} "
          f"prompts of {first['dataset']} ({first['model']}); differences: paired, from the unedited model, "
          "mean +- standard error (the NLL's over the prompts where both generated text)")
    print("\n| model | fluency | difference | gen. NLL | difference |\n|---|---|---|---|---|")
    for label, (fl, nll) in columns.items():
        diff = ("—", "—") if label == "unedited" else (paired(fl, base_fl), paired(nll, base_nll, scale=1, digits=2))
        print(f"| {label} | {100 * np.mean(fl):.1f} | {diff[0]} | {np.nanmean(nll):.2f} | {diff[1]} |")
    prose, salad = prose_nll(unedited, tok, args.prompts)
    print(f"| for scale: Wikipedia prose | — | — | {prose:.2f} | — |")
    print(f"| for scale: the same words shuffled | — | — | {salad:.2f} | — |")
    if len(args.states) == 2:
        (first_fl, first_nll), (second_fl, second_nll) = list(columns.values())[1:]
        print(f"\nsecond state minus first, paired: fluency {paired(second_fl, first_fl)}, "
              f"gen. NLL {paired(second_nll, first_nll, scale=1, digits=2)}")


if __name__ == "__main__":
    main()
