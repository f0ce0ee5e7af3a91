"""The token stream the key statistics sum over, planned before any forward pass.

Documents are tokenized in corpus order with ``add_special_tokens=False``. With
``overflow="split"`` a document longer than ``max_length`` tokens is cut into consecutive
windows of ``max_length`` tokens, each a sequence of its own; with ``overflow="truncate"`` only
its first window is kept. The stream stops after exactly ``max_tokens`` tokens (the last
sequence is cut short). Checkpoint positions are fixed here too, so an interrupted and a resumed
run cut the stream at the same sequences.

The planned stream never holds special tokens. For families whose prompts start with BOS
(Gemma: :func:`~rlsedit_llm.adapters.spec.needs_bos`) the hooked pass
(:mod:`~rlsedit_llm.pipeline.moment_pass`) puts ``Plan.bos`` in front of every sequence and leaves
that position out of the sums, so the model sees text as it does at edit time and the counted
tokens are the same.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from rlsedit_llm.errors import CorpusError, HyperparameterError
from rlsedit_llm.pipeline.corpus import iter_texts
from rlsedit_llm.pipeline.tokens import pad_id

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

__all__ = ["OVERFLOW", "Plan", "plan_sequences"]

#: What to do with a document longer than ``max_length``.
OVERFLOW = ("split", "truncate")


@dataclasses.dataclass
class Plan:
    """The global token stream: sequences of token ids and the checkpoints after some of them."""

    seqs: list[torch.Tensor]  # each (T_i,) int64, 1 <= T_i <= max_length
    checkpoints: list[int]  # sorted sequence indices after which partial sums are checkpointed
    n_tokens: int
    pad: int  # the tokenizer's pad id (:func:`~rlsedit_llm.pipeline.tokens.pad_id`)
    bos: int | None = None  # the tokenizer's BOS id, put in front of every sequence where the family needs it

    def tokens_before(self, index: int) -> int:
        return sum(int(s.numel()) for s in self.seqs[:index])


def plan_sequences(
    tokenizer: PreTrainedTokenizerBase, texts: datasets.Dataset | Iterable[str], *, max_tokens: int, max_length: int,
    overflow: str, checkpoint_every: float | None
) -> Plan:
    """Tokenize documents in order into sequences until exactly ``max_tokens`` tokens."""
    if overflow not in OVERFLOW:
        raise HyperparameterError(f"overflow must be one of {OVERFLOW}, got {overflow!r}")
    thresholds: list[int] = []
    if checkpoint_every:
        if not 0 < checkpoint_every < 1:
            raise HyperparameterError(f"checkpoint_every must be in (0, 1), got {checkpoint_every!r}")
        n_marks = int(1 / checkpoint_every) + 1
        thresholds = sorted({math.ceil(k * checkpoint_every * max_tokens) for k in range(1, n_marks)})
        thresholds = [t for t in thresholds if 0 < t < max_tokens]
    seqs: list[torch.Tensor] = []
    checkpoints: list[int] = []
    total = 0
    n_docs = 0
    docs = iter(iter_texts(texts))
    chunk_size = 4  # grows to 256: few documents are tokenized beyond what a small run needs
    while total < max_tokens:
        chunk = list(itertools.islice(docs, chunk_size))
        chunk_size = min(2 * chunk_size, 256)
        if not chunk:
            break
        for doc in chunk:
            if not isinstance(doc, str):
                raise CorpusError(f"corpus documents must be strings, got {type(doc).__name__}")
        chunk = [d for d in chunk if d.strip()]
        n_docs += len(chunk)
        if not chunk:
            continue
        kwargs = {"truncation": True, "max_length": max_length} if overflow == "truncate" else {}
        encoded = tokenizer(chunk, add_special_tokens=False, verbose=False, **kwargs)["input_ids"]
        for ids in encoded:
            for start in range(0, len(ids), max_length if overflow == "split" else max(len(ids), 1)):
                window = ids[start : start + max_length][: max_tokens - total]
                if not window:
                    continue
                seqs.append(torch.tensor(window, dtype=torch.int64))
                total += len(window)
                while thresholds and total >= thresholds[0]:
                    thresholds.pop(0)
                    if total < max_tokens:
                        checkpoints.append(len(seqs))  # checkpoint once len(seqs) sequences are done
                if total >= max_tokens:
                    break
            if total >= max_tokens:
                break
    if total < max_tokens:
        raise CorpusError(
            f"the corpus holds only {total} tokens in {n_docs} non-empty documents "
            f"(max_length={max_length}, overflow={overflow!r}), fewer than the {max_tokens} "
            "requested: lower the token count or use a larger corpus"
        )
    bos = getattr(tokenizer, "bos_token_id", None)
    return Plan(seqs=seqs, checkpoints=sorted(set(checkpoints)), n_tokens=total, pad=pad_id(tokenizer),
                bos=None if bos is None else int(bos))
