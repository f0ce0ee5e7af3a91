"""Evaluation of sequential (lifelong) editing: metrics, the stream protocol, baselines, the benchmark.

- :mod:`.metrics`: CounterFact efficacy / generalization / specificity (and magnitudes), zsRE
  token accuracy, the generation check without teacher forcing, fluency (n-gram entropy) and
  zero-shot GLUE accuracy;
- :mod:`.protocol`: a stream of N edits in batches of b on one model, per method, with
  immediate, retention and final scores and the weight deviation against the theory's bounds;
- :mod:`.finetune`: the plain fine-tuning baseline;
- :mod:`.bench`: ``rlsedit bench`` (resumable, JSON/CSV/PNG/Markdown output);
- :mod:`.plots`: the figures.
"""

from rlsedit_llm.editing.finetune import FineTuneEditor, target_nll
from rlsedit_llm.evaluation.metrics import (
    CF_METRICS,
    GLUE_TASKS,
    ZSRE_METRICS,
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
    DATASETS,
    MethodRunner,
    ProtocolConfig,
    deviation_report,
    load_glue,
    load_stream,
    make_runner,
    run_method,
)

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
    "glue_accuracy",
    "FineTuneEditor",
    "target_nll",
    "DATASETS",
    "ProtocolConfig",
    "MethodRunner",
    "make_runner",
    "load_stream",
    "load_glue",
    "deviation_report",
    "run_method",
]
