"""Editing metrics: CounterFact, zsRE, generation checks, fluency and zero-shot GLUE accuracy.

The definitions follow the MEMIT-lineage evaluation (see ``docs/llm/benchmarks.md``):

CounterFact, per case (``nll`` = length-normalised negative log-likelihood of ``" " + target``
after the prompt, teacher forced, :attr:`TargetScore.mean_nll`; ``p = exp(-nll)``):

- efficacy       ``1[nll(new) < nll(true)]`` on the rewrite prompt;
- generalization the same, averaged over the case's paraphrase prompts;
- specificity    ``1[nll(true) < nll(new)]`` averaged over the neighbourhood prompts;
- magnitudes     ``p(new) - p(true)`` (``p(true) - p(new)`` for specificity), same averaging;
- ``*_acc``      every target token is the teacher-forced argmax (``target_new`` on rewrite and
  paraphrase prompts, ``target_true`` on neighbourhood prompts);
- wild           greedy decoding (no teacher forcing) of the rewrite prompt starts with the target.

Aggregates are means over cases; ``score`` is the harmonic mean of efficacy, generalization and
specificity. zsRE, per case: teacher-forced top-1 token accuracy of ``alt`` after ``src``
(efficacy) and after ``rephrase`` (generalization), and of ``loc_ans`` after ``loc + "?"``
(specificity, absolute; about 25 % even before editing). Fluency is the weighted 2-/3-gram
entropy of generations, drawn by one of two protocols (:func:`fluency_texts`): ``rome``, the
literature's (top-5 sampling to a fixed length, no early stop, Treebank-style words, as ROME's
released ``generate_fast`` and ``n_gram_entropy``), or ``greedy-eos`` (greedy, stopped at
end-of-sequence, words and punctuation by a regular expression). The generation NLL is those
generations' mean per-token negative log-likelihood under the unedited model (high for incoherent
text, which entropy cannot tell from varied prose). Scores are fractions in ``[0, 1]`` (fluency in
bits); tables multiply by 100.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rlsedit_llm.errors import HyperparameterError
from rlsedit_llm.pipeline.facts import Fact, encode_target
from rlsedit_llm.pipeline.moment_pass import progress_bar
from rlsedit_llm.pipeline.scoring import TargetScore, logits_at
from rlsedit_llm.pipeline.tokens import encode_prompt, input_device, needs_bos, pad_id, right_pad

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "harmonic_mean",
    "ngram_entropy",
    "treebank_words",
    "rome_text",
    "sample_generate",
    "fluency_texts",
    "fluency_entropy",
    "score_pairs",
    "counterfact_case_scores",
    "zsre_case_scores",
    "summarize_cases",
    "greedy_generate",
    "generation_check",
    "generate_texts",
    "text_fluency",
    "fluency",
    "continuation_nll",
    "GLUE_TASKS",
    "glue_prompt",
    "glue_accuracy",
    "CF_METRICS",
    "ZSRE_METRICS",
    "scoring_progress",
]

#: Per-case metric names of each data set (the first three enter the harmonic ``score``).
CF_METRICS = ("efficacy", "generalization", "specificity", "efficacy_magnitude",
              "generalization_magnitude", "specificity_magnitude", "efficacy_acc",
              "generalization_acc", "specificity_acc")
ZSRE_METRICS = ("efficacy", "generalization", "specificity")

#: Seconds a scoring pass runs before its progress bar appears (a short one shows none).
PROGRESS_DELAY = 5.0
_PROGRESS: contextvars.ContextVar[bool] = contextvars.ContextVar("rlsedit_scoring_progress", default=True)


@contextlib.contextmanager
def scoring_progress(enabled: bool) -> Iterator[None]:
    """Within the block, the scoring passes (:func:`score_pairs`, :func:`greedy_generate`) show a
    progress bar (``enabled``, the default outside any block) or none. A bar appears only once a
    pass has run :data:`PROGRESS_DELAY` seconds and is removed when it ends; ``TQDM_DISABLE`` in the
    environment switches it off too. The benchmark's ``--quiet`` and ``run_method(progress=False)``
    use this."""
    token = _PROGRESS.set(bool(enabled))
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def _scoring_bar(total: int, desc: str):
    return progress_bar(_PROGRESS.get(), total=total, desc=desc, unit="seq", leave=False, delay=PROGRESS_DELAY)


# ----------------------------------------------------------------------------------------------
# Small pure functions


def harmonic_mean(values: Iterable[float]) -> float:
    """Harmonic mean of non-negative numbers; ``0`` if any is ``0`` (and for an empty input)."""
    values = [float(v) for v in values]
    if not values or any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


_WORD = re.compile(r"\w+|[^\w\s]")


#: Penn-Treebank-style word splitting (:func:`treebank_words`), in order of precedence.
_TREEBANK = re.compile(r"""
      (?:[^\W\d_]\.){2,}            # abbreviations of single letters: U.S., e.g.
    | \d+(?:[.,:/]\d+)+              # numbers with separators: 1,000  3.5  10:30  1/2
    | \w+(?=n't\b)                   # the word before a negation clitic: do|n't, ca|n't
    | n't\b
    | '(?:s|m|d|ll|re|ve)\b          # clitics: 's 'm 'd 'll 're 've
    | \.\.\.|--|``|''
    | \w+
    | [^\w\s]                          # any other mark, alone
""", re.VERBOSE | re.IGNORECASE)
_OPENING = "([{<\u201c"


def treebank_words(text: str) -> list[str]:
    """Words of ``text`` split by the Penn Treebank conventions that ``nltk.word_tokenize`` (ROME's
    fluency tokenizer) follows, without NLTK or its sentence model: clitics are their own tokens
    (``do n't``, ``John 's``), numbers keep their separators (``1,000``, ``3.5``), abbreviations
    of single letters keep their periods (``U.S.``), every other punctuation mark, including a
    sentence's period, stands alone, and a double quote becomes ````` `` ````` when it opens
    (at the start or after a space or bracket) and ``''`` otherwise.

    It differs from ``nltk.word_tokenize`` where the Punkt model would keep a period inside a
    longer abbreviation (``Mr.``, ``Inc.``), on NLTK's splits of ``cannot``/``gonna``-like words,
    and on rare Unicode punctuation.
    """
    words = []
    for m in _TREEBANK.finditer(text):
        word = m.group()
        if word == '"':
            before = text[m.start() - 1] if m.start() else " "
            word = "``" if before.isspace() or before in _OPENING else "''"
        words.append(word)
    return words


def rome_text(text: str) -> str:
    """A generation as ROME's released ``generate_fast`` returns it for scoring: Unicode NFKD
    normalised and every blank line (``"\n\n"``) turned into a space (its removal of the
    ``<|endoftext|>`` string is done here by decoding without special tokens)."""
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3), *,
                  words: str = "regex") -> float:
    """Weighted n-gram entropy of a text (the fluency statistic), in bits.

    The text is split into words and punctuation marks (``words="regex"``: the regular expression
    ``\\w+|[^\\w\\s]``; ``"treebank"``: :func:`treebank_words`); for each ``n`` the entropy
    ``H_n = -sum_g f_g log2 f_g`` of the empirical n-gram frequencies ``f`` is weighted by
    ``weights[i]`` and the weighted entropies are averaged: ``mean_i(w_i H_{n_i})``. A text with
    fewer than ``n`` words contributes ``H_n = 0``. Repetitive text scores low.
    """
    if len(ns) != len(weights) or not ns:
        raise HyperparameterError("ns and weights must be non-empty and of equal length")
    if words not in ("regex", "treebank"):
        raise HyperparameterError(f"words must be 'regex' or 'treebank'; got {words!r}")
    tokens = _WORD.findall(text) if words == "regex" else treebank_words(text)
    terms = []
    for n, w in zip(ns, weights, strict=False):
        grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        terms.append(w * h)
    return sum(terms) / len(terms)


@torch.no_grad()
def score_pairs(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                targets: Sequence[str], *, batch_size: int = 32) -> list[Any]:
    """:func:`~rlsedit_llm.pipeline.scoring.score_targets` of every ``(prompts[i], targets[i])``, in
    input order, with as few forward passes as the pairs allow.

    Each distinct prompt is run once per distinct multi-token target (the prompt followed by the
    target without its last token: causal attention makes the rest irrelevant), or once alone
    when all its targets are single tokens; single-token targets (and the first token of any
    target) are read from the distribution after the prompt's last token of whichever of the
    prompt's sequences ran. CounterFact's two targets of one prompt therefore cost one forward
    whenever at most one of them is multi-token. Sequences are batched in order of token length,
    so a batch carries little padding. The result equals :func:`score_targets` up to float
    round-off (tested); ``benchmarks/scoring_speed.py`` measures the speed-up.
    """
    if len(prompts) != len(targets):
        raise HyperparameterError(f"{len(prompts)} prompts but {len(targets)} targets")
    ids = [tuple(encode_target(tokenizer, t)) for t in targets]
    bos = needs_bos(model)
    groups: dict[str, list[int]] = {}  # prompt -> indices of its pairs
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)

    # The sequences to run: (prompt tokens, continuation tokens, pairs read from this sequence).
    seqs: list[tuple[list[int], tuple[int, ...], list[int]]] = []
    for prompt, pairs in groups.items():
        p_ids = encode_prompt(tokenizer, prompt, bos=bos)
        by_target: dict[tuple[int, ...], list[int]] = {}
        for i in pairs:
            by_target.setdefault(ids[i] if len(ids[i]) > 1 else (), []).append(i)
        single = by_target.pop((), [])
        if not by_target:
            seqs.append((p_ids, (), single))
        for k, (target, readers) in enumerate(by_target.items()):
            seqs.append((p_ids, target[:-1], readers + (single if k == 0 else [])))

    out: list[TargetScore | None] = [None] * len(prompts)
    pad, device = pad_id(tokenizer), input_device(model)
    order = sorted(range(len(seqs)), key=lambda j: len(seqs[j][0]) + len(seqs[j][1]))
    with _scoring_bar(len(order), "scoring") as bar:
        for start in range(0, len(order), batch_size):
            batch = [seqs[j] for j in order[start:start + batch_size]]
            ids_, mask = right_pad([p + list(c) for p, c, _ in batch], pad, device)  # (b, w)
            # Only the positions that predict target tokens go through the LM head.
            rows = torch.cat([torch.full((len(c) + 1,), r) for r, (_, c, _) in enumerate(batch)])
            pos = torch.cat([torch.arange(len(p) - 1, len(p) + len(c)) for p, c, _ in batch])
            logp = torch.log_softmax(logits_at(model, ids_, mask, rows, pos), dim=-1).cpu()  # (N, vocab)
            first = 0
            for _prompt, c, readers in batch:
                block = logp[first:first + len(c) + 1]  # (len(c) + 1, vocab): after the prompt, then after each token
                for i in readers:
                    tgt = torch.tensor(ids[i])
                    lp = block[: len(tgt)]
                    out[i] = TargetScore(lp[torch.arange(len(tgt)), tgt].clone(), lp.argmax(-1) == tgt)
                first += len(c) + 1
            bar.update(len(batch))
    return out


@torch.no_grad()
def _last_token_logits(model, tokenizer, prompts: Sequence[str], *, batch_size: int):
    """Yield ``(indices, logits)``: the next-token logits (b, vocab) float32 after
    ``prompts[i]`` for each ``i`` of ``indices``, in batches of similar length (no special
    tokens, right padding: the positions :func:`score_targets` reads)."""
    pad, device = pad_id(tokenizer), input_device(model)
    encoded = [encode_prompt(tokenizer, p, bos=needs_bos(model)) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids, mask = right_pad([encoded[i] for i in rows], pad, device)  # (b, w)
        last = torch.tensor([len(encoded[i]) - 1 for i in rows])
        yield rows, logits_at(model, ids, mask, torch.arange(len(rows)), last)


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


# ----------------------------------------------------------------------------------------------
# CounterFact and zsRE (teacher forced)


def counterfact_case_scores(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, facts: Sequence[Fact], *,
                            batch_size: int = 32) -> list[dict]:
    """Per-case CounterFact metrics (see the module docstring) of ``facts`` on ``model``.

    Each fact needs ``target_true``; paraphrase and neighbourhood prompts may be empty (the
    corresponding metrics are then NaN). At the neighbourhood prompts the new target competes
    with that prompt's answer where the record gives one (:meth:`Fact.neighbourhood_answers`:
    EasyEdit's per-prompt ``neighbourhood_targets``, simplified CounterFact's
    ``locality_ground_truth``), else with ``target_true`` (full CounterFact: the neighbours share
    the relation and the true object). Returns one dict per fact with ``case_id`` and
    :data:`CF_METRICS`.
    """
    prompts: list[str] = []
    targets: list[str] = []
    where: list[tuple[int, str, str]] = []  # (case, kind, which target)
    for c, f in enumerate(facts):
        if f.target_true is None:
            raise HyperparameterError(f"CounterFact scoring needs target_true ({f.describe()})")
        answers = {"rw": (f.target_true,), "pp": (f.target_true,) * len(f.paraphrases),
                   "nb": tuple(a if a is not None else f.target_true for a in f.neighbourhood_answers())}
        for kind, ps in (("rw", (f.text(),)), ("pp", f.paraphrases), ("nb", f.neighbourhood)):
            for p, true in zip(ps, answers[kind], strict=True):
                for which, t in (("new", f.target), ("true", true)):
                    prompts.append(p)
                    targets.append(t)
                    where.append((c, kind, which))
    scores = score_pairs(model, tokenizer, prompts, targets, batch_size=batch_size)
    # Collect (nll_new, nll_true, acc_new, acc_true) per prompt; the two targets alternate.
    per: list[dict[str, list[tuple[float, float, bool, bool]]]] = [{"rw": [], "pp": [], "nb": []} for _ in facts]
    for j in range(0, len(scores), 2):
        (c, kind, _), new, true = where[j], scores[j], scores[j + 1]
        per[c][kind].append((new.mean_nll, true.mean_nll, new.all_correct, true.all_correct))
    out = []
    for f, got in zip(facts, per, strict=False):
        row: dict[str, Any] = {"case_id": f.case_id}
        for kind, name in (("rw", "efficacy"), ("pp", "generalization")):
            row[name] = _mean(float(n < t) for n, t, _, _ in got[kind])
            row[name + "_magnitude"] = _mean(math.exp(-n) - math.exp(-t) for n, t, _, _ in got[kind])
            row[name + "_acc"] = _mean(float(a) for _, _, a, _ in got[kind])
        row["specificity"] = _mean(float(t < n) for n, t, _, _ in got["nb"])
        row["specificity_magnitude"] = _mean(math.exp(-t) - math.exp(-n) for n, t, _, _ in got["nb"])
        row["specificity_acc"] = _mean(float(b) for _, _, _, b in got["nb"])
        out.append(row)
    return out


def zsre_locality_prompt(question: str) -> str:
    """zsRE's neighbourhood prompt: the NQ question (``"nq question: ..."``) with a ``"?"``."""
    return question if question.rstrip().endswith("?") else question + "?"


