"""Where a benchmark run starts: a new run, the run already in its folder (resumed), or a
longer stream continuing a finished run (``--extend-from``).

:func:`open_results` decides, checks that the recorded settings allow it, and returns the
:class:`.results.Results` to continue; nothing is written here except the kept states an
extension copies.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from rlsedit_llm.errors import HyperparameterError
from rlsedit_llm.evaluation.bench_config import SHADOW_LEADER as LEADER
from rlsedit_llm.evaluation.protocol import base_summary
from rlsedit_llm.evaluation.protocol_config import ProtocolConfig
from rlsedit_llm.evaluation.results import RESULTS, Results, RunSettings, load_results

__all__ = ["RunPlan", "open_results", "differing"]

log = logging.getLogger(__name__)

#: Settings in which a longer stream may differ from the finished run it extends (each method's
#: role is checked on its own).
_EXTENSION_SETTINGS = ("n_edits", "checkpoints", "full_checkpoints", "retention_fraction", "case_ids",
                       "shadow", "extended_from")


@dataclass(frozen=True)
class RunPlan:
    """What a run is asked to be: its folder, settings, stream, methods and shadows, where the
    methods' states live, and whether to restart or extend another run."""

    out: Path
    settings: RunSettings
    cfg: ProtocolConfig
    methods: tuple[str, ...]
    shadows: tuple[str, ...]
    state_root: Path
    restart: bool = False
    extend_from: Path | None = None


def differing(a: RunSettings, b: RunSettings) -> list[str]:
    """The sorted settings (JSON keys) whose values differ (missing counts as None)."""
    x, y = a.to_json(), b.to_json()
    return sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))


def open_results(plan: RunPlan) -> Results:
    """The results to continue: the folder's own (resumed, checked against ``plan``), an extension
    of ``plan.extend_from``, or a new run. Raises :class:`HyperparameterError` when the folder
    holds a run with other settings, before anything is written."""
    results = load_results(plan.out)
    if results is not None and plan.restart:
        results = None
        shutil.rmtree(plan.state_root, ignore_errors=True)
    if results is None and plan.extend_from is not None:
        results = _extension(plan)
    elif results is not None:
        _check_resumable(results, plan)
        log.info("resuming the benchmark in %s", plan.out)
    else:
        results = Results(plan.settings)
    unfinished_shadow = any(not (results.methods.get(m) and results.methods[m].done) for m in plan.shadows)
    leader = results.methods.get(LEADER)
    if unfinished_shadow and leader is not None and leader.done and not (plan.state_root / LEADER).exists():
        raise HyperparameterError(f"the shadows shadow {LEADER}, which is complete here without a kept state in "
                                  f"{plan.state_root / LEADER}; rerun with --restart (and --keep-state)")
    return results


def _check_resumable(results: Results, plan: RunPlan) -> None:
    """Refuse to resume a run whose settings differ from ``plan``'s; adopt the changes that may
    happen (a stream changed only after the written edits, added shadows)."""
    old = results.settings
    diff = differing(old, plan.settings)
    if "case_ids" in diff and _continues_stream(results, plan.settings.case_ids, plan.cfg):
        diff.remove("case_ids")
    if "shadow" in diff and _adds_shadows(results, old.shadow, plan.shadows):
        diff.remove("shadow")
        results.settings = replace(results.settings, shadow=tuple(plan.shadows))
    if "extended_from" in diff and plan.extend_from is None:  # resuming an extension needs no source
        diff.remove("extended_from")
    if diff:
        raise HyperparameterError(
            f"{plan.out} holds a benchmark with other settings ({', '.join(diff)}); rerun the same "
            f"command to resume it, or pass --restart (discards it) or another --out")


def _continues_stream(results: Results, case_ids: tuple, cfg: ProtocolConfig) -> bool:
    """Whether a run whose stream changed after its written edits (the data loader now skips a
    record it kept before) can go on: every edit written so far, by every method, is the same
    case in the old and the new stream. If so, the new stream replaces the old one in
    ``results`` and the unedited model's scores past the common prefix are dropped (re-scored
    when needed)."""
    old = results.settings.case_ids
    pairs = enumerate(zip(old, case_ids, strict=False))
    common = next((i for i, (a, b) in pairs if a != b), min(len(old), len(case_ids)))
    written = max((m.edits_done for m in results.methods.values()), default=0)
    if common < written:
        return False
    log.warning("the stream differs from the one this run started with after case %d; the %d edits written so "
                "far are the same cases, so the run continues on the new stream", common, written)
    results.settings = replace(results.settings, case_ids=tuple(case_ids))
    base = results.base
    if base is not None and len(base.cases) > common:
        base.cases = base.cases[:common]
        base.wild_cases = base.wild_cases[:common]
        base.all = base_summary(base, len(base.cases))
        base.retention = base_summary(base, cfg.retention_size)
    return True


