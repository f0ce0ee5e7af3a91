"""Evaluation of sequential (lifelong) editing: metrics, data, the stream protocol, the benchmark.

- :mod:`.metrics`: CounterFact efficacy / generalization / specificity (and magnitudes), zsRE
  token accuracy, the generation check without teacher forcing, fluency (n-gram entropy), the
  unedited model's NLL of an edited model's generations and zero-shot GLUE accuracy;
- :mod:`.data`: the edit streams (CounterFact, zsRE), GLUE subsets and per-case scores;
- :mod:`.protocol`: a stream of N edits in batches of b on one model, per method, with
  immediate, retention and final scores and the weight deviation against the theory's bounds
  (:mod:`.protocol_config`: the stream; :mod:`.runners`: every method behind one interface);
- :mod:`.results`: what a run records, typed, with its versioned JSON form (:mod:`.records`);
- :mod:`.bench`: ``rlsedit bench`` (:mod:`.bench_config`: its settings; :mod:`.resume`: resuming
  and extending a run; :mod:`.report` writes its CSV/PNG/Markdown);
- :mod:`.plots`: the figures.
"""

from __future__ import annotations

from rlsedit_llm.editing.finetune import FineTuneEditor, target_nll
from rlsedit_llm.evaluation.data import DATASETS, case_scores, load_glue, load_stream
from rlsedit_llm.evaluation.metrics import (
    CF_METRICS,
    GLUE_TASKS,
    ZSRE_METRICS,
    continuation_nll,
    counterfact_case_scores,
    fluency,
    generation_check,
    glue_accuracy,
    greedy_generate,
    harmonic_mean,
    ngram_entropy,
    summarize_cases,
    zsre_case_scores,
)
from rlsedit_llm.evaluation.protocol import (
    MethodRunner,
    ProtocolConfig,
    make_runner,
    run_method,
)
from rlsedit_llm.evaluation.results import Checkpoint, MethodRecord, Results, load_results

__all__ = [
    "CF_METRICS",
    "ZSRE_METRICS",
    "GLUE_TASKS",
    "harmonic_mean",
    "ngram_entropy",
    "counterfact_case_scores",
    "zsre_case_scores",
    "summarize_cases",
    "greedy_generate",
    "generation_check",
    "fluency",
    "continuation_nll",
    "glue_accuracy",
    "FineTuneEditor",
    "target_nll",
    "DATASETS",
    "ProtocolConfig",
    "MethodRunner",
    "make_runner",
    "load_stream",
    "load_glue",
    "case_scores",
    "Results",
    "MethodRecord",
    "Checkpoint",
    "load_results",
    "run_method",
]
