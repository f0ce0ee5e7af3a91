"""Facts to edit: one record type, parsers for the common data set schemas, and validation.

A :class:`Fact` is a prompt with a ``"{}"`` slot for the subject and the new target, e.g.
``Fact("The mother tongue of {} is", "Danielle Darrieux", "English", target_true="French")``.
:func:`as_fact` accepts a :class:`Fact`, a plain dict (``prompt``/``subject``/``target``), a
CounterFact record (ROME schema), a simplified CounterFact record (EasyEdit schema) or a zsRE
record (MEND/ROME schema). :func:`validate_facts` checks a batch against a tokenizer before any
model work starts, and raises :class:`FactError` naming the fact and what to fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rlsedit_llm.errors import FactError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Fact", "FactBatch", "as_fact", "as_facts", "validate_facts", "checked_facts", "encode_target"]


@dataclass(frozen=True)
class Fact:
    """One requested edit.

    Attributes
    ----------
    prompt : text with exactly one ``"{}"`` marking the subject, e.g. ``"The mother tongue of {} is"``
    subject : the subject, e.g. ``"Danielle Darrieux"``
    target : the new object, e.g. ``"English"`` (scored with a leading space)
    target_true : the object before the edit, if known (``"French"``)
    case_id, relation_id : identifiers carried from the data set
    paraphrases : filled prompts that should also give ``target`` after the edit
    neighbourhood : filled prompts about other subjects that should keep their answer
    neighbourhood_target : the answer those prompts should keep; ``None`` means ``target_true``
        (CounterFact), otherwise e.g. zsRE's NQ answer
    attribute_prompts, generation_prompts : CounterFact's extra evaluation prompts
    """

    prompt: str
    subject: str
    target: str
    target_true: str | None = None
    case_id: str | int | None = None
    relation_id: str | None = None
    paraphrases: tuple[str, ...] = field(default=(), compare=False)
    neighbourhood: tuple[str, ...] = field(default=(), compare=False)
    neighbourhood_target: str | None = field(default=None, compare=False)
    attribute_prompts: tuple[str, ...] = field(default=(), compare=False)
    generation_prompts: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        for name in ("paraphrases", "neighbourhood", "attribute_prompts", "generation_prompts"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, tuple):
                try:
                    value = tuple(value)
                except TypeError:
                    raise FactError(f"Fact.{name} must be a sequence of strings; got {type(value).__name__}") from None
            object.__setattr__(self, name, value)

    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace("{}", self.subject, 1)

    def describe(self) -> str:
        """Short identification used in error messages."""
        ident = f"case_id={self.case_id!r}, " if self.case_id is not None else ""
        return f"{ident}prompt={self.prompt!r}, subject={self.subject!r}, target={self.target!r}"


def _strings(value) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _template_from(filled: str, subject: str, where: str) -> str:
    """Turn a filled prompt into a ``"{}"`` template by replacing the first occurrence of the subject."""
    if not isinstance(filled, str) or not isinstance(subject, str):
        raise FactError(f"{where}: prompt and subject must be strings")
    if not subject.strip():
        raise FactError(f"{where}: the subject is empty; give the entity the prompt is about")
    pos = filled.find(subject)
    if pos < 0:
        raise FactError(
            f"{where}: subject {subject!r} does not occur in prompt {filled!r}; fix the record's subject or prompt"
        )
    return filled[:pos] + "{}" + filled[pos + len(subject):]


def _target_str(value, where: str):
    """CounterFact stores targets as ``{"str": ..., "id": ...}``; others as plain strings."""
    if isinstance(value, Mapping):
        if "str" not in value:
            raise FactError(f"{where}: target mapping has no 'str' field")
        return value["str"]
    return value


def as_fact(obj: Fact | Mapping[str, Any]) -> Fact:
    """Convert a record to a :class:`Fact`.

    Accepted inputs
    ---------------
    * a :class:`Fact` (returned as is);
    * ``{"prompt", "subject", "target"}`` (or ``"target_new"``), optional ``target_true``,
      ``case_id``, ``relation_id``, ``paraphrases``, ``neighbourhood``;
    * CounterFact (ROME): ``requested_rewrite`` with ``prompt``/``subject``/``target_new.str``/
      ``target_true.str``/``relation_id``, plus ``paraphrase_prompts``, ``neighborhood_prompts``,
      ``attribute_prompts``, ``generation_prompts``;
    * simplified CounterFact (EasyEdit): filled ``prompt``, ``subject``, ``target_new``,
      ``ground_truth``, ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``;
    * zsRE (MEND/ROME split): ``subject``, ``src``, ``alt``, ``answers``, ``rephrase``, ``loc``,
      ``loc_ans``; the prompt is ``src`` with the subject replaced by ``"{}"``, the target ``alt``.

    Raises :class:`FactError` for records of another shape or missing fields.
    """
    if isinstance(obj, Fact):
        return obj
    if not isinstance(obj, Mapping):
        raise FactError(f"cannot read a fact from a {type(obj).__name__}; pass a Fact or a dict record")
    rec = obj
    where = f"record with case_id={rec.get('case_id')!r}" if "case_id" in rec else "record"
    try:
        if "requested_rewrite" in rec:
            return _counterfact_fact(rec, where)
        if "src" in rec and "alt" in rec:
            return _zsre_fact(rec, where)
        if "prompt" in rec and "subject" in rec:
            return _prompt_fact(rec, where)
    except KeyError as exc:
        raise FactError(f"{where}: missing field {exc.args[0]!r}") from None
    except TypeError as exc:
        raise FactError(f"{where}: malformed field ({exc})") from None
    raise FactError(
        f"cannot read a fact from a record with keys {sorted(map(str, rec))}; expected prompt/subject/target, "
        f"a CounterFact record (requested_rewrite) or a zsRE record (src/subject/alt)"
    )


def _counterfact_fact(rec: Mapping, where: str) -> Fact:
    """The fact of a CounterFact record (ROME schema: ``requested_rewrite``)."""
    rw = rec["requested_rewrite"]
    return Fact(
        prompt=rw["prompt"],
        subject=rw["subject"],
        target=_target_str(rw["target_new"], where),
        target_true=_target_str(rw.get("target_true"), where),
        case_id=rec.get("case_id"),
        relation_id=rw.get("relation_id"),
        paraphrases=_strings(rec.get("paraphrase_prompts")),
        neighbourhood=_strings(rec.get("neighborhood_prompts")),
        attribute_prompts=_strings(rec.get("attribute_prompts")),
        generation_prompts=_strings(rec.get("generation_prompts")),
    )


def _zsre_fact(rec: Mapping, where: str) -> Fact:
    """The fact of a zsRE record (``src``, ``subject``, ``alt``, ...)."""
    answers = _strings(rec.get("answers"))
    return Fact(
        prompt=_template_from(rec["src"], rec["subject"], where),
        subject=rec["subject"],
        target=rec["alt"],
        target_true=answers[0] if answers else None,
        case_id=rec.get("case_id"),
        paraphrases=_strings(rec.get("rephrase")),
        neighbourhood=_strings(rec.get("loc")),
        neighbourhood_target=rec.get("loc_ans"),
    )


def _prompt_fact(rec: Mapping, where: str) -> Fact:
    """The fact of a ``prompt``/``subject``/``target`` record: plain, or simplified CounterFact
    (a filled prompt; ``ground_truth``, ``rephrase_prompt``, ``locality_prompt``)."""
    target = rec.get("target", rec.get("target_new"))
    if target is None:
        raise FactError(f"{where}: no 'target' (or 'target_new') field; give the new object to write")
    target = _target_str(target, where)
    prompt = rec["prompt"]
    if isinstance(prompt, str) and "{}" not in prompt:  # simplified CounterFact: filled prompt
        prompt = _template_from(prompt, rec["subject"], where)
    if "ground_truth" in rec or "rephrase_prompt" in rec or "locality_prompt" in rec:
        target_true = rec.get("ground_truth", rec.get("target_true"))
        paraphrases, neighbourhood = rec.get("rephrase_prompt"), rec.get("locality_prompt")
        neighbourhood_target = rec.get("locality_ground_truth")
    else:
        target_true = _target_str(rec.get("target_true"), where)
        paraphrases, neighbourhood = rec.get("paraphrases"), rec.get("neighbourhood", rec.get("neighborhood"))
        neighbourhood_target = rec.get("neighbourhood_target")
    return Fact(
        prompt=prompt,
        subject=rec["subject"],
        target=target,
        target_true=target_true,
        case_id=rec.get("case_id"),
        relation_id=rec.get("relation_id"),
        paraphrases=_strings(paraphrases),
        neighbourhood=_strings(neighbourhood),
        neighbourhood_target=neighbourhood_target,
    )


def as_facts(objs: Iterable) -> list[Fact]:
    """:func:`as_fact` over an iterable (a single :class:`Fact` or dict is wrapped in a list)."""
    if isinstance(objs, (Fact, Mapping)):
        objs = [objs]
    if isinstance(objs, (str, bytes)):
        raise FactError("facts must be Fact objects or dict records, not a string")
    if not isinstance(objs, Iterable):
        raise FactError(f"facts must be a Fact, a dict record or a list of them; got {type(objs).__name__}")
    return [as_fact(o) for o in objs]


def encode_target(tokenizer: PreTrainedTokenizerBase, target: str) -> list[int]:
    """Token ids of a target as it follows a prompt: the one encoding every path shares.

    The rule: ``" " + target.strip()`` (edge whitespace of the record is not part of the answer;
    exactly one separating space is), encoded with ``add_special_tokens=False``, a leading BOS
    dropped. The value optimisation trains on these tokens and the scorer, the metrics and the
    fine-tuning baseline read these same tokens, so ``"Paris"``, ``" Paris"`` and ``"Paris\\n"``
    are one target. An unknown-token id is kept, so that :func:`validate_facts` reports the
    target as unrepresentable instead of silently shortening it.
    """
    ids = list(tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"])
    if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    return ids


def _squash(text: str) -> str:
    return " ".join(text.split())


def _check_text(text, where: str, name: str) -> None:
    """A string the tokenizer can take: valid Unicode (no lone surrogates), no NUL."""
    if not isinstance(text, str):
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise FactError(f"{where}: {name} holds an invalid character at position {exc.start} ({text[exc.start]!r}, "
                        f"a lone surrogate); pass valid Unicode text") from None
    if "\0" in text:
        raise FactError(f"{where}: {name} holds a NUL character; remove it")


def validate_facts(facts: Iterable[Fact | Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase) -> None:
    """Check a batch of facts before editing; raise :class:`FactError` naming the first bad fact.

    Checks: string fields; exactly one ``"{}"`` in the prompt; non-empty subject and target;
    the target encodes to at least one token and decodes back to itself (up to whitespace);
    the subject encodes; no two facts with the same prompt and subject in the batch.
    """
    facts = as_facts(facts)
    seen: dict[tuple[str, str], int] = {}
    for i, f in enumerate(facts):
        for name in ("prompt", "subject", "target"):
            if not isinstance(getattr(f, name), str):
                raise FactError(f"fact #{i}: {name} must be a string; got {type(getattr(f, name)).__name__}")
        if f.relation_id is not None and not isinstance(f.relation_id, str):
            raise FactError(f"fact #{i} ({f.describe()}): relation_id must be a string or None; got {f.relation_id!r}")
        if f.case_id is not None and (isinstance(f.case_id, bool) or not isinstance(f.case_id, (str, int))):
            raise FactError(f"fact #{i} ({f.describe()}): case_id must be a string, an int or None; got {f.case_id!r}")
        for name in ("prompt", "subject", "target", "target_true", "neighbourhood_target"):
            _check_text(getattr(f, name), f"fact #{i}", name)
        for name in ("paraphrases", "neighbourhood", "attribute_prompts", "generation_prompts"):
            for text in getattr(f, name):
                _check_text(text, f"fact #{i}", name)
        if f.target_true is not None and not isinstance(f.target_true, str):
            raise FactError(f"fact #{i} ({f.describe()}): target_true must be a string or None")
        for name in ("paraphrases", "neighbourhood", "attribute_prompts", "generation_prompts"):
            if not all(isinstance(p, str) for p in getattr(f, name)):
                raise FactError(f"fact #{i} ({f.describe()}): {name} must hold strings only")
        if f.neighbourhood_target is not None and not isinstance(f.neighbourhood_target, str):
            raise FactError(f"fact #{i} ({f.describe()}): neighbourhood_target must be a string or None")
        where = f"fact #{i} ({f.describe()})"
        n_slots = f.prompt.count("{}")
        if n_slots != 1:
            raise FactError(
                f"{where}: the prompt must contain exactly one '{{}}' marking the subject; found {n_slots}"
            )
        if not f.subject.strip():
            raise FactError(f"{where}: the subject is empty; give the entity the prompt is about")
        if not f.target.strip():
            raise FactError(f"{where}: the target is empty; give the new object to write")
        if not tokenizer(f.subject, add_special_tokens=False)["input_ids"]:
            raise FactError(f"{where}: the tokenizer encodes the subject to no tokens; use another subject string")
        ids = encode_target(tokenizer, f.target)
        if not ids:
            raise FactError(f"{where}: the tokenizer encodes the target to no tokens; use another target string")
        decoded = tokenizer.decode(ids)
        if _squash(decoded) != _squash(f.target):  # type: ignore[arg-type]
            raise FactError(
                f"{where}: the tokenizer cannot represent the target (it decodes back as {decoded!r}); "
                f"use characters this tokenizer knows"
            )
        key = (f.prompt, f.subject)
        if key in seen:
            raise FactError(
                f"{where}: same prompt and subject as fact #{seen[key]} in this batch; edit one target per "
                f"prompt and subject per batch"
            )
        seen[key] = i


class FactBatch(list):
    """A ``list[Fact]`` already checked by :func:`validate_facts` against ``tokenizer``: the stages
    of one editor call take it without checking it again (the door checks once)."""

    def __init__(self, facts: Iterable[Fact], tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(facts)
        self.tokenizer = tokenizer


def checked_facts(facts: Iterable[Fact | Mapping[str, Any]], tokenizer: PreTrainedTokenizerBase, *,
                  purpose: str = "edit") -> FactBatch:
    """:func:`as_facts`, at least one fact, :func:`validate_facts`: the entry check of every stage
    that takes facts. Raises :class:`FactError` (``purpose`` names the stage in the message).
    A :class:`FactBatch` checked against the same tokenizer is returned as it is."""
    if isinstance(facts, FactBatch) and facts.tokenizer is tokenizer and facts:
        return facts
    facts = as_facts(facts)
    if not facts:
        raise FactError(f"no facts given: pass at least one fact to {purpose}")
    validate_facts(facts, tokenizer)
    return FactBatch(facts, tokenizer)
