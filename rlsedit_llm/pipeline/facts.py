"""Facts to edit: one record type, parsers for the common data set schemas, and validation.

A :class:`Fact` is a prompt with a ``"{}"`` slot for the subject and the new target, e.g.
``Fact("The mother tongue of {} is", "Danielle Darrieux", "English", target_true="French")``.
:func:`as_fact` accepts a :class:`Fact`, a plain dict (``prompt``/``subject``/``target``), a
CounterFact record (ROME schema), a simplified CounterFact record (EasyEdit schema) or a zsRE
record (MEND/ROME schema). :func:`from_easyedit` converts EasyEdit's call form
(``prompts=``, ``target_new=``, ``subject=``, ``locality_inputs=``, ...) to facts.
:func:`validate_facts` checks a batch against a tokenizer before any model work starts, and raises
:class:`FactError` naming the fact and what to fix.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rlsedit_llm.errors import FactError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["Fact", "FactBatch", "as_fact", "as_facts", "validate_facts", "checked_facts", "encode_target",
           "from_easyedit", "EASYEDIT_KEYWORDS", "easyedit_keyword_error"]

log = logging.getLogger(__name__)


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
    weight : how much this fact counts in the editor's least-squares objective (a positive finite
        number, default 1): its term is ``weight * ||k W - v||^2``, i.e. its key and value rows
        are scaled by ``sqrt(weight)``. Raise it for a fact that does not take
        (``EditReport.failed``); it costs more change to the weights. Not part of equality.
    neighbourhood_targets : per neighbourhood prompt, the answer it should keep (EasyEdit's
        locality ground truths, which may differ from prompt to prompt); empty (default): every
        prompt keeps ``neighbourhood_target`` (or ``target_true``). When given, one per
        ``neighbourhood`` prompt, and all equal to ``neighbourhood_target`` if that is set too.
        :meth:`neighbourhood_answers` applies this rule.
    portability : ``(prompt, answer)`` pairs: filled prompts whose answer should follow from the
        edit (EasyEdit's portability inputs: subject aliases, reasoning, ...).
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
    weight: float = field(default=1.0, compare=False)
    neighbourhood_targets: tuple[str, ...] = field(default=(), compare=False)
    portability: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def __post_init__(self):
        for name in ("paraphrases", "neighbourhood", "attribute_prompts", "generation_prompts",
                     "neighbourhood_targets"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, tuple):
                try:
                    value = tuple(value)
                except TypeError:
                    raise FactError(f"Fact.{name} must be a sequence of strings; got {type(value).__name__}") from None
            object.__setattr__(self, name, value)
        object.__setattr__(self, "portability", _portability_pairs(self.portability))
        targets = self.neighbourhood_targets
        if targets and len(targets) != len(self.neighbourhood):
            raise FactError(f"Fact.neighbourhood_targets holds {len(targets)} answer(s) for {len(self.neighbourhood)} "
                            f"neighbourhood prompt(s); give one per prompt, or none")
        if targets and self.neighbourhood_target is not None and any(t != self.neighbourhood_target for t in targets):
            raise FactError(f"Fact.neighbourhood_target {self.neighbourhood_target!r} contradicts "
                            f"neighbourhood_targets {list(targets)!r}; give one of them")

    def neighbourhood_answers(self) -> tuple[str | None, ...]:
        """The answer each ``neighbourhood`` prompt should keep: ``neighbourhood_targets`` when
        given, else ``neighbourhood_target``, else ``target_true`` (CounterFact's convention)."""
        if self.neighbourhood_targets:
            return self.neighbourhood_targets
        answer = self.neighbourhood_target if self.neighbourhood_target is not None else self.target_true
        return (answer,) * len(self.neighbourhood)

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
      ``case_id``, ``relation_id``, ``paraphrases``, ``neighbourhood``, ``neighbourhood_target``,
      ``neighbourhood_targets``, ``portability``, ``attribute_prompts``, ``generation_prompts``;
    * CounterFact (ROME): ``requested_rewrite`` with ``prompt``/``subject``/``target_new.str``/
      ``target_true.str``/``relation_id``, plus ``paraphrase_prompts``, ``neighborhood_prompts``,
      ``attribute_prompts``, ``generation_prompts``;
    * simplified CounterFact (EasyEdit): filled ``prompt``, ``subject``, ``target_new``,
      ``ground_truth``, ``rephrase_prompt``, ``locality_prompt``, ``locality_ground_truth``;
    * one EasyEdit request: filled ``prompt`` (or a one-element ``prompts``), ``subject``,
      ``target_new`` (or a one-element ``target_news``), ``ground_truth``, ``rephrase_prompt(s)``,
      ``locality`` / ``portability`` as ``{group: {"prompt": ..., "ground_truth": ...}}`` (or, as
      KnowEdit stores them, ``{group: [{"prompt": ..., "ground_truth": ...}, ...]}``), and
      ``locality_prompt`` / ``locality_ground_truth`` as lists of the same length; a dict in
      EasyEdit's call form holding one fact (see :func:`from_easyedit`);
    * zsRE (MEND/ROME split): ``subject``, ``src``, ``alt``, ``answers``, ``rephrase``, ``loc``,
      ``loc_ans``; the prompt is ``src`` with the subject replaced by ``"{}"``, the target ``alt``.

    In a prompt record, keys that name the same thing must agree: ``target`` / ``target_new`` /
    ``target_news`` (compared without edge whitespace), ``target_true`` / ``ground_truth``,
    ``prompt`` / ``prompts``; otherwise :class:`FactError` names both. Prompt lists under several
    keys (``paraphrases``, ``rephrase_prompt``, ``rephrase_prompts``; ``neighbourhood``,
    ``neighborhood``, ``locality_prompt``, ``locality``) are all kept. A key a prompt record does not
    read is not an error (for backward compatibility): it is logged as a warning (logger
    ``rlsedit_llm.pipeline.facts``) listing the ignored keys, once per call.

    Raises :class:`FactError` for records of another shape or missing fields. Any record may
    carry a ``weight`` (:attr:`Fact.weight`, default 1).
    """
    ignored: dict[str, int] = {}
    fact = _read_fact(obj, ignored)
    _warn_ignored(ignored)
    return fact


def _read_fact(obj: Fact | Mapping[str, Any], ignored: dict[str, int]) -> Fact:
    """:func:`as_fact`, counting the keys of prompt records it does not read in ``ignored``."""
    if isinstance(obj, Fact):
        return obj
    if not isinstance(obj, Mapping):
        raise FactError(f"cannot read a fact from a {type(obj).__name__}; pass a Fact or a dict record")
    rec = obj
    if _is_call_form(rec):
        facts = from_easyedit(**{str(k): v for k, v in rec.items()})
        if len(facts) != 1:
            raise FactError(f"this dict is EasyEdit's call form with {len(facts)} facts; read it with "
                            f"rlsedit_llm.as_facts or rlsedit_llm.from_easyedit(**record)")
        return facts[0]
    where = f"record with case_id={rec.get('case_id')!r}" if "case_id" in rec else "record"
    try:
        if "requested_rewrite" in rec:
            return _counterfact_fact(rec, where)
        if "src" in rec and "alt" in rec:
            return _zsre_fact(rec, where)
        if ("prompt" in rec or "prompts" in rec) and "subject" in rec:
            return _prompt_fact(rec, where, ignored)
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
        weight=rec.get("weight", 1.0),
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
        weight=rec.get("weight", 1.0),
    )


#: The keys a prompt record is read from; any other key is reported as ignored.
_PROMPT_RECORD_KEYS = frozenset({
    "prompt", "prompts", "subject", "target", "target_new", "target_news", "target_true", "ground_truth",
    "case_id", "relation_id", "paraphrases", "rephrase_prompt", "rephrase_prompts", "neighbourhood",
    "neighborhood", "neighbourhood_target", "neighborhood_target", "neighbourhood_targets", "locality_prompt",
    "locality_ground_truth", "locality", "portability", "attribute_prompts", "generation_prompts", "weight",
})


def _prompt_fact(rec: Mapping, where: str, ignored: dict[str, int]) -> Fact:
    """The fact of a ``prompt``/``subject``/``target`` record: plain, simplified CounterFact (a
    filled prompt; ``ground_truth``, ``rephrase_prompt``, ``locality_prompt``), or one EasyEdit
    request (``locality`` / ``portability`` groups, plural keys)."""
    prompt = _agreed(rec, ("prompt", "prompts"), where)
    subject = _agreed(rec, ("subject",), where)
    target = _agreed(rec, ("target", "target_new", "target_news"), where, answer=True)
    if target is None:
        raise FactError(f"{where}: no 'target' (or 'target_new') field; give the new object to write")
    target_true = _agreed(rec, ("target_true", "ground_truth"), where, answer=True)
    if isinstance(prompt, str) and "{}" not in prompt:  # simplified CounterFact / EasyEdit: filled prompt
        prompt = _template_from(prompt, subject, where)
    paraphrases = _joined(rec, ("paraphrases", "rephrase_prompt", "rephrase_prompts"))
    neighbourhood, neighbourhood_targets, neighbourhood_target = _record_neighbourhood(rec, target_true, where,
                                                                                       ignored)
    portability = _record_portability(rec.get("portability"), f"{where}: portability", ignored)
    for key in rec:
        if key not in _PROMPT_RECORD_KEYS:
            ignored[str(key)] = ignored.get(str(key), 0) + 1
    return Fact(
        prompt=prompt,
        subject=subject,
        target=target,
        target_true=target_true,
        case_id=rec.get("case_id"),
        relation_id=rec.get("relation_id"),
        paraphrases=paraphrases,
        neighbourhood=neighbourhood,
        neighbourhood_target=neighbourhood_target,
        attribute_prompts=_strings(rec.get("attribute_prompts")),
        generation_prompts=_strings(rec.get("generation_prompts")),
        neighbourhood_targets=neighbourhood_targets,
        portability=portability,
        weight=rec.get("weight", 1.0),
    )


def as_facts(objs: Iterable) -> list[Fact]:
    """:func:`as_fact` over an iterable (a single :class:`Fact` or dict is wrapped in a list). A
    dict in EasyEdit's call form (``prompts`` a list, ``target_new``, ``subject``, ...) gives its
    facts (:func:`from_easyedit`). Keys of prompt records that are not read are logged in one
    warning for the whole call."""
    if isinstance(objs, Mapping) and _is_call_form(objs):
        return from_easyedit(**{str(k): v for k, v in objs.items()})
    if isinstance(objs, (Fact, Mapping)):
        objs = [objs]
    if isinstance(objs, (str, bytes)):
        raise FactError("facts must be Fact objects or dict records, not a string")
    if not isinstance(objs, Iterable):
        raise FactError(f"facts must be a Fact, a dict record or a list of them; got {type(objs).__name__}")
    ignored: dict[str, int] = {}
    facts = [_read_fact(o, ignored) for o in objs]
    _warn_ignored(ignored)
    return facts


# -- records: keys that name one thing, prompt lists, EasyEdit's groups --------------------------
def _warn_ignored(ignored: dict[str, int]) -> None:
    """One warning for the keys of prompt records a call did not read."""
    if ignored:
        listed = ", ".join(f"{key!r} ({n} record{'s' if n != 1 else ''})" for key, n in sorted(ignored.items()))
        log.warning("ignored key(s) of fact records that rlsedit does not read: %s (rlsedit_llm.as_fact lists "
                    "the keys it reads)", listed)


# Keys EasyEdit fills with a list even for one fact; a list under any other key is malformed.
_LIST_KEYS = frozenset({"prompts", "target_news", "target_new", "ground_truth"})


def _single(value, key: str, where: str):
    """A field's one value: a one-element list stands for its element under EasyEdit's list keys
    (:data:`_LIST_KEYS`); under any other key a list is left as it is, and refused as malformed."""
    if isinstance(value, (list, tuple)) and key in _LIST_KEYS:
        if len(value) != 1:
            raise FactError(f"{where}: {key!r} holds {len(value)} values {list(value)!r}; a record is one fact with "
                            f"one {key!r} (EasyEdit's lists of several facts go to rlsedit_llm.from_easyedit)")
        return value[0]
    return value


def _agreed(rec: Mapping, keys: tuple[str, ...], where: str, *, answer: bool = False):
    """The value of the first of ``keys`` the record gives (``None`` if none); every other given
    key must hold the same value (answers compared without edge whitespace), else FactError."""
    found = []
    for key in keys:
        value = rec.get(key)
        if value is None:
            continue
        value = _single(value, key, where)
        if answer:
            value = _target_str(value, where)
        found.append((key, value))
    if not found:
        return None
    (key0, value0), same = found[0], (lambda v: v.strip() if answer and isinstance(v, str) else v)
    for key, value in found[1:]:
        if same(value) != same(value0):
            raise FactError(f"{where}: {key0}={value0!r} and {key}={value!r} disagree; give one of them "
                            f"(or the same value in both)")
    return value0


def _joined(rec: Mapping, keys: tuple[str, ...]) -> tuple[str, ...]:
    """The prompts under all of ``keys``, in order (a prompt repeated under a later key once)."""
    out = list(_strings(rec.get(keys[0])))
    for key in keys[1:]:
        out += [p for p in _strings(rec.get(key)) if p not in out]
    return tuple(out)


def _one_answer(answer, where: str, prompt) -> str:
    """The answer to one prompt (a one-element list stands for its element)."""
    while isinstance(answer, (list, tuple)) and len(answer) == 1:
        answer = answer[0]
    if isinstance(answer, (list, tuple)):
        raise FactError(f"{where}: prompt {prompt!r} has {len(answer)} answers {list(answer)!r}; give one answer per "
                        f"prompt (aliases are not kept: pick one, or repeat the prompt once per answer)")
    if not isinstance(answer, str) or not answer.strip():
        raise FactError(f"{where}: the answer to prompt {prompt!r} must be a non-empty string; got {answer!r}")
    return answer


def _is_blank(value) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (
        isinstance(value, (list, tuple)) and all(_is_blank(v) for v in value))


def _qa_pairs(prompt, answer, where: str) -> list[tuple[str, str]]:
    """``(prompt, answer)`` pairs of one fact's locality or portability entry: a prompt and its
    answer, or a list of prompts and a list of as many answers. ``None`` (EasyEdit) or an empty
    prompt with an empty answer (KnowEdit's placeholder) stands for no entry."""
    if prompt is None or (isinstance(prompt, str) and not prompt.strip()):
        if not _is_blank(answer):
            raise FactError(f"{where}: answer {answer!r} is given without a prompt")
        return []
    if isinstance(prompt, str):
        return [(prompt, _one_answer(answer, where, prompt))]
    if isinstance(prompt, (list, tuple)):
        if not isinstance(answer, (list, tuple)) or len(answer) != len(prompt):
            raise FactError(f"{where}: {len(prompt)} prompt(s) {list(prompt)!r} need a list of as many answers; "
                            f"got {answer!r}")
        return [pair for p, a in zip(prompt, answer, strict=True) for pair in _qa_pairs(p, a, where)]
    raise FactError(f"{where}: a prompt must be a string or a list of strings; got {type(prompt).__name__}")


def _groups(value, where: str, *, ignored: dict[str, int] | None) -> list[tuple[str, str]]:
    """The ``(prompt, answer)`` pairs of one fact's EasyEdit groups, ``{group: entry}`` with
    ``entry`` a ``{"prompt", "ground_truth"}`` dict or a list of them (KnowEdit), in order.
    Other keys in an entry are counted in ``ignored`` (a record), or refused (``ignored=None``)."""
    if value is None:
        return []
    if not isinstance(value, Mapping):
        raise FactError(f"{where} must be a dict {{group: {{'prompt': ..., 'ground_truth': ...}}}}; "
                        f"got {type(value).__name__}")
    pairs: list[tuple[str, str]] = []
    for group, entries in value.items():
        for entry in entries if isinstance(entries, (list, tuple)) else [entries]:
            if not (isinstance(entry, Mapping) and "prompt" in entry and "ground_truth" in entry):
                raise FactError(f"{where}[{group!r}]: an entry must be a dict with 'prompt' and 'ground_truth'; "
                                f"got {entry!r}")
            for key in entry:
                if key not in ("prompt", "ground_truth"):
                    if ignored is None:
                        raise FactError(f"{where}[{group!r}]: unknown key {key!r}; an entry holds 'prompt' and "
                                        f"'ground_truth'")
                    name = f"{where.rpartition(': ')[2]}.{group}.{key}"
                    ignored[name] = ignored.get(name, 0) + 1
            pairs += _qa_pairs(entry["prompt"], entry["ground_truth"], f"{where}[{group!r}]")
    return pairs


def _record_neighbourhood(rec: Mapping, target_true, where: str, ignored: dict[str, int]):
    """``(neighbourhood, neighbourhood_targets, neighbourhood_target)`` of a prompt record.

    Prompts without their own answer (``neighbourhood``, ``neighborhood``, ``locality_prompt``
    without ``locality_ground_truth``) keep ``neighbourhood_target`` (or ``target_true``); prompts
    with one (``neighbourhood_targets``, ``locality_prompt`` with ``locality_ground_truth``,
    EasyEdit's ``locality`` groups) keep it, and then every prompt gets its answer listed."""
    plain = _joined(rec, ("neighbourhood", "neighborhood"))
    shared = _agreed(rec, ("neighbourhood_target", "neighborhood_target"), where, answer=True)
    pairs: list[tuple[str, str]] = []
    explicit = _strings(rec.get("neighbourhood_targets"))
    if explicit:
        if len(explicit) != len(plain):
            raise FactError(f"{where}: neighbourhood_targets holds {len(explicit)} answer(s) for {len(plain)} "
                            f"neighbourhood prompt(s); give one per prompt")
        pairs, plain = list(zip(plain, explicit, strict=True)), ()
    loc_prompt, loc_answer = rec.get("locality_prompt"), rec.get("locality_ground_truth")
    if loc_prompt is not None and loc_answer is not None:
        pairs += _qa_pairs(loc_prompt, loc_answer, f"{where}: locality_prompt")
    elif loc_prompt is not None:
        plain += tuple(p for p in _strings(loc_prompt) if p not in plain)
    elif loc_answer is not None:  # the answer alone: that of the prompts without their own
        loc_answer = _one_answer(loc_answer, f"{where}: locality_ground_truth", None)
        if shared is not None and shared.strip() != loc_answer.strip():
            raise FactError(f"{where}: neighbourhood_target={shared!r} and locality_ground_truth={loc_answer!r} "
                            f"disagree; give one of them")
        shared = loc_answer if shared is None else shared
    pairs += _groups(rec.get("locality"), f"{where}: locality", ignored=ignored)
    if not pairs:
        return plain, (), shared
    if plain:
        answer = shared if shared is not None else target_true
        if answer is None:
            raise FactError(f"{where}: neighbourhood prompts {list(plain)!r} have no answer while other locality "
                            f"prompts have one; give neighbourhood_target")
        pairs = [(p, answer) for p in plain] + pairs
    elif shared is not None and any(a != shared for _, a in pairs):
        raise FactError(f"{where}: neighbourhood_target={shared!r} contradicts the locality answers "
                        f"{[a for _, a in pairs]!r}; give one of them")
    answers = tuple(a for _, a in pairs)
    common = answers[0] if all(a == answers[0] for a in answers) else None
    return tuple(p for p, _ in pairs), answers, common


def _record_portability(value, where: str, ignored: dict[str, int]) -> tuple[tuple[str, str], ...]:
    """A prompt record's ``portability``: EasyEdit's groups, or :attr:`Fact.portability`'s pairs."""
    if value is None:
        return ()
    if isinstance(value, Mapping):
        return tuple(_groups(value, where, ignored=ignored))
    if isinstance(value, (list, tuple)):
        return tuple(pair for item in value for pair in (
            _qa_pairs(item.get("prompt"), item.get("ground_truth"), where) if isinstance(item, Mapping)
            else _portability_pairs([item])))
    return _portability_pairs(value)


def _portability_pairs(value) -> tuple[tuple[str, str], ...]:
    """:attr:`Fact.portability` as a tuple of ``(prompt, answer)`` tuples (lists from JSON accepted)."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise FactError(f"Fact.portability must be a sequence of (prompt, answer) pairs; got {type(value).__name__}")
    pairs = []
    for item in value:
        if isinstance(item, (str, bytes, Mapping)) or not isinstance(item, Iterable) or len(pair := tuple(item)) != 2:
            raise FactError(f"Fact.portability must hold (prompt, answer) pairs; got {item!r}")
        pairs.append(pair)
    return tuple(pairs)


# -- EasyEdit's call form ----------------------------------------------------------------------
#: The keyword arguments of EasyEdit's ``BaseEditor.edit`` that :func:`from_easyedit` reads.
EASYEDIT_KEYWORDS = ("prompts", "target_new", "subject", "ground_truth", "rephrase_prompts", "locality_inputs",
                     "portability_inputs")

#: EasyEdit arguments that steer its run rather than describe facts, and why rlsedit takes none.
_EASYEDIT_RUN_ARGUMENTS = {
    "sequential_edit": "rlsedit always edits sequentially: every call continues the model's lifelong stream",
    "keep_original_weight": "rlsedit keeps every edit; retract one with Editor.undo",
    "verbose": "rlsedit logs through the 'rlsedit_llm' logger",
    "test_generation": "evaluation is separate (rlsedit_llm.evaluation)",
    "summary_metrics": "evaluation is separate (rlsedit_llm.evaluation)",
    "train_ds": "RLSEdit trains nothing beforehand",
    "target_neg": "negative targets are not supported",
    "loc_prompts": "the locality prompts go in locality_inputs",
}


def _is_call_form(rec: Mapping) -> bool:
    """A dict of EasyEdit's keyword arguments (``prompts`` a list of several, or its inputs dicts)."""
    prompts = rec.get("prompts")
    return "prompts" in rec and (
        (isinstance(prompts, (list, tuple)) and len(prompts) != 1)
        or "locality_inputs" in rec or "portability_inputs" in rec)


def easyedit_keyword_error(names: Iterable[str], *, context: str = "EasyEdit's call form") -> FactError:
    """The :class:`FactError` naming keyword arguments that are not :data:`EASYEDIT_KEYWORDS`."""
    names = sorted(names)
    hints = [f"{n}: {_EASYEDIT_RUN_ARGUMENTS[n]}" for n in names if n in _EASYEDIT_RUN_ARGUMENTS]
    return FactError(f"unknown keyword argument(s) {', '.join(map(repr, names))} for {context} (it reads "
                     f"{', '.join(EASYEDIT_KEYWORDS)})" + (f"; {'; '.join(hints)}" if hints else ""))


def _per_fact(value, name: str, n: int | None) -> list:
    """One entry per fact: a string stands for one fact (as in EasyEdit), a list gives ``n``."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise FactError(f"{name} must be a string or a list with one entry per fact; got {type(value).__name__}")
    if n is not None and len(value) != n:
        raise FactError(f"{name} holds {len(value)} entries for {n} prompt(s); give one per prompt")
    return list(value)


def _inputs_per_fact(inputs, name: str, n: int) -> list[list[tuple[str, str]]]:
    """EasyEdit's ``locality_inputs`` / ``portability_inputs``, ``{group: {"prompt": [...],
    "ground_truth": [...]}}`` with one entry per fact (a string: the one fact's), as pairs per fact."""
    out: list[list[tuple[str, str]]] = [[] for _ in range(n)]
    if inputs is None:
        return out
    if not isinstance(inputs, Mapping):
        raise FactError(f"{name} must be a dict {{group: {{'prompt': [...], 'ground_truth': [...]}}}}; "
                        f"got {type(inputs).__name__}")
    for group, entry in inputs.items():
        where = f"{name}[{group!r}]"
        if not (isinstance(entry, Mapping) and "prompt" in entry and "ground_truth" in entry):
            raise FactError(f"{where} must be a dict with 'prompt' and 'ground_truth' (one entry per fact each)")
        extra = sorted(str(k) for k in entry if k not in ("prompt", "ground_truth"))
        if extra:
            raise FactError(f"{where}: unknown key(s) {extra!r}; a group holds 'prompt' and 'ground_truth'")
        prompts, answers = entry["prompt"], entry["ground_truth"]
        if isinstance(prompts, str):  # EasyEdit: one fact's entry
            prompts, answers = [prompts], [answers]
        prompts = _per_fact(prompts, f"{where}['prompt']", n)
        answers = _per_fact(answers, f"{where}['ground_truth']", n)
        for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
            out[i] += _qa_pairs(p, a, f"{where}, fact #{i}")
    return out


def from_easyedit(prompts: str | Sequence[str], target_new: str | Sequence[str], subject: str | Sequence[str],
                  ground_truth: str | Sequence[str | None] | None = None,
                  rephrase_prompts: str | Sequence[str | Sequence[str] | None] | None = None,
                  locality_inputs: Mapping[str, Mapping[str, Any]] | None = None,
                  portability_inputs: Mapping[str, Mapping[str, Any]] | None = None,
                  **unknown: Any) -> list[Fact]:
    """The facts of EasyEdit's call form ``BaseEditor.edit(prompts=..., target_new=..., subject=...,
    ground_truth=..., rephrase_prompts=..., locality_inputs=..., portability_inputs=...)``.

    ``prompts``, ``target_new``, ``subject`` (and ``ground_truth``, ``rephrase_prompts`` when
    given) hold one entry per fact; a string stands for a single fact. Prompts are filled, as in
    EasyEdit: the template replaces the first occurrence of the subject by ``"{}"``.
    ``locality_inputs`` / ``portability_inputs`` are ``{group: {"prompt": [...], "ground_truth":
    [...]}}`` with one entry per fact in each list: a prompt and its answer, a list of prompts and
    a list of as many answers, or ``None`` (or ``""`` with ``""``, KnowEdit's placeholder) for none.

    Everything is kept: ``ground_truth`` -> :attr:`Fact.target_true`; ``rephrase_prompts`` (a
    prompt or a list per fact) -> :attr:`Fact.paraphrases`; the locality prompts of all groups, in
    order -> :attr:`Fact.neighbourhood`, their answers -> :attr:`Fact.neighbourhood_targets` (and
    :attr:`Fact.neighbourhood_target` when they are all the same); the portability pairs of all
    groups -> :attr:`Fact.portability`. Group names are not kept.

    Raises :class:`FactError` for lists of different lengths, a subject that does not occur in
    its prompt, a prompt that already holds ``"{}"``, a prompt with several answers (aliases),
    an answer without a prompt, or an unknown keyword argument (named, with what rlsedit does
    instead for EasyEdit's run options such as ``sequential_edit``).
    """
    if unknown:
        raise easyedit_keyword_error(unknown)
    prompt_list = _per_fact(prompts, "prompts", None)
    n = len(prompt_list)
    if n == 0:
        raise FactError("prompts is empty: give at least one prompt")
    targets = _per_fact(target_new, "target_new", n)
    if subject is None:
        raise FactError("subject= is required: rlsedit edits at the subject's last token (give one per prompt)")
    subjects = _per_fact(subject, "subject", n)
    truths = [None] * n if ground_truth is None else _per_fact(ground_truth, "ground_truth", n)
    rephrases = [None] * n if rephrase_prompts is None else _per_fact(rephrase_prompts, "rephrase_prompts", n)
    locality = _inputs_per_fact(locality_inputs, "locality_inputs", n)
    portability = _inputs_per_fact(portability_inputs, "portability_inputs", n)
    facts = []
    for i in range(n):
        where = f"EasyEdit fact #{i}"
        prompt, subj = prompt_list[i], subjects[i]
        if isinstance(prompt, str) and "{}" in prompt:
            raise FactError(f"{where}: prompt {prompt!r} already holds '{{}}'; EasyEdit's prompts are filled (the "
                            f"subject written out): pass templates as rlsedit facts instead")
        template = _template_from(prompt, subj, where)
        target = _one_answer(targets[i], f"{where}: target_new", prompt)
        truth = None if _is_blank(truths[i]) else _one_answer(truths[i], f"{where}: ground_truth", prompt)
        rephrase = rephrases[i]
        if not (rephrase is None or isinstance(rephrase, str)
                or (isinstance(rephrase, (list, tuple)) and all(isinstance(r, str) for r in rephrase))):
            raise FactError(f"{where}: rephrase_prompts entries must be a prompt or a list of prompts; "
                            f"got {rephrase!r}")
        answers = tuple(a for _, a in locality[i])
        facts.append(Fact(
            prompt=template, subject=subj, target=target, target_true=truth,
            paraphrases=tuple(r for r in _strings(rephrase) if r.strip()),
            neighbourhood=tuple(p for p, _ in locality[i]),
            neighbourhood_target=answers[0] if answers and all(a == answers[0] for a in answers) else None,
            neighbourhood_targets=answers,
            portability=tuple(portability[i]),
        ))
    return facts


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


def _is_weight(value) -> bool:
    """A fact's weight: a real number (not a bool), finite and > 0."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(float(value)) and float(value) > 0)


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
        for name in ("paraphrases", "neighbourhood", "attribute_prompts", "generation_prompts",
                     "neighbourhood_targets"):
            for text in getattr(f, name):
                _check_text(text, f"fact #{i}", name)
        for pair in f.portability:
            if not all(isinstance(t, str) for t in pair):
                raise FactError(f"fact #{i} ({f.describe()}): portability must hold (prompt, answer) string pairs; "
                                f"got {pair!r}")
            for text in pair:
                _check_text(text, f"fact #{i}", "portability")
        if f.target_true is not None and not isinstance(f.target_true, str):
            raise FactError(f"fact #{i} ({f.describe()}): target_true must be a string or None")
        for name in ("paraphrases", "neighbourhood", "attribute_prompts", "generation_prompts",
                     "neighbourhood_targets"):
            if not all(isinstance(p, str) for p in getattr(f, name)):
                raise FactError(f"fact #{i} ({f.describe()}): {name} must hold strings only")
        if f.neighbourhood_target is not None and not isinstance(f.neighbourhood_target, str):
            raise FactError(f"fact #{i} ({f.describe()}): neighbourhood_target must be a string or None")
        where = f"fact #{i} ({f.describe()})"
        if not _is_weight(f.weight):
            raise FactError(f"{where}: weight must be a positive finite number (1 = the default); got {f.weight!r}")
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
