"""Teacher-forced scoring of target strings after prompts.

One function serves the edit report (probability of the target before and after an edit) and the
evaluation metrics (length-normalised NLL comparisons, token accuracy). Prompts and targets are
tokenised separately and concatenated (the prompt through
:func:`~rlsedit_llm.pipeline.tokens.encode_prompt`, with BOS in front where the family needs it;
the target through :func:`~rlsedit_llm.pipeline.facts.encode_target`), so the scored tokens are
exactly the tokens the value optimisation trains on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rlsedit_llm.adapters.residual import transform_logits
from rlsedit_llm.pipeline.facts import encode_target  # re-exported: editing/finetune.py imports it here
from rlsedit_llm.pipeline.tokens import encode_prompt, input_device, needs_bos, pad_id, right_pad

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["TargetScore", "encode_target", "score_targets", "logits_at"]


@dataclass(frozen=True)
class TargetScore:
    """Per-token log-probabilities of a target and whether each token was the argmax."""

    token_logprobs: torch.Tensor  # (n_target_tokens,) float32, on CPU
    token_correct: torch.Tensor  # (n_target_tokens,) bool

    @property
    def logprob(self) -> float:
        """log P(target | prompt), the sum over tokens."""
        return float(self.token_logprobs.sum())

    @property
    def prob(self) -> float:
        return float(torch.exp(self.token_logprobs.sum()))

    @property
    def mean_nll(self) -> float:
        """Length-normalised negative log-likelihood (CounterFact's comparison statistic)."""
        return float(-self.token_logprobs.mean())

    @property
    def accuracy(self) -> float:
        """Share of target tokens that are the teacher-forced argmax (zsRE's metric)."""
        return float(self.token_correct.float().mean())

    @property
    def all_correct(self) -> bool:
        return bool(self.token_correct.all())


@torch.no_grad()
def logits_at(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
              positions: torch.Tensor) -> torch.Tensor:
    """``model(input_ids, attention_mask).logits[rows, positions]`` as float32 (N, vocab), with the
    LM head applied only at those N places: the base model's last hidden state there goes
    through the output embedding and the family's logit transform (Gemma 2 soft-capping, Granite
    ``logits_scaling``; the vocabulary projection is most of a small model's forward cost when
    every position is projected). Falls back to the full logits for a model without a
    separate base model and output embedding."""
    head = model.get_output_embeddings()  # type: ignore[operator]  # a transformers PreTrainedModel method
    base = getattr(model, "base_model", model)
    if head is None or base is model:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        return logits[rows.to(logits.device), positions.to(logits.device)].float()
    hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]  # (b, w, d)
    picked = hidden[rows.to(hidden.device), positions.to(hidden.device)]  # (N, d)
    return transform_logits(model, head(picked.to(head.weight.device))).float()


@torch.no_grad()
def score_targets(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                  targets: Sequence[str], *, batch_size: int = 16) -> list[TargetScore]:
    """Score ``targets[i]`` after ``prompts[i]`` (both lists of str, same length); prompts start
    with BOS where the model's family needs it (``needs_bos(model)``)."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    pad = pad_id(tokenizer)
    device = input_device(model)
    bos = needs_bos(model)
    scores: list[TargetScore] = []
    for start in range(0, len(prompts), batch_size):
        rows = []
        for prompt, target in zip(prompts[start:start + batch_size], targets[start:start + batch_size], strict=True):
            p = encode_prompt(tokenizer, prompt, bos=bos)
            t = encode_target(tokenizer, target)
            rows.append((p, t))
        ids, mask = right_pad([p + t for p, t in rows], pad, device)  # (b, w)
        # Only the positions predicting target tokens are projected onto the vocabulary.
        row_of = torch.cat([torch.full((len(t),), i) for i, (p, t) in enumerate(rows)])
        pos = torch.cat([torch.arange(len(p) - 1, len(p) + len(t) - 1) for p, t in rows])
        logp = torch.log_softmax(logits_at(model, ids, mask, row_of, pos), dim=-1).cpu()
        start_tok = 0
        for _, t in rows:
            lp, tgt = logp[start_tok:start_tok + len(t)], torch.tensor(t)  # (len(t), vocab)
            token_logprobs = lp[torch.arange(len(t)), tgt]
            scores.append(TargetScore(token_logprobs, lp.argmax(-1) == tgt))
            start_tok += len(t)
    return scores
