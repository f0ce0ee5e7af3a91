"""How close do the optimised values come to their targets, before any weight is written?

An edit's efficacy is lost at one of two stages: the value optimisation (``z*`` itself does not
make the target likely within its step and norm budget) or the write (the solver leaves part of
``z* - h`` unfitted; the bench reports that share as "residual left"). This script measures the
first stage alone. On the unedited model it optimises the values of the first ``--facts``
facts of a data set's stream (the facts of the bench's first batch) exactly as
:class:`~rlsedit_llm.Editor` would (its layers, context templates and
:class:`~rlsedit_llm.pipeline.values.ValueConfig`), once per value setting asked for, and prints
per setting:

- ``steps``: Adam updates taken (the most any fact took);
- ``reached``: facts whose loss fell below ``early_stop_loss`` (they stopped early);
- ``nll``: mean and median over facts of the target's mean token NLL at ``z*``;
- ``top1``: with ``--mpes`` only, facts whose every target token is the most probable one in
  every template row at ``z*`` (ENCORE's stopping rule; the run then stops facts there);
- ``|delta|/|h0|``: mean norm of the change relative to the hidden state it changes;
- ``clamped``: facts whose ``delta`` sits at the norm clamp ``clamp_norm_factor * |h0|``.

Example (zsRE against simplified CounterFact on SmolLM2, about 5 minutes per setting at 1 thread):

    OMP_NUM_THREADS=1 python benchmarks/value_reach.py --dataset zsre --facts 30 \\
        --settings default,mpes,clamp=1.5,clamp=1.5:steps=50

The model is never edited; nothing is written to disk.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time

import torch

from rlsedit_llm import load_model
from rlsedit_llm.editing.config import EditConfig
from rlsedit_llm.editing.editor import Editor
from rlsedit_llm.errors import HyperparameterError
from rlsedit_llm.evaluation.data import DATASETS, load_stream
from rlsedit_llm.pipeline.values import ValueConfig, compute_values

log = logging.getLogger("value_reach")

#: ``--settings`` keys and the ValueConfig fields they set.
_FIELDS = {"clamp": ("clamp_norm_factor", float), "steps": ("steps", int), "lr": ("lr", float)}


def parse_setting(text: str, base: ValueConfig) -> ValueConfig:
    """``"default"``, ``"mpes"`` or ``key=value`` pairs joined by ``:`` (keys: clamp, steps, lr,
    mpes), applied to ``base``."""
    if text == "default":
        return base
    changes = {}
    for part in text.split(":"):
        if part == "mpes":
            changes["stop_when_top1"] = True
            continue
        key, sep, value = part.partition("=")
        if not sep or key not in _FIELDS:
            raise HyperparameterError(f"a setting is 'default', 'mpes' or key=value joined by ':' with keys "
                                      f"{sorted(_FIELDS)}; got {part!r} in {text!r}")
        name, kind = _FIELDS[key]
        changes[name] = kind(value)
    config = dataclasses.replace(base, **changes)
    config.validate()
    return config


def reach(result, config: ValueConfig) -> dict:
    """The row printed for one setting, from a :class:`ValueResult`."""
    ratio = result.delta.norm(dim=1) / result.initial.norm(dim=1)  # (u,)
    return {
        "steps": result.steps_run,
        "reached": int((result.final_loss < config.early_stop_loss).sum()),
        "nll_mean": float(result.final_nll.mean()),
        "nll_median": float(result.final_nll.median()),
        "top1": None if result.top1 is None else int(result.top1.sum()),
        "delta_ratio": float(ratio.mean()),
        # the clamp rescales to exactly clamp * |h0|; float32 rounding leaves it a hair below
        "clamped": int((ratio >= config.clamp_norm_factor * (1 - 1e-4)).sum()),
    }


def measure(model, tok, facts, settings, config: EditConfig | None = None) -> list[dict]:
    """One :func:`reach` row per value setting (``"default"``, ``"mpes"``, ``"clamp=1.5:steps=50"``,
    ...) for ``facts`` on the unedited ``model``, with the layers, templates and value defaults of
    an :class:`Editor` built from ``config``. The model is left as it was."""
    editor = Editor(model, tok, config or EditConfig()).prepare()
    layer = editor.layers_[-1]
    configs = [(s, parse_setting(s, editor.value_config_)) for s in settings]  # all checked first
    log.info("first %d facts, layer %d, %d context templates, torch threads %d",
             len(facts), layer, len(editor.templates_), torch.get_num_threads())
    rows = []
    for name, value_config in configs:
        tic = time.perf_counter()
        result = compute_values(model, tok, editor.spec_, layer, facts, editor.templates_, value_config)
        rows.append({"setting": name, "facts": len(facts), **reach(result, value_config),
                     "seconds": time.perf_counter() - tic})
        log.info("%s: %s", name, {k: v for k, v in rows[-1].items() if k != "setting"})
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dataset", default="zsre", choices=DATASETS)
    ap.add_argument("--facts", type=int, default=30, help="the first FACTS facts of the stream")
    ap.add_argument("--settings", default="default,mpes",
                    help="comma-separated value settings: default, mpes, or e.g. clamp=1.5:steps=50")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    facts = load_stream(args.dataset, args.facts, tok, batch_size=100)
    log.info("%s on %s", args.model, args.dataset)
    rows = measure(model, tok, facts, args.settings.split(","))
    print("| setting | steps | reached loss < stop | NLL mean / median | top-1 | |delta|/|h0| | clamped | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        n = r["facts"]
        top1 = "—" if r["top1"] is None else f"{r['top1']} / {n}"
        print(f"| {r['setting']} | {r['steps']} | {r['reached']} / {n} | {r['nll_mean']:.3f} / {r['nll_median']:.3f} "
              f"| {top1} | {r['delta_ratio']:.2f} | {r['clamped']} / {n} | {r['seconds']:.0f} |")
    return rows


if __name__ == "__main__":
    main()