def _adds_shadows(results: Results, old: tuple[str, ...], new: tuple[str, ...]) -> bool:
    """True if ``new`` keeps every shadow of a resumed run and adds only methods it has not run
    (a method that computed its own values cannot turn into a shadow, nor a shadow back)."""
    added = set(new) - set(old)
    return set(old) <= set(new) and not any(results.methods.get(m) and results.methods[m].batches_done
                                            for m in added)


def _check_extension(source: Path, old: Results, plan: RunPlan) -> None:
    """Refuse an extension unless every setting but the stream's length and its checkpoints is
    the same, the source's stream is the first part of this one, the retention set is the same
    edits, the full checkpoints inside the source were scored there, and each method ran there
    in the same role to the end and kept its state."""
    prev, cfg = old.settings, plan.cfg
    diff = [k for k in differing(prev, plan.settings) if k not in _EXTENSION_SETTINGS]
    if diff:
        raise HyperparameterError(f"--extend-from {source}: that run has other settings ({', '.join(diff)}); "
                                  "a longer stream keeps every setting but its length and checkpoints")
    n_old = prev.stream.n_edits
    if cfg.n_edits <= n_old:
        raise HyperparameterError(f"--extend-from {source}: --edits must exceed the {n_old} edits written there; "
                                  f"got {cfg.n_edits}")
    if plan.settings.case_ids[:n_old] != prev.case_ids:
        raise HyperparameterError(f"--extend-from {source}: its {n_old} edits are not the first edits of this "
                                  "stream (another dataset order or skipped records)")
    before = replace(cfg, n_edits=n_old, retention_fraction=prev.stream.retention_fraction, full_checkpoints=())
    if before.retention_size != cfg.retention_size:
        raise HyperparameterError(
            f"--extend-from {source}: its retention set is the first {before.retention_size} edits, this run's "
            f"the first {cfg.retention_size}; pass --retention-fraction {before.retention_size / cfg.n_edits:.6g} "
            "to keep re-scoring the same edits")
    scored = {math.ceil(e / cfg.batch_size) for e in prev.stream.full_checkpoints} | {before.n_batches}
    missing = [e for e in cfg.full_checkpoints if e <= n_old and math.ceil(e / cfg.batch_size) not in scored]
    if missing:
        raise HyperparameterError(f"--extend-from {source}: --score-all-at {missing} falls inside that run, "
                                  f"which re-scored every edit only after {sorted(b * cfg.batch_size for b in scored)}")
    for name in plan.methods:
        rec = old.methods.get(name)
        if rec is None or not rec.done:
            raise HyperparameterError(f"--extend-from {source}: {name} did not finish that run; a method joins a "
                                      "longer stream only from the finished shorter one")
        if (name in plan.shadows) != (name in prev.shadow):
            raise HyperparameterError(f"--extend-from {source}: {name} ran there "
                                      f"{'as a shadow' if name in prev.shadow else 'on its own values'}; "
                                      "it keeps that role in the longer stream")
        if not (source / "state" / name).is_dir():
            raise HyperparameterError(f"--extend-from {source}: no kept state {source / 'state' / name}; "
                                      "rerun that run with --keep-state")


def _extension(plan: RunPlan) -> Results:
    """The results of a new run that lengthens the finished run in ``plan.extend_from``: checked
    first (:func:`_check_extension`), then each method's kept state is copied to
    ``plan.state_root`` (the source is only read) and its record continues from the source's last
    batch; the source's final scores (every edit re-scored) become the full checkpoint at its
    last batch."""
    source = plan.extend_from
    assert source is not None
    old = load_results(source)
    if old is None:
        raise HyperparameterError(f"--extend-from {source}: no {RESULTS} there; name the folder of a finished run")
    _check_extension(source, old, plan)
    log.info("lengthening the %d-edit run in %s to %d edits", old.settings.stream.n_edits, source, plan.cfg.n_edits)
    results = Results(plan.settings, sessions=list(old.sessions), base=old.base)
    for name in plan.methods:
        target = plan.state_root / name
        partial = target.with_name(target.name + ".copying")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source / "state" / name, partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        rec = copy.deepcopy(old.methods[name])
        last = rec.checkpoints[-1]  # the last batch is always a checkpoint
        if last.all is None and rec.final is not None:
            last.all = rec.final.all
        rec.source_final = rec.final  # the source's fluency, GLUE and generation scores
        rec.truncate(rec.batches_done)
        results.methods[name] = rec
    return results