def zsre_case_scores(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, facts: Sequence[Fact], *,
                     batch_size: int = 32) -> list[dict]:
    """Per-case zsRE metrics: teacher-forced top-1 token accuracy of the target after the rewrite
    prompt (efficacy) and the paraphrase (generalization), and of the NQ answer after the NQ
    question (specificity). Each fact needs ``neighbourhood`` (the ``loc`` question) and
    ``neighbourhood_target`` (``loc_ans``)."""
    prompts: list[str] = []
    targets: list[str] = []
    where: list[tuple[int, str]] = []
    for c, f in enumerate(facts):
        items = [("efficacy", f.text(), f.target)]
        items += [("generalization", p, f.target) for p in f.paraphrases]
        loc_ans = f.neighbourhood_target
        if f.neighbourhood and loc_ans is None:
            raise HyperparameterError(f"zsRE scoring needs neighbourhood_target (loc_ans) ({f.describe()})")
        items += [("specificity", zsre_locality_prompt(p), loc_ans) for p in f.neighbourhood if loc_ans is not None]
        for kind, p, t in items:
            prompts.append(p)
            targets.append(t)
            where.append((c, kind))
    scores = score_pairs(model, tokenizer, prompts, targets, batch_size=batch_size)
    per: list[dict[str, list[float]]] = [{k: [] for k in ZSRE_METRICS} for _ in facts]
    for (c, kind), s in zip(where, scores, strict=False):
        per[c][kind].append(s.accuracy)
    return [{"case_id": f.case_id, **{k: _mean(v) for k, v in p.items()}} for f, p in zip(facts, per, strict=False)]


