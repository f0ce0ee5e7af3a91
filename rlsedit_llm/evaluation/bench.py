"""``rlsedit bench``: the sequential editing benchmark, resumable, with JSON/CSV/PNG/Markdown output.

    rlsedit bench --dataset counterfact --edits 1000 --batch 10 --methods rlsedit,memit_seq --out DIR

For every method in turn the base model's edited weights are restored (and the whole model's
fingerprint checked), the stream is written batch by batch (:func:`.protocol.run_method`), and
after every batch the method's progress is checkpointed atomically into ``DIR``: ``results.json``
(:class:`.results.Results`, written to a temporary file, then renamed) and the method's editor
state under ``DIR/state/<method>``. Rerunning the same command continues where it stopped; a
command whose stream or settings differ is refused (use ``--restart`` or another ``--out``;
:mod:`.resume`). Finished methods keep only their results (their state is deleted unless
``--keep-state``). ``--report-only`` rebuilds the tables and figures from ``results.json``.
``--extend-from OLD`` starts a longer stream in ``DIR`` from the finished, kept run in ``OLD``
(its first edits are not written again; ``OLD`` is only read).

Outputs in ``DIR``: ``results.json`` (everything), ``summary.csv``, ``curves.csv``,
``deviation.csv``, ``results.md`` and ``scores.png``, ``retention.png``, ``deviation.png``,
``norms.png`` (the value-norm instruments and conditioning).
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from rlsedit_llm.adapters.fingerprint import model_fingerprint
from rlsedit_llm.adapters.loading import load_model
from rlsedit_llm.adapters.spec import detect_spec
from rlsedit_llm.editing.config import EditConfig
from rlsedit_llm.editing.methods import method_value_config
from rlsedit_llm.editing.norm_anchors import NAS_REFERENCE_FACTS
from rlsedit_llm.editing.statistics import layer_moments
from rlsedit_llm.errors import HyperparameterError, StateMismatchError
from rlsedit_llm.evaluation.bench_config import SHADOW_LEADER as LEADER
from rlsedit_llm.evaluation.bench_config import BenchConfig, scaled_defaults
from rlsedit_llm.evaluation.data import load_glue, load_stream
from rlsedit_llm.evaluation.metrics import scoring_progress
from rlsedit_llm.evaluation.protocol import base_report, extend_base, run_method, score_generations
from rlsedit_llm.evaluation.protocol_config import LITERATURE_FLUENCY, ProtocolConfig
from rlsedit_llm.evaluation.report import write_report
from rlsedit_llm.evaluation.results import (
    RESULTS,
    MethodRecord,
    Results,
    RunConfig,
    RunSettings,
    Session,
    load_results,
    read_results,
    write_results,
)
from rlsedit_llm.evaluation.resume import RunPlan, open_results
from rlsedit_llm.evaluation.runners import (
    MethodRunner,
    load_runner,
    make_runner,
    restore_weights,
    snapshot_weights,
)
from rlsedit_llm.kernel.registry import is_layer_method
from rlsedit_llm.pipeline.moment_pass import progress_bar

__all__ = ["BenchConfig", "run_bench", "write_report", "read_results", "load_results"]

log = logging.getLogger(__name__)


def _machine() -> dict[str, Any]:
    import transformers

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__}


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


def _settings(args: BenchConfig, cfg: ProtocolConfig, edit_config: EditConfig, spec: Any,
              layers: tuple[int, ...], case_ids: list) -> RunSettings:
    """What a rerun must share to resume this run."""
    return RunSettings(
        model=args.model, stream=cfg, layers=layers, alpha=edit_config.alpha, beta=edit_config.beta,
        mom2_weight=edit_config.resolved_mom2_weight(spec.d_k), stats_tokens=edit_config.stats_tokens,
        corpus=str(edit_config.corpus), case_ids=tuple(case_ids), shadow=args.shadow,
        method_settings={m: dict(s) for m, s in args.method_settings.items()},
        anchor_value_norms=bool(edit_config.anchor_value_norms), value_steps=args.value_steps,
        extended_from=None if args.extend_from is None else str(args.extend_from),
        # NAS's reference sample, when the +nas entries use another than the released one
        extra={"nas_reference_facts": args.nas_reference_facts}
        if args.nas_reference_facts != NAS_REFERENCE_FACTS and any(args.variant(m).nas for m in args.methods)
        else {})


@dataclass
class _Method:
    """One method's runner and record on the shared model, and its weights between rounds."""

    name: str
    runner: MethodRunner
    record: MethodRecord
    weights: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Bench:
    """A run in progress: the model, its base weights, the stream and the results."""

    args: BenchConfig
    cfg: ProtocolConfig
    edit_config: EditConfig
    out: Path
    state_root: Path
    model: torch.nn.Module
    tokenizer: Any
    spec: Any
    layers: tuple[int, ...]
    facts: list
    results: Results
    t0: float
    W0: dict[int, torch.Tensor] = field(default_factory=dict)
    base_fp: str = ""
    glue: dict[str, list] = field(default_factory=dict)
    grams: dict[int, torch.Tensor] | None = None

    def save(self) -> None:
        write_results(self.out, self.results)

    def unedited_scores(self, n_cases: int) -> None:
        """Extend the unedited model's per-case scores to the first ``n_cases`` cases."""
        base = self.results.base
        assert base is not None
        if len(base.cases) < n_cases:
            current = snapshot_weights(self.model, self.spec, self.layers)
            restore_weights(self.model, self.spec, self.W0)
            tic = time.perf_counter()
            extend_base(base, self.model, self.tokenizer, self.facts, self.cfg, n_cases)
            base.seconds = round(base.seconds + time.perf_counter() - tic, 2)
            restore_weights(self.model, self.spec, current)
            self.save()

    def anchor_grams(self, runner: MethodRunner) -> dict[int, torch.Tensor]:
        """The anchor Grams ``N E[kk^T]`` that measure the drift of a method whose editor keeps
        none: those of a layer-solver method's editor in this run, else from the statistics the
        editors use (:func:`~rlsedit_llm.editing.statistics.layer_moments`)."""
        if self.grams is None:
            own = runner.anchor_grams()
            if own is not None and set(own) >= set(self.layers):
                self.grams = own
                return own
            moments = layer_moments(self.model, self.tokenizer, self.spec, self.layers, self.edit_config,
                                    progress=not self.args.quiet)
            N = self.edit_config.resolved_mom2_weight(self.spec.d_k)
            self.grams = {l: N * m.to(torch.float64) for l, m in moments.items()}
        return self.grams

    def start_method(self, name: str, leader: MethodRunner | None = None) -> _Method:
        """The runner of ``name`` on the base weights, resumed from its saved state if usable
        (a shadow of ``leader`` if given)."""
        restore_weights(self.model, self.spec, self.W0)
        if model_fingerprint(self.model) != self.base_fp:
            raise StateMismatchError("the model differs from the base model after restoring the edited "
                                     "layers; another module was modified")
        record = self.results.methods.get(name)
        runner = self._resumed(name, record, leader) if record is not None else None
        if runner is None:
            # ``name`` may be a variant (METHOD[@PRESET][+nas]): its method, preset settings and NAS
            variant = self.args.variant(name)
            record = MethodRecord(settings=self.args.settings_of(name) or None,
                                  extra=variant.record(self.args.nas_reference_facts))
            method_config = self.args.edit_config_of(name, self.edit_config)
            if self.args.value_steps is not None and is_layer_method(variant.method):  # its own value settings
                method_config = replace(method_config, value=method_value_config(
                    variant.method, self.spec, steps=self.args.value_steps))
            runner = make_runner(variant.method, self.model, self.tokenizer, edit_config=method_config, leader=leader,
                                 method_settings={variant.method: self.args.settings_of(name)})
        assert record is not None
        self.results.methods[name] = record
        return _Method(name, runner, record)

    def _resumed(self, name: str, record: MethodRecord, leader: MethodRunner | None) -> MethodRunner | None:
        """The runner restored from ``name``'s saved state, ``record`` cut back to it; None when
        there is no usable state (the method then restarts; a bad state never corrupts it)."""
        state = self.state_root / name
        if record.batches_done == 0 or not state.exists():
            return None
        try:
            runner = load_runner(self.args.variant(name).method, self.model, self.tokenizer, state, leader=leader)
            if runner.n_batches > record.batches_done:
                raise StateMismatchError(f"state holds {runner.n_batches} batches, results {record.batches_done}")
            record.truncate(runner.n_batches)  # batches after the last saved state are redone
            log.info("%s: resuming after %d batches", name, runner.n_batches)
            return runner
        except Exception as exc:  # an unusable checkpoint restarts the method, never corrupts it
            log.warning("%s: cannot resume from %s (%s); restarting this method", name, state, exc)
            restore_weights(self.model, self.spec, self.W0)
            return None

    def advance(self, method: _Method, *, until: int | None = None, progress: bool | None = None,
                finish: bool = False) -> None:
        """Write ``method``'s stream (up to batch ``until``), saving its state and the results
        after every batch; a finished method's state is deleted unless ``--keep-state``."""
        state, last = self.state_root / method.name, [time.perf_counter()]

        def on_batch(rec: MethodRecord) -> None:
            now = time.perf_counter()
            rec.seconds_wall = round((rec.seconds_wall or 0.0) + now - last[0], 2)
            due = rec.batches_done % self.args.save_every == 0 or rec.batches_done == self.cfg.n_batches
            if not rec.done and due:
                method.runner.save(state)
            rec.seconds_wall = round(rec.seconds_wall + time.perf_counter() - now, 2)
            last[0] = time.perf_counter()
            self.save()

        run_method(method.runner, self.model, self.tokenizer, self.facts, self.cfg, method.record, W0=self.W0,
                   grams=self.anchor_grams(method.runner), glue=self.glue, base=self.results.base,
                   on_batch=on_batch, progress=not self.args.quiet if progress is None else progress,
                   until=until, finish=finish)
        if method.record.done and not self.args.keep_state:
            shutil.rmtree(state, ignore_errors=True)


