"""EasyEdit's portability figure on rlsedit's facts.

EasyEdit scores a portability input (a prompt whose answer should follow from the edit: a subject
alias, a reasoning step) by the teacher-forced token accuracy of its answer: the answer is
appended to the prompt, and the figure is the share of answer tokens that are the model's argmax
at the position before them. :func:`portability_accuracy` computes it per fact, over the
``(prompt, answer)`` pairs of :attr:`Fact.portability <rlsedit_llm.pipeline.facts.Fact>` (which
:func:`~rlsedit_llm.pipeline.facts.from_easyedit` fills from ``portability_inputs``).

The answer tokens are those rlsedit scores everywhere (:func:`~rlsedit_llm.pipeline.facts.encode_target`:
``" " + answer.strip()`` encoded on its own, after the prompt encoded with the family's BOS),
where EasyEdit encodes ``prompt + " " + answer`` in one piece: for BPE tokenizers that split at
the space the tokens are the same.

Pure functions: the model is only read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from rlsedit_llm.errors import FactError
from rlsedit_llm.pipeline.scoring import score_targets

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from rlsedit_llm.pipeline.facts import Fact

__all__ = ["pair_accuracies", "portability_accuracy"]


def pair_accuracies(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
                    pairs: Sequence[tuple[str, str]], *, batch_size: int = 16) -> list[float]:
    """Per ``(prompt, answer)`` pair, the share of the answer's tokens that are the teacher-forced
    argmax after the prompt (EasyEdit's ``test_prediction_acc``), in ``[0, 1]``."""
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise FactError(f"a portability pair must be a (prompt, answer) tuple of strings; got {pair!r}")
        if not pair[1].strip():
            raise FactError(f"the answer to {pair[0]!r} is empty")
    if not pairs:
        return []
    scores = score_targets(model, tokenizer, [p for p, _ in pairs], [a for _, a in pairs], batch_size=batch_size)
    return [s.accuracy for s in scores]


def portability_accuracy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, facts: Sequence[Fact], *,
                         batch_size: int = 16) -> list[float]:
    """Per fact, the mean of :func:`pair_accuracies` over its :attr:`Fact.portability` pairs
    (NaN for a fact without any), all facts' pairs scored in one pass."""
    pairs = [pair for f in facts for pair in f.portability]
    accuracies = iter(pair_accuracies(model, tokenizer, pairs, batch_size=batch_size))
    out = []
    for f in facts:
        own = [next(accuracies) for _ in f.portability]
        out.append(sum(own) / len(own) if own else math.nan)
    return out
