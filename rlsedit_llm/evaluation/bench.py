"""``rlsedit bench``: the sequential editing benchmark, resumable, with JSON/CSV/PNG/Markdown output.

    rlsedit bench --dataset counterfact --edits 1000 --batch 10 --methods rlsedit,memit_seq --out DIR

For every method in turn the base model's edited weights are restored (and the whole model's
fingerprint checked), the stream is written batch by batch (:func:`.protocol.run_method`), and
after every batch the method's progress is checkpointed atomically into ``DIR``: ``results.json``
(written to a temporary file, then renamed) and the method's editor state (``Editor.save`` /
``FineTuneEditor.save``) under ``DIR/state/<method>``. Rerunning the same command continues where
it stopped; a command whose stream or settings differ is refused (use ``--restart`` or another
``--out``). Finished methods keep only their results (their state is deleted unless
``--keep-state``). ``--report-only`` rebuilds the tables and figures from ``results.json``.
``--extend-from OLD`` starts a longer stream in ``DIR`` from the finished, kept run in ``OLD``
(its first edits are not written again; ``OLD`` is only read).

Outputs in ``DIR``: ``results.json`` (everything), ``summary.csv``, ``curves.csv``,
``deviation.csv``, ``results.md`` and ``scores.png``, ``retention.png``, ``deviation.png``,
``norms.png`` (the value-norm instruments and conditioning).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import platform
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlsedit_llm.editing.editor import EditConfig, anchor_gram
from rlsedit_llm.editing.methods import method_value_config
from rlsedit_llm.errors import HyperparameterError, StateMismatchError
from rlsedit_llm.adapters.loading import load_model
from rlsedit_llm.adapters.spec import detect_spec
from rlsedit_llm.adapters.fingerprint import model_fingerprint
from rlsedit_llm.pipeline.stats import second_moments
from rlsedit_llm.evaluation.report import write_report
from rlsedit_llm.files import atomic_write_text
from rlsedit_llm.kernel.registry import is_layer_method, method_names
from rlsedit_llm.evaluation.data import load_glue, load_stream
from rlsedit_llm.evaluation.protocol import SHADOW_LEADER as LEADER
from rlsedit_llm.evaluation.protocol import (
    ProtocolConfig,
    base_report,
    base_summary,
    extend_base,
    load_runner,
    make_runner,
    new_record,
    restore_weights,
    run_method,
    score_generations,
    snapshot_weights,
)

__all__ = ["BenchConfig", "run_bench", "write_report", "read_results", "parse_methods"]

log = logging.getLogger(__name__)

RESULTS = "results.json"
FORMAT = "rlsedit-bench-v1"




@dataclass(frozen=True)
class BenchConfig:
    """Settings of one benchmark run; one field per ``rlsedit bench`` flag (the CLI builds it,
    and these are the only defaults).

    ``stats_tokens``, ``fluency_cases`` and ``glue`` left at None follow the run's size
    (:meth:`resolved`, printed at the start of a run): a 10-edit trial takes minutes, not the
    statistics pass and 50 fluency generations of a 1,000-edit run.
    """

    out: str
    dataset: str = "counterfact"
    model: str = "smollm2"
    device: str | None = None
    edits: int = 100
    batch: int = 10
    methods: str = "rlsedit,memit_seq"
    stats_tokens: int | None = None
    checkpoints: int = 5
    glue: int | None = None
    layers: str | None = None
    alpha: float = 0.0
    beta: float = 1.0
    anchor_value_norms: bool = False
    value_steps: int | None = None
    mom2_weight: float | None = None
    cache_dir: str | None = None
    retention_fraction: float = 0.1
    fluency_cases: int | None = None
    fluency_tokens: int = 100
    no_wild: bool = False
    ft_lr: float = 5e-4
    ft_steps: int = 10
    ultraedit_lr: float | None = None
    ultraedit_ridge: float = 1.0
    state_dir: str | None = None
    keep_state: bool = False
    save_every: int = 1
    restart: bool = False
    report_only: bool = False
    quiet: bool = False
    interleave: bool = False
    shadow: str = ""
    score_all_at: str = ""
    time_budget: float | None = None
    extend_from: str | None = None

    def resolved(self) -> "BenchConfig":
        """This config with the size-dependent defaults filled in (see :func:`scaled_defaults`)."""
        scaled = scaled_defaults(int(self.edits))
        return replace(self, **{k: v for k, v in scaled.items() if getattr(self, k) is None})

    def edit_config(self) -> EditConfig:
        """The hyperparameters shared by the layer-solver methods (validated)."""
        try:
            layers = tuple(int(x) for x in self.layers.split(",")) if self.layers else None
        except ValueError:
            raise HyperparameterError(f"--layers takes comma-separated layer indices, e.g. 3,4,5; got {self.layers!r}") from None
        config = EditConfig(layers=layers, alpha=float(self.alpha), beta=float(self.beta),
                            mom2_weight=self.mom2_weight, cache_dir=self.cache_dir, replace=False,
                            anchor_value_norms=bool(self.anchor_value_norms),
                            **({} if self.stats_tokens is None else {"stats_tokens": int(self.stats_tokens)}))
        config.validate()
        return config

    def method_options(self) -> dict:
        """Options of the editor-level methods, by method name."""
        return {"ft": {"lr": float(self.ft_lr), "steps": int(self.ft_steps)},
                "ultraedit": {"lr": None if self.ultraedit_lr is None else float(self.ultraedit_lr),
                              "ridge": float(self.ultraedit_ridge)}}


def scaled_defaults(n_edits: int) -> dict:
    """Defaults that follow the stream's length: key-statistics tokens (20k below 100 edits, else
    :class:`EditConfig`'s 100k), fluency cases (one per 20 edits, 5 to 50) and GLUE items per task
    (none below 100 edits, then one per 10 edits up to the 200 shipped)."""
    return {
        "stats_tokens": 20_000 if n_edits < 100 else EditConfig.stats_tokens,
        "fluency_cases": min(50, max(5, n_edits // 20)),
        "glue": 0 if n_edits < 100 else min(200, n_edits // 10),
    }


def parse_shadows(text: str, methods: list[str], *, interleave: bool) -> list[str]:
    """``--shadow memit_seq``: the listed layer-solver methods write the keys and values of
    :data:`LEADER` (:class:`.protocol.ShadowRunner`) instead of computing their own."""
    shadows = [m.strip() for m in (text or "").split(",") if m.strip()]
    if not shadows:
        return []
    bad = [m for m in shadows if m not in methods or m == LEADER or not is_layer_method(m)]
    if bad:
        raise HyperparameterError(f"--shadow names methods that must also be in --methods and be layer-solver "
                                  f"methods other than {LEADER!r}; got {bad}")
    if LEADER not in methods:
        raise HyperparameterError(f"--shadow needs {LEADER!r} in --methods: shadows write its keys and values")
    if not interleave:
        raise HyperparameterError("--shadow needs --interleave (a shadow writes each batch right after its leader)")
    return shadows


def _edit_counts(text) -> tuple[int, ...]:
    """``"300,600"`` -> ``(300, 600)`` (``--score-all-at``)."""
    try:
        return tuple(int(x) for x in str(text or "").split(",") if x.strip())
    except ValueError:
        raise HyperparameterError(f"--score-all-at takes comma-separated edit counts, e.g. 300,600; got {text!r}") from None


def parse_methods(text: str) -> list[str]:
    """``"rlsedit,memit_seq"`` -> ``["rlsedit", "memit_seq"]``; ``"all"`` -> every method."""
    if text.strip() == "all":
        return list(method_names())
    methods = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in methods if m not in method_names()]
    if bad or not methods:
        raise HyperparameterError(f"unknown method(s) {bad}; choose from {list(method_names())} (comma-separated) or 'all'")
    if len(set(methods)) != len(methods):
        raise HyperparameterError(f"a method is listed twice in {text!r}")
    return methods


def read_results(out) -> dict | None:
    """The ``results.json`` of a benchmark folder, or None."""
    path = Path(out) / RESULTS
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _write_results(out: Path, results: dict) -> None:
    atomic_write_text(out / RESULTS, json.dumps(results, indent=1))


def _machine() -> dict:
    import transformers

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


def _continues_stream(results: dict, case_ids: list, cfg: ProtocolConfig) -> bool:
    """Whether a run whose stream changed after its written edits (the data loader now skips a
    record it kept before) can go on: every edit written so far, by every method, is the same
    case in the old and the new stream. If so, the new stream replaces the old one in
    ``results`` and the unedited model's scores past the common prefix are dropped (re-scored
    when needed)."""
    old = results["settings"]["case_ids"]
    common = next((i for i, (a, b) in enumerate(zip(old, case_ids)) if a != b), min(len(old), len(case_ids)))
    written = max((m.get("edits_done", 0) for m in results["methods"].values()), default=0)
    if common < written:
        return False
    log.warning("the stream differs from the one this run started with after case %d; the %d edits written so "
                "far are the same cases, so the run continues on the new stream", common, written)
    results["settings"]["case_ids"] = list(case_ids)
    base = results.get("base")
    if base is not None and len(base["cases"]) > common:
        base["cases"] = base["cases"][:common]
        base["wild_cases"] = base.get("wild_cases", [])[:common]
        base["all"] = base_summary(base, len(base["cases"]))
        base["retention"] = base_summary(base, cfg.retention_size)
    return True


def _device(name: str | None) -> torch.device | None:
    """The device the bench loads the model on (None: CPU), checked before anything is loaded."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise HyperparameterError(f"--device takes a torch device such as cpu, cuda or cuda:1; got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HyperparameterError(f"--device {name}: no CUDA device is visible to torch {torch.__version__}; "
                                  "run on a GPU machine with a CUDA build of torch, or leave --device out (CPU)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise HyperparameterError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


# ----------------------------------------------------------------------------------------------
# The run


def run_bench(config: BenchConfig) -> int:
    """Run (or resume) the benchmark ``config`` describes; the entry point of ``rlsedit bench``."""
    if not isinstance(config, BenchConfig):
        raise HyperparameterError(f"run_bench takes a BenchConfig; got {type(config).__name__}")
    args = config.resolved()  # short name: the body reads it like the command line
    out = Path(args.out)
    if args.report_only:
        results = read_results(out)
        if results is None:
            raise HyperparameterError(f"no {RESULTS} in {out}; run the benchmark first")
        write_report(results, out)
        print(f"report rebuilt in {out}")
        return 0

    methods = parse_methods(args.methods)
    device = _device(args.device)  # a bad --device fails before anything is written
    for name, value in (("--ultraedit-lr", args.ultraedit_lr), ("--ultraedit-ridge", args.ultraedit_ridge)):
        if value is not None and not float(value) > 0:
            raise HyperparameterError(f"{name} must be > 0; got {value}")
    cfg = ProtocolConfig(
        dataset=args.dataset, n_edits=int(args.edits), batch_size=int(args.batch),
        checkpoints=int(args.checkpoints),
        retention_fraction=float(args.retention_fraction),
        fluency_cases=int(args.fluency_cases), fluency_tokens=int(args.fluency_tokens),
        glue_items=int(args.glue), wild=not args.no_wild,
        full_checkpoints=_edit_counts(args.score_all_at),
    )
    cfg.validate()
    if not args.quiet:
        sized = {k: getattr(args, k) for k in scaled_defaults(0)}
        print(f"bench: {cfg.n_edits} edits of {cfg.dataset} in batches of {cfg.batch_size}; "
              + ", ".join(f"{k} {v}" + (" (scaled to the run)" if getattr(config, k) is None else "")
                          for k, v in sized.items()))
    shadows = parse_shadows(args.shadow, methods, interleave=args.interleave)
    methods = [m for m in methods if m not in shadows] + shadows  # a leader writes each batch first
    edit_config = args.edit_config()
    ft = {"ft_lr": float(args.ft_lr), "ft_steps": int(args.ft_steps)}  # recorded in the settings
    state_root = Path(args.state_dir or out / "state")
    save_every = int(args.save_every)
    budget = args.time_budget
    budget = None if budget is None else float(budget)
    if budget is not None and not args.interleave:
        raise HyperparameterError("--time-budget needs --interleave (so that every method stops at the same edit)")
    if save_every < 1:
        raise HyperparameterError(f"--save-every must be >= 1; got {save_every}")
    value_steps = args.value_steps
    if value_steps is not None and (isinstance(value_steps, bool) or not isinstance(value_steps, int) or value_steps < 1):
        raise HyperparameterError(f"--value-steps must be an int >= 1; got {value_steps!r}")
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    model, tok = load_model(args.model, device=device)
    log.info("loaded %s on %s in %.1f s", args.model, args.device or "cpu", time.perf_counter() - t0)
    spec = detect_spec(model)
    layers = tuple(edit_config.layers or spec.default_layers)
    facts = load_stream(cfg.dataset, cfg.n_edits, tok, batch_size=cfg.batch_size)
    settings = {
        "format": FORMAT, "model": args.model, **cfg.to_dict(), "layers": list(layers),
        "alpha": edit_config.alpha, "beta": edit_config.beta, "mom2_weight": edit_config.resolved_mom2_weight(spec.d_k),
        **({"anchor_value_norms": True} if edit_config.anchor_value_norms else {}),
        **({"value_steps": value_steps} if value_steps is not None else {}),  # older runs resume
        # UltraEdit's settings only when they differ from the released ones (older runs resume)
        **({"ultraedit": args.method_options()["ultraedit"]}
           if args.ultraedit_lr is not None or float(args.ultraedit_ridge) != 1.0 else {}),
        "stats_tokens": edit_config.stats_tokens, "corpus": edit_config.corpus,
        "case_ids": [f.case_id for f in facts], **ft, "shadow": shadows,
        **({"extended_from": str(args.extend_from)} if args.extend_from else {}),
    }
    results = read_results(out)
    if results is not None and args.restart:
        results = None
        shutil.rmtree(state_root, ignore_errors=True)
    if results is None and args.extend_from:
        results = _extension(Path(args.extend_from), settings, cfg, methods, shadows, state_root)
    elif results is not None:
        old = _recorded_settings(results)
        diff = _differing(old, settings)
        if "case_ids" in diff and _continues_stream(results, settings["case_ids"], cfg):
            diff.remove("case_ids")
        if "shadow" in diff and _adds_shadows(results, old["shadow"], shadows):
            diff.remove("shadow")
            results["settings"]["shadow"] = shadows
        if "extended_from" in diff and not args.extend_from:  # resuming an extension needs no source
            diff.remove("extended_from")
        if diff:
            raise HyperparameterError(
                f"{out} holds a benchmark with other settings ({', '.join(diff)}); rerun the same "
                f"command to resume it, or pass --restart (discards it) or another --out")
        log.info("resuming the benchmark in %s", out)
    else:
        results = {"settings": settings, "config": {}, "sessions": [], "base": None, "methods": {}}
    if any(not (results["methods"].get(m) or {}).get("done") for m in shadows) \
            and (results["methods"].get(LEADER) or {}).get("done") and not (state_root / LEADER).exists():
        raise HyperparameterError(f"the shadows shadow {LEADER}, which is complete here without a kept state in "
                                  f"{state_root / LEADER}; rerun with --restart (and --keep-state)")
    results["config"] = {"model": args.model, "dataset": cfg.dataset, "n_edits": cfg.n_edits,
                         "batch_size": cfg.batch_size, "retention_size": cfg.retention_size,
                         "checkpoint_batches": cfg.checkpoint_batches(), "layers": list(layers),
                         "stats_tokens": edit_config.stats_tokens}
    results["sessions"].append({"started": time.strftime("%Y-%m-%d %H:%M:%S"), "methods": methods,
                                "device": args.device or "cpu", "machine": _machine()})
    _write_results(out, results)

    W0 = snapshot_weights(model, spec, layers)
    base_fp = model_fingerprint(model)
    glue = {t: load_glue(t, cfg.glue_items) for t in ("sst2", "mrpc", "cola", "rte")} if cfg.glue_items else {}
    tic = time.perf_counter()
    moments = second_moments(model, tok, spec, list(layers), corpus=edit_config.corpus,
                             n_tokens=edit_config.stats_tokens, max_length=edit_config.stats_max_length,
                             cache_dir=edit_config.cache_dir)
    N = edit_config.resolved_mom2_weight(spec.d_k)
    grams = {l: anchor_gram(m, N, device="cpu") for l, m in moments.items()}
    log.info("statistics ready in %.1f s", time.perf_counter() - tic)

    if results["base"] is None:
        log.info("scoring the unedited model")
        results["base"] = base_report(model, tok, facts, cfg, glue)
        _write_results(out, results)

    def unedited_scores(n_cases):
        """Extend the unedited model's per-case scores to the first ``n_cases`` cases."""
        if len(results["base"]["cases"]) < n_cases:
            current = snapshot_weights(model, spec, layers)
            restore_weights(model, spec, W0)
            tic = time.perf_counter()
            extend_base(results["base"], model, tok, facts, cfg, n_cases)
            results["base"]["seconds"] = round(results["base"]["seconds"] + time.perf_counter() - tic, 2)
            restore_weights(model, spec, current)
            _write_results(out, results)

    def start_method(name, leader=None):
        """The runner of ``name`` on the base weights, resumed from its saved state if usable
        (a shadow of ``leader`` if given)."""
        record = results["methods"].get(name)
        restore_weights(model, spec, W0)
        if model_fingerprint(model) != base_fp:
            raise StateMismatchError("the model differs from the base model after restoring the edited "
                                     "layers; another module was modified")
        state = state_root / name
        runner = None
        if record is not None and record["batches_done"] > 0 and state.exists():
            try:
                runner = load_runner(name, model, tok, state, leader=leader)
                n_saved = runner.n_batches
                if n_saved > record["batches_done"]:
                    raise StateMismatchError(f"state holds {n_saved} batches, results {record['batches_done']}")
                truncate_record(record, n_saved)  # batches after the last saved state are redone
                log.info("%s: resuming after %d batches", name, n_saved)
            except Exception as exc:  # an unusable checkpoint restarts the method, never corrupts it
                log.warning("%s: cannot resume from %s (%s); restarting this method", name, state, exc)
                runner = None
                restore_weights(model, spec, W0)
        if runner is None:
            record = new_record()
            method_config = edit_config
            if value_steps is not None and is_layer_method(name):  # the method's own value settings, longer
                method_config = replace(edit_config, value=method_value_config(name, spec, steps=value_steps))
            runner = make_runner(name, model, tok, edit_config=method_config, leader=leader,
                                 method_options=args.method_options())
        results["methods"][name] = record
        last = [time.perf_counter()]

        def on_batch(rec):
            now = time.perf_counter()
            rec["seconds_wall"] = round(rec.get("seconds_wall", 0.0) + now - last[0], 2)
            if not rec["done"] and (rec["batches_done"] % save_every == 0 or rec["batches_done"] == cfg.n_batches):
                runner.save(state)
            rec["seconds_wall"] = round(rec["seconds_wall"] + time.perf_counter() - now, 2)
            last[0] = time.perf_counter()
            _write_results(out, results)

        def advance(until=None, progress=not args.quiet, finish=False):
            last[0] = time.perf_counter()
            run_method(runner, model, tok, facts, cfg, record, W0=W0, grams=grams, alpha=edit_config.alpha,
                       beta=edit_config.beta, glue=glue, base=results["base"], on_batch=on_batch,
                       progress=progress, until=until, finish=finish)
            if record["done"] and not args.keep_state:
                shutil.rmtree(state, ignore_errors=True)

        return runner, record, advance

    todo = [m for m in methods if not (results["methods"].get(m) or {}).get("done")]
    for name in methods:
        if name not in todo:
            log.info("%s: already complete", name)
    if not args.interleave:
        for name in todo:  # one method after the other
            unedited_scores(cfg.n_edits)
            _, _, advance = start_method(name)
            advance()
            write_report(results, out)
    else:  # round robin: every method one batch at a time, so all stay at the same number of edits
        active, kept = {}, None
        for name in todo:
            leader = None
            if name in shadows and LEADER in active:
                leader = active[LEADER][0]
            elif name in shadows:  # a shadow added to a finished run reads the leader's kept journal
                if kept is None:
                    kept = load_runner(LEADER, model, tok, state_root / LEADER)
                    if kept.n_batches < cfg.n_batches:
                        raise StateMismatchError(f"the kept {LEADER} state holds {kept.n_batches} of "
                                                 f"{cfg.n_batches} batches")
                leader = kept
            runner, record, advance = start_method(name, leader)
            active[name] = (runner, record, advance, snapshot_weights(model, spec, layers))
        rounds = tqdm(range(1, cfg.n_batches + 1), desc="+".join(active), unit="round",
                      disable=args.quiet)
        stop = None
        for b in rounds:
            if budget is not None and time.perf_counter() - t0 > budget:
                stop = b - 1
                log.warning("time budget of %.0f s spent: stopping after %d of %d batches; scoring the "
                            "edits written so far (rerun the command without --time-budget to continue)",
                            budget, stop, cfg.n_batches)
                break
            for name, (runner, record, advance, _) in active.items():
                if record["batches_done"] >= b:
                    continue
                restore_weights(model, spec, active[name][3])  # this method's current weights
                advance(until=b, progress=False)
                active[name] = (runner, record, advance, snapshot_weights(model, spec, layers))
            write_report(results, out)
        unedited_scores(cfg.n_edits if stop is None else stop * cfg.batch_size)
        for name, (runner, record, advance, weights) in active.items():
            restore_weights(model, spec, weights)
            advance(until=stop, finish=stop is not None)  # the final scoring
        write_report(results, out)
    restore_weights(model, spec, W0)
    # The generations' NLL needs the unedited model, which the bench has only now (a run
    # interrupted before this point gets them scored when it is resumed).
    parts = [results["base"]] + [rec.get("final") for rec in results["methods"].values()]
    scored = [score_generations(part, model, tok, batch_size=cfg.score_batch_size) for part in parts if part]
    if any(scored):
        _write_results(out, results)
    write_report(results, out)
    print(f"results in {out}")
    return 0


def _recorded_settings(results: dict) -> dict:
    """A run's recorded settings; those added after it started take their default values."""
    defaults = {k: v for k, v in ProtocolConfig().to_dict().items() if k not in ("n_edits", "dataset")}
    return {**defaults, "shadow": [], **results["settings"]}


def _differing(a: dict, b: dict) -> list[str]:
    """The sorted keys whose values differ between two settings dicts (missing counts as None)."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


#: Settings in which a longer stream may differ from the finished run it extends.
_EXTENSION_SETTINGS = ("n_edits", "checkpoints", "full_checkpoints", "retention_fraction", "case_ids",
                       "shadow", "extended_from")  # each method's role is checked on its own


def _extension(source: Path, settings: dict, cfg: ProtocolConfig, methods: list[str], shadows: list[str],
               state_root: Path) -> dict:
    """The results of a new run that lengthens the finished run in ``source`` (``--extend-from``).

    Checked first, before anything is written: every setting but the stream's length and its
    checkpoints is the same; the source's stream is the first part of this one; the retention
    set (the first edits re-scored at every checkpoint) is the same edits; each method ran there
    in the same role (its own values, or a shadow) to the end and kept its state. Then each
    method's kept state is copied to ``state_root`` (``source`` is only read) and its record
    continues from the source's last batch; the source's final scores (every edit re-scored)
    become the full checkpoint at its last batch.
    """
    old = read_results(source)
    if old is None:
        raise HyperparameterError(f"--extend-from {source}: no {RESULTS} there; name the folder of a finished run")
    prev = _recorded_settings(old)
    diff = [k for k in _differing(prev, settings) if k not in _EXTENSION_SETTINGS]
    if diff:
        raise HyperparameterError(f"--extend-from {source}: that run has other settings ({', '.join(diff)}); "
                                  "a longer stream keeps every setting but its length and checkpoints")
    n_old = int(prev["n_edits"])
    if cfg.n_edits <= n_old:
        raise HyperparameterError(f"--extend-from {source}: --edits must exceed the {n_old} edits written there; "
                                  f"got {cfg.n_edits}")
    if settings["case_ids"][:n_old] != prev["case_ids"]:
        raise HyperparameterError(f"--extend-from {source}: its {n_old} edits are not the first edits of this "
                                  "stream (another dataset order or skipped records)")
    before = replace(cfg, n_edits=n_old, retention_fraction=float(prev["retention_fraction"]), full_checkpoints=())
    if before.retention_size != cfg.retention_size:
        raise HyperparameterError(
            f"--extend-from {source}: its retention set is the first {before.retention_size} edits, this run's "
            f"the first {cfg.retention_size}; pass --retention-fraction {before.retention_size / cfg.n_edits:.6g} "
            "to keep re-scoring the same edits")
    scored = {math.ceil(e / cfg.batch_size) for e in prev["full_checkpoints"]} | {before.n_batches}
    missing = [e for e in cfg.full_checkpoints if e <= n_old and math.ceil(e / cfg.batch_size) not in scored]
    if missing:
        raise HyperparameterError(f"--extend-from {source}: --score-all-at {missing} falls inside that run, "
                                  f"which re-scored every edit only after {sorted(b * cfg.batch_size for b in scored)}")
    old_state = source / "state"
    for name in methods:
        rec = old["methods"].get(name)
        if rec is None or not rec.get("done"):
            raise HyperparameterError(f"--extend-from {source}: {name} did not finish that run; a method joins a "
                                      "longer stream only from the finished shorter one")
        if (name in shadows) != (name in prev["shadow"]):
            raise HyperparameterError(f"--extend-from {source}: {name} ran there "
                                      f"{'as a shadow' if name in prev['shadow'] else 'on its own values'}; "
                                      "it keeps that role in the longer stream")
        if not (old_state / name).is_dir():
            raise HyperparameterError(f"--extend-from {source}: no kept state {old_state / name}; "
                                      "rerun that run with --keep-state")

    log.info("lengthening the %d-edit run in %s to %d edits", n_old, source, cfg.n_edits)
    results = {"settings": settings, "config": {}, "sessions": list(old["sessions"]), "base": old["base"],
               "methods": {}}
    for name in methods:
        target = state_root / name
        partial = target.with_name(target.name + ".copying")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(old_state / name, partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        rec = copy.deepcopy(old["methods"][name])
        last = rec["checkpoints"][-1]  # the last batch is always a checkpoint
        last.setdefault("all", rec["final"]["all"])
        rec["source_final"] = rec["final"]  # the source's fluency, GLUE and generation scores
        truncate_record(rec, rec["batches_done"])
        results["methods"][name] = rec
    return results


def _adds_shadows(results: dict, old: list[str], new: list[str]) -> bool:
    """True if ``new`` keeps every shadow of a resumed run and adds only methods it has not run
    (a method that computed its own values cannot turn into a shadow, nor a shadow back)."""
    added = set(new) - set(old)
    return set(old) <= set(new) and not any((results["methods"].get(m) or {}).get("batches_done") for m in added)


def truncate_record(record: dict, n_batches: int) -> None:
    """Forget the progress after ``n_batches`` batches (to resume from a state saved then)."""
    record["immediate"] = [e for e in record["immediate"] if e["batch"] <= n_batches]
    record["checkpoints"] = [p for p in record["checkpoints"] if p["batch"] <= n_batches]
    record["batches_done"] = n_batches
    record["edits_done"] = record["immediate"][-1]["edits"] if record["immediate"] else 0
    record["seconds_edit"] = round(sum(e["seconds_edit"] for e in record["immediate"]), 3)
    record["seconds_eval"] = round(sum(e["seconds_eval"] for e in record["immediate"]), 3)
    record["done"], record["final"] = False, None


# ----------------------------------------------------------------------------------------------
# Report