def run_sequential(bench: _Bench, todo: list[str]) -> None:
    """One method after the other, each through the whole stream."""
    for name in todo:
        bench.unedited_scores(bench.cfg.n_edits)
        bench.advance(bench.start_method(name))
        write_report(bench.results, bench.out)


def _leader_for(bench: _Bench, name: str, active: dict[str, _Method], kept: list[MethodRunner]) -> MethodRunner | None:
    """The leader a shadow writes after: the running one, or the kept state of a finished one."""
    if name not in bench.args.shadow:
        return None
    if LEADER in active:
        return active[LEADER].runner
    if not kept:  # a shadow added to a finished run reads the leader's kept journal
        runner = load_runner(LEADER, bench.model, bench.tokenizer, bench.state_root / LEADER)
        if runner.n_batches < bench.cfg.n_batches:
            raise StateMismatchError(f"the kept {LEADER} state holds {runner.n_batches} of "
                                     f"{bench.cfg.n_batches} batches")
        kept.append(runner)
    return kept[0]


def run_interleaved(bench: _Bench, todo: list[str]) -> None:
    """Round robin: every method one batch at a time, so all stay at the same number of edits
    (with ``--time-budget``, all stop after the same round and score what they wrote)."""
    active: dict[str, _Method] = {}
    kept: list[MethodRunner] = []
    for name in todo:
        method = bench.start_method(name, _leader_for(bench, name, active, kept))
        method.weights = snapshot_weights(bench.model, bench.spec, bench.layers)
        active[name] = method
    budget, stop = bench.args.time_budget, None
    rounds = progress_bar(not bench.args.quiet, iterable=range(1, bench.cfg.n_batches + 1), desc="+".join(active),
                          unit="round")
    for b in rounds:
        if budget is not None and time.perf_counter() - bench.t0 > budget:
            stop = b - 1
            log.warning("time budget of %.0f s spent: stopping after %d of %d batches; scoring the edits written "
                        "so far (rerun the command without --time-budget to continue)", budget, stop,
                        bench.cfg.n_batches)
            break
        for method in active.values():
            if method.record.batches_done >= b:
                continue
            restore_weights(bench.model, bench.spec, method.weights)  # this method's current weights
            bench.advance(method, until=b, progress=False)
            method.weights = snapshot_weights(bench.model, bench.spec, bench.layers)
        write_report(bench.results, bench.out)
    bench.unedited_scores(bench.cfg.n_edits if stop is None else stop * bench.cfg.batch_size)
    for method in active.values():
        restore_weights(bench.model, bench.spec, method.weights)
        bench.advance(method, until=stop, finish=stop is not None)  # the final scoring


