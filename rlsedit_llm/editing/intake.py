"""The editor's checks of a batch beyond the facts themselves.

The facts are checked once, at the door of every editor call, by
:func:`~rlsedit_llm.pipeline.facts.checked_facts` (a :class:`~rlsedit_llm.pipeline.facts.FactBatch`
from there on, which the pipeline's stages do not check again). :func:`check_batch` then checks
the batch against the model's positions and, when the editor replaces earlier facts, refuses two
facts for one (subject, relation) in a batch. Each refusal is a :class:`~rlsedit_llm.errors.FactError` naming
the fact; nothing has been changed when it is raised.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rlsedit_llm.editing.config import EditConfig
from rlsedit_llm.editing.statistics import max_positions
from rlsedit_llm.errors import FactError
from rlsedit_llm.pipeline.facts import Fact, encode_target

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["check_batch", "fact_slot"]


def fact_slot(fact: Fact) -> tuple[str, str]:
    """What a later fact replaces: the same subject and relation (or prompt, without a relation)."""
    return (fact.subject, fact.relation_id or fact.prompt)


def check_batch(facts: list[Fact], tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module, config: EditConfig, *,
                replaces: bool) -> None:
    """Lengths within the model's positions; with ``replaces``, one fact per (subject, relation)."""
    limit = max_positions(model)
    margin = config.template_length + 8 if config.n_templates else 2  # context prefix, BOS
    for i, f in enumerate(facts):
        n = len(tokenizer(f.text(), add_special_tokens=True)["input_ids"]) + len(encode_target(tokenizer, f.target))
        if n + margin > limit:
            raise FactError(f"fact #{i} ({f.describe()}): prompt and target take {n} tokens, plus up to {margin} "
                            f"of context template; the model accepts {limit} positions. Shorten the prompt or target")
    if not replaces:
        return
    seen: dict[tuple[str, str], int] = {}
    for i, f in enumerate(facts):
        slot = fact_slot(f)
        if slot in seen:
            raise FactError(
                f"fact #{i} ({f.describe()}): same subject and relation as fact #{seen[slot]} in this batch. "
                f"With EditConfig(replace=True) a later fact for a (subject, relation) replaces the earlier "
                f"one, so a batch may hold only one; keep the one you want (or use replace=False)")
        seen[slot] = i
