"""Teacher-forced scoring of target strings after prompts.

One function serves the edit report (probability of the target before and after an edit) and the
evaluation metrics (length-normalised NLL comparisons, token accuracy). :func:`score_facts`
scores a batch of facts for an edit report in one such pass: the rewrite prompt always, the
paraphrases and neighbourhood prompts only where a fact carries them; :func:`rephrase_accuracy`
and :func:`locality_accuracy` turn those scores into EasyEdit's accuracies. Prompts and targets are
tokenised separately and concatenated (the prompt through
:func:`~rlsedit_llm.pipeline.tokens.encode_prompt`, with BOS in front where the family needs it;
the target through :func:`~rlsedit_llm.pipeline.facts.encode_target`), so the scored tokens are
exactly the tokens the value optimisation trains on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rlsedit_llm.adapters.residual import transform_logits
from rlsedit_llm.pipeline.facts import Fact, encode_target  # encode_target re-exported (editing/finetune.py)
from rlsedit_llm.pipeline.tokens import encode_prompt, input_device, needs_bos, pad_id, right_pad

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["TargetScore", "FactScores", "encode_target", "score_targets", "logits_at", "score_facts", "report_scores",
           "portability_accuracy",            "rephrase_accuracy", "locality_accuracy"]


@dataclass(frozen=True)
class TargetScore:
    """Per-token log-probabilities of a target and whether each token was the argmax."""

    token_logprobs: torch.Tensor  # (n_target_tokens,) float32, on CPU
    token_correct: torch.Tensor  # (n_target_tokens,) bool
    # (n_target_tokens,) int64: the teacher-forced argmax token at each target position
    # (filled by score_targets; None where a scorer does not keep it)
    token_argmax: torch.Tensor | None = None

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
        """Every target token is the teacher-forced argmax: the target is the top-1 (greedy)
        continuation of the prompt (the "acc" variants of CounterFact; an edit's success)."""
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
            argmax = lp.argmax(-1)
            scores.append(TargetScore(token_logprobs, argmax == tgt, argmax))
            start_tok += len(t)
    return scores


# ----------------------------------------------------------------------------------------------
# One batch of facts, scored for an edit report


@dataclass(frozen=True)
class FactScores:
    """One fact's teacher-forced scores at one moment (:func:`score_facts`): its target after the
    rewrite prompt, after each paraphrase, and each neighbourhood prompt's answer
    (:meth:`Fact.neighbourhood_answers`) after it (each empty unless asked for and carried by the
    fact; a neighbourhood prompt without an answer is skipped)."""

    rewrite: TargetScore
    paraphrases: tuple[TargetScore, ...] = ()
    neighbourhood: tuple[TargetScore, ...] = ()
    portability: tuple[TargetScore, ...] = ()  # each (prompt, answer) of Fact.portability


@torch.no_grad()
def score_facts(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, facts: Sequence[Fact], *,
                paraphrases: bool = True, neighbourhood: bool = True, portability: bool = True,
                batch_size: int = 16,
                scorer: Callable[..., list[TargetScore]] | None = None) -> list[FactScores]:
    """:class:`FactScores` of every fact, from one :func:`score_targets` pass over all the pairs.

    Always the target after the rewrite prompt; with ``paraphrases``, the target after each of
    the fact's paraphrase prompts; with ``neighbourhood``, each neighbourhood prompt's answer after
    it (:meth:`Fact.neighbourhood_answers`: ``neighbourhood_targets``, else
    ``neighbourhood_target``, else ``target_true``; a prompt without one is skipped); with
    ``portability``, each of the fact's ``portability`` answers after its prompt. A fact that
    carries neither costs exactly its rewrite prompt, so scoring plain facts costs what scoring
    their targets did. ``scorer``: the function called as ``score_targets`` is (None: it).
    """
    prompts: list[str] = []
    targets: list[str] = []
    where: list[tuple[int, str]] = []  # (fact, "rw" / "pp" / "nb" / "pt") of each pair
    for j, f in enumerate(facts):
        pairs = [("rw", f.text(), f.target)]
        if paraphrases:
            pairs += [("pp", p, f.target) for p in f.paraphrases]
        if neighbourhood:
            pairs += [("nb", p, a) for p, a in zip(f.neighbourhood, f.neighbourhood_answers(), strict=True)
                      if a is not None]
        if portability:
            pairs += [("pt", p, a) for p, a in f.portability]
        for kind, p, t in pairs:
            prompts.append(p)
            targets.append(t)
            where.append((j, kind))
    scores = (scorer or score_targets)(model, tokenizer, prompts, targets, batch_size=batch_size)
    parts: list[dict[str, list[TargetScore]]] = [{"rw": [], "pp": [], "nb": [], "pt": []} for _ in facts]
    for (j, kind), score in zip(where, scores, strict=True):
        parts[j][kind].append(score)
    return [FactScores(p["rw"][0], tuple(p["pp"]), tuple(p["nb"]), tuple(p["pt"])) for p in parts]


def report_scores(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, facts: Sequence[Fact], *,
                  after: bool, accuracies: bool = True,
                  scorer: Callable[..., list[TargetScore]] | None = None) -> list[FactScores]:
    """The scores an edit report needs, before (``after=False``) or after the write: always the
    rewrite prompt; with ``accuracies`` (``EditConfig.report_accuracies``) the neighbourhood
    prompts before and after (locality compares them) and, after, the paraphrase and portability
    prompts too."""
    return score_facts(model, tokenizer, facts, paraphrases=accuracies and after, neighbourhood=accuracies,
                       portability=accuracies and after, scorer=scorer)


def portability_accuracy(scores: FactScores) -> float | None:
    """EasyEdit's ``portability`` accuracy: the teacher-forced token accuracy of each portability
    answer after its prompt, averaged over the pairs; None when none was scored."""
    if not scores.portability:
        return None
    return sum(s.accuracy for s in scores.portability) / len(scores.portability)


def rephrase_accuracy(scores: FactScores) -> float | None:
    """EasyEdit's ``rephrase_acc``: the teacher-forced token accuracy of the target after each
    paraphrase prompt, averaged over the paraphrases; None when none was scored."""
    if not scores.paraphrases:
        return None
    return sum(s.accuracy for s in scores.paraphrases) / len(scores.paraphrases)


def locality_accuracy(before: FactScores, after: FactScores) -> float | None:
    """EasyEdit's ``locality`` accuracy: the share of neighbourhood-answer tokens (teacher forced,
    all neighbourhood prompts pooled) whose argmax token after the edit equals the argmax before
    it: "unchanged", not "equals the answer" (an answer the model never knew does not count
    against the edit). None when no neighbourhood prompt was scored."""
    if not after.neighbourhood:
        return None
    if len(before.neighbourhood) != len(after.neighbourhood):
        raise ValueError("before and after must score the same neighbourhood prompts")
    same = total = 0
    for b, a in zip(before.neighbourhood, after.neighbourhood, strict=True):
        if b.token_argmax is None or a.token_argmax is None:
            raise ValueError("locality needs the argmax tokens (scores from score_targets)")
        same += int((b.token_argmax == a.token_argmax).sum())
        total += len(a.token_argmax)
    return same / total