def summarize_cases(rows: Sequence[dict], keys: Sequence[str] | None = None) -> dict:
    """Mean of each metric over cases (NaNs skipped) and the harmonic ``score`` of
    efficacy, generalization and specificity. ``n`` is the number of cases."""
    if keys is None:
        keys = [k for k in (rows[0] if rows else {}) if k != "case_id"]
    out: dict[str, float] = {"n": len(rows)}
    for k in keys:
        vals = [r[k] for r in rows if r.get(k) is not None and not math.isnan(r[k])]
        out[k] = _mean(vals)
    parts = [out.get(k, math.nan) for k in ("efficacy", "generalization", "specificity")]  # NaN: missing
    if not any(math.isnan(p) for p in parts):
        out["score"] = harmonic_mean(parts)
    return out


# ----------------------------------------------------------------------------------------------
# Generation (no teacher forcing)


@torch.no_grad()
def _left_padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded to the longest: ids and attention mask, each (b, width) int64."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[r, width - len(row):] = 1
    return ids, mask


def greedy_generate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                    max_new_tokens: int, *, batch_size: int = 16, stop_at_eos: bool = True) -> list[list[int]]:
    """Greedy continuations (token ids, prompt excluded) of ``prompts``.

    Prompts are encoded without special tokens and left padded in batches; the continuation of a
    row stops at the tokenizer's EOS token when ``stop_at_eos`` (the EOS is not returned).
    """
    if max_new_tokens < 1:
        raise HyperparameterError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
    pad = pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    device = input_device(model)
    encoded = [encode_prompt(tokenizer, p, bos=needs_bos(model)) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[list[int] | None] = [None] * len(prompts)
    with _scoring_bar(len(order), "generating") as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            ids, mask = _left_padded([encoded[i] for i in rows], pad)
            width = ids.shape[1]
            gen = model.generate(  # type: ignore[operator]  # a transformers PreTrainedModel method
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                min_new_tokens=0, do_sample=False, temperature=None, top_p=None, top_k=None,
                pad_token_id=pad, eos_token_id=eos if stop_at_eos else None,
            )[:, width:].cpu()  # (b, <= max_new_tokens)
            for r, i in enumerate(rows):
                seq = gen[r].tolist()
                if stop_at_eos and eos is not None and eos in seq:
                    seq = seq[: seq.index(eos)]
                out[i] = seq
            bar.update(len(rows))
    return out  # type: ignore[return-value]


def _cache_argument(model: torch.nn.Module) -> str:
    """The name under which ``model``'s forward takes, and its output returns, the key/value cache:
    ``cache`` (transformers 5.x) or ``past_key_values`` (before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def sample_generate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], length: int,
                    *, rng: np.random.Generator, top_k: int = 5, batch_size: int = 16) -> list[list[int]]:
    """Top-``k`` sampled continuations (token ids, prompt excluded) of ``prompts``, each to a
    total of ``length`` tokens with its prompt (none when the prompt is that long already), with
    no early stop: ROME's released ``generate_fast`` (``top_k=5``, ``max_out_len=100``).

    At each step the next token is drawn from the ``top_k`` most probable tokens, their
    probabilities renormalised. The draws come from ``rng`` only (no global random state): one
    child generator per prompt, seeded by ``rng``, whose uniforms pick the token by inverse CDF, so a
    prompt's generation does not depend on the batch it runs in, and the same ``rng`` seed gives
    the same draws to every model (common random numbers, for paired comparisons). Prompts are
    encoded without special tokens, left padded, with positions counted from each row's first
    token.
    """
    if not isinstance(rng, np.random.Generator):
        raise HyperparameterError(f"rng must be a numpy Generator, e.g. np.random.default_rng(seed); "
                                  f"got {type(rng).__name__}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise HyperparameterError(f"top_k must be an int >= 1; got {top_k!r}")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise HyperparameterError(f"length must be an int >= 1 (tokens of prompt plus generation); got {length!r}")
    pad, device = pad_id(tokenizer), input_device(model)
    encoded = [encode_prompt(tokenizer, p, bos=needs_bos(model)) for p in prompts]
    n_new = [max(0, length - len(e)) for e in encoded]
    seeds = rng.integers(0, 2**63 - 1, size=len(prompts))  # one child generator per prompt
    uniforms = [np.random.default_rng(int(seed)).random(n) for seed, n in zip(seeds, n_new, strict=True)]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[list[int]] = [[] for _ in prompts]
    cache_arg = _cache_argument(model)
    with _scoring_bar(len(order), "sampling") as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            steps = max(n_new[i] for i in rows)
            if steps == 0:
                bar.update(len(rows))
                continue
            ids, mask = _left_padded([encoded[i] for i in rows], pad)
            ids, mask = ids.to(device), mask.to(device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            draws = torch.tensor([[u[t] if t < len(u) else 0.0 for t in range(steps)] for u in
                                  (uniforms[i] for i in rows)], dtype=torch.float64)  # (b, steps)
            past, step_ids, tokens = None, ids, []
            for t in range(steps):
                got = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                            **({} if past is None else {cache_arg: past}))
                past = got[cache_arg]
                probs = torch.softmax(got.logits[:, -1, :].double(), dim=-1)  # (b, vocab)
                top_p, top_i = probs.topk(top_k, dim=-1)  # (b, k)
                cdf = (top_p / top_p.sum(-1, keepdim=True)).cumsum(-1).cpu()
                pick = (cdf < draws[:, t:t + 1]).sum(-1).clamp(max=top_k - 1)  # first index with cdf >= u
                step_ids = top_i.gather(1, pick.to(top_i.device)[:, None])  # (b, 1)
                tokens.append(step_ids.cpu())
                mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
                positions = positions[:, -1:] + 1
            gen = torch.cat(tokens, dim=1)  # (b, steps)
            for r, i in enumerate(rows):
                out[i] = gen[r, :n_new[i]].tolist()
            bar.update(len(rows))
    return out


def fluency_texts(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                  protocol: str, tokens: int, *, seed: int = 0, batch_size: int = 16) -> list[str]:
    """The decoded continuations (prompt excluded) that fluency scores under ``protocol``:
    ``"rome"``: :func:`sample_generate` to ``tokens`` tokens of prompt plus generation, its draws
    from ``np.random.default_rng(seed)``, decoded without special tokens (ROME drops the
    ``<|endoftext|>`` text); ``"greedy-eos"``: :func:`generate_texts` of at most ``tokens`` new
    tokens."""
    if protocol == "rome":
        ids = sample_generate(model, tokenizer, prompts, tokens, rng=np.random.default_rng(seed),
                              batch_size=batch_size)
        return [tokenizer.decode(g, skip_special_tokens=True) for g in ids]  # type: ignore[misc]
    if protocol == "greedy-eos":
        return generate_texts(model, tokenizer, prompts, tokens, batch_size=batch_size)
    raise HyperparameterError(f"unknown fluency protocol {protocol!r}; choose 'rome' or 'greedy-eos'")


def fluency_entropy(prompt: str, continuation: str, protocol: str) -> float:
    """The fluency statistic of one generation under ``protocol`` (bits): ``"rome"``: the
    Treebank-word entropy of :func:`rome_text` of prompt plus continuation; ``"greedy-eos"``: the
    regular-expression-word entropy of prompt plus continuation (:func:`ngram_entropy`)."""
    if protocol == "rome":
        return ngram_entropy(rome_text(prompt + continuation), words="treebank")
    if protocol == "greedy-eos":
        return ngram_entropy(prompt + continuation)
    raise HyperparameterError(f"unknown fluency protocol {protocol!r}; choose 'rome' or 'greedy-eos'")


def generation_check(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, facts: Sequence[Fact], *,
                     extra_tokens: int = 0, batch_size: int = 16) -> list[float]:
    """Per fact: 1.0 if greedy decoding of the rewrite prompt (no teacher forcing) starts with the
    target, else 0.0. Decodes as many tokens as the target has (plus ``extra_tokens``) and compares
    the whitespace-stripped texts."""
    n = max(len(encode_target(tokenizer, f.target)) for f in facts) + extra_tokens if facts else 1
    gens = greedy_generate(model, tokenizer, [f.text() for f in facts], n, batch_size=batch_size)
    return [float(tokenizer.decode(g).strip().startswith(f.target.strip())) for f, g in zip(facts, gens, strict=False)]  # type: ignore[union-attr]


def generate_texts(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                   max_new_tokens: int, *, batch_size: int = 16) -> list[str]:
    """The decoded greedy continuations (:func:`greedy_generate`, prompt excluded) of ``prompts``."""
    return [tokenizer.decode(g) for g in greedy_generate(model, tokenizer, prompts, max_new_tokens,  # type: ignore[misc]
                                                         batch_size=batch_size)]


def text_fluency(prompts: Sequence[str], continuations: Sequence[str]) -> float:
    """Mean weighted n-gram entropy (:func:`ngram_entropy`) of ``prompts[i] + continuations[i]``
    (bits; NaN for no texts)."""
    return _mean(ngram_entropy(p + c) for p, c in zip(prompts, continuations, strict=False))


def fluency(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *,
            max_new_tokens: int = 100, batch_size: int = 16) -> float:
    """Mean weighted n-gram entropy (:func:`ngram_entropy`) of prompt + greedy continuation of
    ``max_new_tokens`` tokens, over ``prompts`` (bits; the published tables show x100).

    Entropy measures repetition only: incoherent text scores as high as varied prose, or higher.
    Read it with :func:`continuation_nll` of the same generations under the unedited model."""
    if not prompts:
        return float("nan")
    return text_fluency(prompts, generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size=batch_size))


@torch.no_grad()
def continuation_nll(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                     continuations: Sequence[str], *, batch_size: int = 8) -> list[float]:
    """Per pair: the mean negative log-likelihood, in nats per token, of the text
    ``continuations[i]`` right after ``prompts[i]``, teacher forced (NaN for an empty continuation).

    The continuation is encoded as it stands (no space added, no special tokens), so a decoded
    greedy generation is scored as text. Given the *unedited* model and an edited model's
    generations, it says how natural that text is to the pre-trained model: incoherent text scores
    high, where its n-gram entropy (:func:`fluency`) scores high too, as if it were varied prose;
    repetitive text scores low on both.
    """
    if len(prompts) != len(continuations):
        raise HyperparameterError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    bos = needs_bos(model)
    pairs = []
    for p, c in zip(prompts, continuations, strict=False):
        c_ids = tokenizer.encode(c, add_special_tokens=False)
        if c_ids and c_ids[0] == tokenizer.bos_token_id:  # tokenizers that add BOS regardless
            c_ids = c_ids[1:]
        pairs.append((encode_prompt(tokenizer, p, bos=bos), c_ids))
    out = [float("nan")] * len(pairs)
    pad, device = pad_id(tokenizer), input_device(model)
    todo = sorted((i for i, (_, c) in enumerate(pairs) if c), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        ids, mask = right_pad([pairs[i][0] + pairs[i][1] for i in batch], pad, device)  # (b, w)
        # The positions that predict each continuation token: the prompt's last, then each but the last.
        rows = torch.cat([torch.full((len(pairs[i][1]),), r) for r, i in enumerate(batch)])
        pos = torch.cat([torch.arange(len(pairs[i][0]) - 1, len(pairs[i][0]) + len(pairs[i][1]) - 1) for i in batch])
        logits = logits_at(model, ids, mask, rows, pos).cpu()  # (N, vocab) float32
        tokens = torch.cat([torch.tensor(pairs[i][1]) for i in batch])  # (N,)
        nll = torch.logsumexp(logits, -1) - logits[torch.arange(len(tokens)), tokens]  # (N,)
        first = 0
        for i in batch:
            n = len(pairs[i][1])
            out[i] = float(nll[first:first + n].mean())
            first += n
    return out


# ----------------------------------------------------------------------------------------------
# General capability: zero-shot GLUE subsets

#: label index -> label word, per task (GLUE label conventions).
GLUE_TASKS: dict[str, tuple[str, ...]] = {
    "sst2": ("negative", "positive"),  # 0 negative, 1 positive
    "mrpc": ("no", "yes"),  # 1 = paraphrase
    "cola": ("no", "yes"),  # 1 = acceptable
    "rte": ("yes", "no"),  # 0 = entailment
}


def glue_prompt(task: str, item: dict) -> str:
    """The zero-shot prompt of one GLUE item; the answer is one of :data:`GLUE_TASKS` ``[task]``."""
    if task == "sst2":
        return f"Review: {item['sentence'].strip()}\nIs the sentiment of this review positive or negative?\nAnswer:"
    if task == "mrpc":
        return (f"Sentence 1: {item['sentence1'].strip()}\nSentence 2: {item['sentence2'].strip()}\n"
                "Do the two sentences mean the same thing? Answer yes or no.\nAnswer:")
    if task == "cola":
        return (f"Sentence: {item['sentence'].strip()}\n"
                "Is this sentence grammatically correct? Answer yes or no.\nAnswer:")
    if task == "rte":
        return (f"{item['sentence1'].strip()}\nQuestion: does this imply that \"{item['sentence2'].strip()}\"? "
                "Answer yes or no.\nAnswer:")
    raise HyperparameterError(f"unknown GLUE task {task!r}; choose one of {sorted(GLUE_TASKS)}")


@torch.no_grad()
def glue_predictions(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: str, items: Sequence[dict], *,
                     batch_size: int = 8) -> list[int]:
    """Predicted label of each item: the label word with the highest log-probability after the
    prompt (teacher forced, with a leading space; a multi-token word scores its total)."""
    words = GLUE_TASKS.get(task)
    if words is None:
        raise HyperparameterError(f"unknown GLUE task {task!r}; choose one of {sorted(GLUE_TASKS)}")
    prompts = [glue_prompt(task, it) for it in items]
    word_ids = [encode_target(tokenizer, w) for w in words]
    k = len(words)
    if any(len(ids) != 1 for ids in word_ids):  # general case: one scored sequence per label word
        scores = score_pairs(model, tokenizer, [p for p in prompts for _ in words],
                             [w for _ in prompts for w in words], batch_size=batch_size)
        return [max(range(k), key=lambda j: scores[i * k + j].logprob) for i in range(len(prompts))]
    # Single-token label words: one forward per prompt, read the next-token logits.
    label_ids = torch.tensor([ids[0] for ids in word_ids])
    preds = [0] * len(prompts)
    for rows, logits in _last_token_logits(model, tokenizer, prompts, batch_size=batch_size):
        picked = logits.cpu()[:, label_ids]  # (b, k)
        for r, i in enumerate(rows):
            preds[i] = int(picked[r].argmax())
    return preds


def glue_accuracy(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, task: str, items: Sequence[dict], *,
                  batch_size: int = 16) -> dict:
    """Zero-shot accuracy on ``items`` and the predictions (to compare before/after an edit)."""
    preds = glue_predictions(model, tokenizer, task, items, batch_size=batch_size)
    correct = [float(p == int(it["label"])) for p, it in zip(preds, items, strict=False)]
    return {"accuracy": _mean(correct), "n": len(items), "predictions": preds}