def _start(args: BenchConfig, cfg: ProtocolConfig, out: Path) -> _Bench:
    """Load the model and the stream, open the results (new, resumed or extended) and record
    this session."""
    edit_config = args.edit_config()
    state_root = Path(args.state_dir) if args.state_dir is not None else out / "state"
    device = _device(args.device)  # a bad --device fails before anything is written
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tok = load_model(args.model, device=device)
    log.info("loaded %s on %s in %.1f s", args.model, args.device or "cpu", time.perf_counter() - t0)
    spec = detect_spec(model)
    layers = tuple(edit_config.layers or spec.default_layers)
    facts = load_stream(cfg.dataset, cfg.n_edits, tok, batch_size=cfg.batch_size, stream=cfg.stream_seed,
                        zsre_target=cfg.zsre_target)
    settings = _settings(args, cfg, edit_config, spec, layers, [f.case_id for f in facts])
    plan = RunPlan(out, settings, cfg, args.run_order(), args.shadow, state_root, restart=args.restart,
                   extend_from=None if args.extend_from is None else Path(args.extend_from))
    results = open_results(plan)
    results.config = RunConfig(args.model, cfg.dataset, cfg.n_edits, cfg.batch_size, cfg.retention_size,
                               cfg.checkpoint_batches(), list(layers), edit_config.stats_tokens)
    results.sessions.append(Session(time.strftime("%Y-%m-%d %H:%M:%S"), list(plan.methods), _machine(),
                                    args.device or "cpu"))
    bench = _Bench(args, cfg, edit_config, out, state_root, model, tok, spec, layers, facts, results, t0)
    bench.save()
    bench.W0 = snapshot_weights(model, spec, layers)
    bench.base_fp = model_fingerprint(model)
    bench.glue = {t: load_glue(t, cfg.glue_items) for t in ("sst2", "mrpc", "cola", "rte")} if cfg.glue_items else {}
    if results.base is None:
        log.info("scoring the unedited model")
        results.base = base_report(model, tok, facts, cfg, bench.glue)
        bench.save()
    return bench


