"""The evaluation data: edit streams (CounterFact, zsRE), GLUE subsets, and per-case scores."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from rlsedit_llm.errors import FactError, HyperparameterError
from rlsedit_llm.evaluation import metrics
from rlsedit_llm.files import DATA_DIR
from rlsedit_llm.pipeline.facts import Fact, as_fact, validate_facts

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

__all__ = ["DATASETS", "ZSRE_TARGETS", "data_dir", "stream_order", "load_stream", "load_glue", "case_scores"]

log = logging.getLogger(__name__)

#: ``counterfact``: the full schema (2,125 records: several paraphrase and neighbourhood prompts
#: each); ``counterfact_simple``: the simplified schema (21,567 records, one rephrase and one
#: locality prompt each, scored against the locality prompt's own ground truth) for long
#: streams (a different prompt set: its numbers do not compare with ``counterfact``'s);
#: ``zsre``: question answering (887 records).
DATASETS = ("counterfact", "counterfact_simple", "zsre")

_FILES = {"counterfact": "counterfact.json", "counterfact_simple": "counterfact_simple.json",
          "zsre": "zsre_eval.json"}

#: The object a zsRE edit writes: ``alt`` (EasyEdit's choice, this package's default: an
#: alternative answer, so the edit changes what the model says) or ``answer`` (MEMIT's and ROME's
#: released ``dsets/zsre.py``: ``answers[0]``, the record's first gold answer).
ZSRE_TARGETS = ("alt", "answer")


def stream_order(n_records: int, stream: int) -> list[int]:
    """The order in which stream ``stream`` reads a data set of ``n_records`` records.

    Stream 0 is the file order (the stream of every run recorded before streams existed). Stream
    ``s >= 1`` sorts the record indices ``i`` by the SHA-256 digest of ``"rlsedit-stream:{s}:{i}"``:
    a uniformly shuffled order that depends on the seed alone (no random generator, no library
    version), so the first ``N`` records of two streams are different records in a different order.
    """
    if isinstance(stream, bool) or not isinstance(stream, int) or stream < 0:
        raise HyperparameterError(f"stream must be an int >= 0 (0: the data set's file order); got {stream!r}")
    if stream == 0:
        return list(range(n_records))
    return sorted(range(n_records), key=lambda i: hashlib.sha256(f"rlsedit-stream:{stream}:{i}".encode()).digest())


def _zsre_fact(rec: dict, index: int, target: str) -> Fact | None:
    """The fact of zsRE record ``index`` editing toward ``target`` (:data:`ZSRE_TARGETS`); None
    when the record has no gold answer to write (``answer``)."""
    fact = as_fact({**rec, "case_id": index})
    if target == "alt":
        return fact
    answers = [a for a in rec.get("answers") or () if isinstance(a, str) and a.strip()]
    if not answers:
        return None
    # MEMIT's record: target_new = answers[0], and no known "true" object (it scores against EOS).
    return replace(fact, target=answers[0], target_true=None)


def data_dir() -> Path:
    """``rlsedit_llm/data`` (the shipped evaluation files; licences in its README.md)."""
    return DATA_DIR


def load_stream(dataset: str, n_edits: int, tokenizer: PreTrainedTokenizerBase | None = None, *,
                path: str | os.PathLike[str] | None = None, batch_size: int | None = None, stream: int = 0,
                zsre_target: str = "alt") -> list[Fact]:
    """The first ``n_edits`` usable records of a data set, as facts, in the order of ``stream``
    (:func:`stream_order`; 0, the default, is the file order).

    With ``batch_size``, a record that repeats the prompt and subject of an earlier record of
    the same batch (of ``batch_size`` consecutive facts) is skipped: one editor call takes one
    target per question. A question asked again in a later batch stays, as a re-edit (simplified
    CounterFact has a few such pairs with other targets; the earlier case is then scored against
    a target the model was later told to replace).

    ``dataset`` is one of :data:`DATASETS` (the shipped files, or ``path``). zsRE records
    get ``case_id`` = their index in the file, and edit toward ``zsre_target`` (one of
    :data:`ZSRE_TARGETS`; with ``"answer"`` a record without a gold answer is skipped). With a
    ``tokenizer``, records whose fact the
    tokenizer cannot represent (:func:`~rlsedit_llm.pipeline.facts.validate_facts`) are skipped and
    logged. Raises :class:`HyperparameterError` if fewer than ``n_edits`` records are usable.
    """
    if dataset not in DATASETS:
        raise HyperparameterError(f"dataset must be one of {DATASETS}; got {dataset!r}")
    if not isinstance(n_edits, int) or n_edits < 1:
        raise HyperparameterError(f"n_edits must be an int >= 1; got {n_edits!r}")
    if zsre_target not in ZSRE_TARGETS:
        raise HyperparameterError(f"zsre_target must be one of {ZSRE_TARGETS} (alt: EasyEdit's, answer: MEMIT's "
                                  f"answers[0]); got {zsre_target!r}")
    records = json.loads(Path(path or data_dir() / _FILES[dataset]).read_text(encoding="utf-8"))
    facts: list[Fact] = []
    seen: set[tuple[str, str]] = set()
    skipped = repeats = 0
    for i in stream_order(len(records), stream):
        rec = records[i]
        if dataset == "zsre":
            got = _zsre_fact(rec, i, zsre_target)
            if got is None:
                skipped += 1
                log.info("skipping record %s: no gold answer to write (zsre_target='answer')", i)
                continue
            fact = got
        else:
            fact = as_fact(rec)
        if batch_size and len(facts) % batch_size == 0:
            seen = set()  # a new batch
        question = (fact.prompt, fact.subject)
        if batch_size and question in seen:
            repeats += 1
            log.info("skipping record %s: it repeats the prompt and subject of a record in its batch", fact.case_id)
            continue
        if tokenizer is not None:
            try:
                validate_facts([fact], tokenizer)
            except FactError as exc:
                skipped += 1
                log.info("skipping record %s: %s", fact.case_id, exc)
                continue
        facts.append(fact)
        seen.add(question)
        if len(facts) == n_edits:
            break
    if repeats:
        log.warning("%s: skipped %d record(s) that repeat the prompt and subject of a record in their batch",
                    dataset, repeats)
    if skipped:
        log.warning("%s: skipped %d record(s) the tokenizer cannot represent (or, zsRE toward 'answer', "
                    "without an answer)", dataset, skipped)
    if len(facts) < n_edits:
        raise HyperparameterError(
            f"{dataset} has only {len(facts)} usable records; ask for at most that many edits")
    return facts


def load_glue(task: str, n_items: int) -> list[dict]:
    """The first ``n_items`` items of a shipped GLUE subset (sst2, mrpc, cola, rte; 200 each)."""
    if task not in metrics.GLUE_TASKS:
        raise HyperparameterError(f"unknown GLUE task {task!r}; choose from {sorted(metrics.GLUE_TASKS)}")
    items = json.loads((data_dir() / "glue" / f"{task}.json").read_text(encoding="utf-8"))
    return items[:n_items]


def case_scores(dataset: str, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, facts: Sequence[Fact], *,
                batch_size: int = 32) -> list[dict]:
    """Per-case metrics of ``facts`` on the model as it is now (CounterFact, either schema, or zsRE)."""
    if not facts:
        return []
    if dataset in ("counterfact", "counterfact_simple"):
        return metrics.counterfact_case_scores(model, tokenizer, facts, batch_size=batch_size)
    return metrics.zsre_case_scores(model, tokenizer, facts, batch_size=batch_size)