def _finish(bench: _Bench) -> None:
    """Back to the base weights; the generations' NLL under the unedited model, which the bench
    has only now (a run interrupted before this point gets them scored when it is resumed)."""
    restore_weights(bench.model, bench.spec, bench.W0)
    results = bench.results
    parts = [results.base] + [rec.final for rec in results.methods.values()]
    scored = [score_generations(part, bench.model, bench.tokenizer, batch_size=bench.cfg.score_batch_size)
              for part in parts if part is not None]
    if any(scored):
        bench.save()
    write_report(results, bench.out)


def _with_fluency_protocol(args: BenchConfig, out: Path) -> BenchConfig:
    """``args`` with its fluency protocol decided: the one given, else the one recorded by the run
    this command resumes (or extends), else the literature's for a new run. A run recorded before
    the choice existed used :data:`~.protocol_config.LEGACY_FLUENCY`."""
    if args.fluency_protocol is not None:
        return args
    source = None if args.restart else out
    if source is None or load_results(source) is None:
        source = None if args.extend_from is None else Path(args.extend_from)
    recorded = None if source is None else load_results(source)
    protocol = LITERATURE_FLUENCY if recorded is None else recorded.settings.stream.fluency_protocol
    return replace(args, fluency_protocol=protocol)


def run_bench(config: BenchConfig) -> int:
    """Run (or resume) the benchmark ``config`` describes; the entry point of ``rlsedit bench``."""
    if not isinstance(config, BenchConfig):
        raise HyperparameterError(f"run_bench takes a BenchConfig; got {type(config).__name__}")
    args = config.resolved()
    out = Path(args.out)
    if args.report_only:
        results = load_results(out)
        if results is None:
            raise HyperparameterError(f"no {RESULTS} in {out}; run the benchmark first")
        write_report(results, out)
        print(f"report rebuilt in {out}")
        return 0
    args = _with_fluency_protocol(args, out)
    cfg = args.protocol()
    if not args.quiet:
        sized = {k: getattr(args, k) for k in scaled_defaults(0)}
        print(f"bench: {cfg.n_edits} edits of {cfg.dataset} in batches of {cfg.batch_size}; "
              + ", ".join(f"{k} {v}" + (" (scaled to the run)" if getattr(config, k) is None else "")
                          for k, v in sized.items()))
    with scoring_progress(not args.quiet):  # --quiet: no bars of the scoring passes either
        bench = _start(args, cfg, out)
        todo = [m for m in args.run_order() if not (m in bench.results.methods and bench.results.methods[m].done)]
        for name in args.run_order():
            if name not in todo:
                log.info("%s: already complete", name)
        run: Callable[[_Bench, list[str]], None] = run_interleaved if args.interleave else run_sequential
        run(bench, todo)
        _finish(bench)
    print(f"results in {out}")
    return 0
