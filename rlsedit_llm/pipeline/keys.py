"""Keys of the MEMIT lineage: the edited module's input at the subject's last token.

For fact ``i`` and context template ``t`` the row text is ``t`` with the fact's filled prompt in
its ``"{}"`` slot; the key of the row is the input of the edited module (the MLP output
projection of layer ``l``) at the position of the subject's last token. The key of the fact is
the **type-weighted** average over templates:

    k_i = 1/2 * k_i(plain "{}" template) + 1/2 * mean_t k_i(prefixed template t)

(the plain and prefixed templates are two "types" weighted equally, as in MEMIT/AlphaEdit; with
only one type present it is the mean over that type).

Context templates are ``"{}"`` plus ``n`` short texts sampled from the model (``length`` tokens
after the starts "The", "Therefore", "Because", "I", "You", top-5 sampling from a seeded
``torch.Generator``), each followed by ``". {}"``.

Every tokenisation here uses ``add_special_tokens=False``, with the tokenizer's BOS token in front
of every row where the family needs it (:func:`~rlsedit_llm.pipeline.tokens.encode_prompt`,
``needs_bos``: Gemma); batches are right-padded.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from rlsedit_llm.adapters.hooks import capture_inputs, capture_outputs, run_until_stopped
from rlsedit_llm.adapters.spec import ModelSpec, get_module
from rlsedit_llm.errors import FactError, HyperparameterError
from rlsedit_llm.pipeline.facts import Fact, checked_facts
from rlsedit_llm.pipeline.tokens import bos_prefix, encode_prompt, input_device, needs_bos, pad_id, right_pad

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

__all__ = [
    "TEMPLATE_STARTS",
    "generate_templates",
    "template_parts",
    "check_templates",
    "encode_with_subject",
    "fact_rows",
    "compute_keys",
    "compute_keys_multi",
    "subject_hidden_states",
]

TEMPLATE_STARTS = ("The", "Therefore", "Because", "I", "You")
_TOP_K = 5


# --------------------------------------------------------------------------------------------
# Templates
# --------------------------------------------------------------------------------------------
def template_parts(template: str) -> tuple[str, str]:
    """Split a context template around its single ``"{}"`` slot: ``(before, after)``, unescaped.

    Raises :class:`HyperparameterError` unless the template has exactly one bare ``{}`` field.
    """
    if not isinstance(template, str):
        raise HyperparameterError(f"a context template must be a string; got {type(template).__name__}")
    try:
        pieces = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise HyperparameterError(f"context template {template!r} is not a valid format string ({exc}); "
                                  f"escape literal braces as '{{{{' and '}}}}'") from None
    fields = [(name, spec, conv) for _, name, spec, conv in pieces if name is not None]
    if len(fields) != 1 or fields[0] != ("", "", None):
        raise HyperparameterError(f"context template {template!r} must contain exactly one '{{}}' slot")
    before: list[str] = []
    after: list[str] = []
    seen = False
    for literal, name, _, _ in pieces:
        (after if seen else before).append(literal)
        if name is not None:
            seen = True
    return "".join(before), "".join(after)


def check_templates(templates: Sequence[str]) -> list[str]:
    """The templates as a list; :class:`HyperparameterError` when there is none."""
    templates = list(templates)
    if not templates:
        raise HyperparameterError("templates must not be empty; use ['{}'] for the bare prompt")
    return templates


def _sample_texts(model, tokenizer, starts: list[str], length: int, gen: torch.Generator) -> list[str]:
    """Continue every start text by ``length`` tokens of top-5 sampling, all rows in one batch.

    Rows are right-padded (and start with BOS where the family needs it); each step reads the
    logits at every row's own last token. Sampling happens on the CPU with ``gen``, so it is
    reproducible for a seed.
    """
    device = input_device(model)
    bos = needs_bos(model)
    seqs = []
    for start in starts:
        ids = encode_prompt(tokenizer, start, bos=bos)
        if len(ids) == len(bos_prefix(tokenizer, bos)):
            raise HyperparameterError(f"the tokenizer encodes the template start {start!r} to no tokens")
        seqs.append(ids)
    eos = tokenizer.eos_token_id
    stopped = [False] * len(seqs)
    pad = pad_id(tokenizer)
    for _ in range(length):
        input_ids, attn = right_pad(seqs, pad, device)  # (n, max_len)
        logits = model(input_ids=input_ids, attention_mask=attn, use_cache=False).logits  # (n, max_len, vocab)
        last = torch.tensor([len(s) - 1 for s in seqs], device=logits.device)
        logits = logits[torch.arange(len(seqs), device=logits.device), last].float().cpu()  # (n, vocab)
        top, idx = logits.topk(min(_TOP_K, logits.shape[-1]), dim=-1)
        choice = torch.multinomial(torch.softmax(top, dim=-1), 1, generator=gen)  # (n, 1)
        nxt = idx.gather(1, choice)[:, 0].tolist()
        for row, token in enumerate(nxt):
            if stopped[row]:
                continue
            if eos is not None and token == eos:
                stopped[row] = True
                continue
            seqs[row].append(token)
        if all(stopped):
            break
    return [tokenizer.decode(s, skip_special_tokens=True) for s in seqs]


def generate_templates(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *, seed: int, n: int = 5,
                       length: int = 10) -> list[str]:
    """Context templates: ``["{}"]`` plus ``n`` model-sampled prefixes, each ending in ``". {}"``.

    Prefix ``j`` starts with ``TEMPLATE_STARTS[j % 5]`` and continues with up to ``length`` tokens
    (fewer if the model emits its end-of-text token) drawn by top-5 sampling from a CPU
    ``torch.Generator`` seeded with ``seed`` (deterministic for a seed, model and device; the
    global RNG is not touched). Braces in generated text are escaped, so every template contains
    exactly one ``"{}"`` slot.
    """
    if not isinstance(n, int) or n < 0:
        raise HyperparameterError(f"n (number of sampled templates) must be an int >= 0; got {n!r}")
    if not isinstance(length, int) or length < 1:
        raise HyperparameterError(f"length (tokens per template) must be an int >= 1; got {length!r}")
    if not isinstance(seed, int):
        raise HyperparameterError(f"seed must be an int; got {seed!r}")
    if n == 0:
        return ["{}"]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    starts = [TEMPLATE_STARTS[j % len(TEMPLATE_STARTS)] for j in range(n)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            texts = _sample_texts(model, tokenizer, starts, length, gen)
    finally:
        model.train(was_training)
    return ["{}"] + [text.replace("{", "{{").replace("}", "}}") + ". {}" for text in texts]


# --------------------------------------------------------------------------------------------
# Rows: (template, fact) -> token ids and subject-last position
# --------------------------------------------------------------------------------------------
def encode_with_subject(tokenizer: PreTrainedTokenizerBase, text: str, subj_start: int, subj_end: int, *,
                        bos: bool = False) -> tuple[list[int], int]:
    """Token ids of ``text`` and the index of the token holding the subject's last character.

    The subject occupies ``text[subj_start:subj_end]``. Fast tokenizers: from the offset mapping
    (the last token starting before ``subj_end``). Otherwise: the length of the tokenisation of
    ``text[:subj_end]`` minus one (MEMIT's rule), checked to be a prefix of the full tokenisation.
    With ``bos`` the row starts with the BOS token (:func:`encode_prompt`) and the index counts it.
    """
    prefix = bos_prefix(tokenizer, bos)
    ids, pos = _encode_with_subject(tokenizer, text, subj_start, subj_end)
    return prefix + ids, pos + len(prefix)


def _encode_with_subject(tokenizer, text: str, subj_start: int, subj_end: int) -> tuple[list[int], int]:
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        idx = max((i for i, (a, b) in enumerate(offsets) if a < subj_end and b > a), default=-1)
        if idx >= 0 and offsets[idx][1] > subj_start:
            return ids, idx
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    head = list(tokenizer(text[:subj_end], add_special_tokens=False)["input_ids"])
    if not head:
        raise FactError(f"cannot locate the subject in {text!r}: it encodes to no tokens")
    if ids[: len(head)] != head:
        log.debug("subject prefix tokenises differently inside %r; using MEMIT's prefix-length rule", text)
    return ids, min(len(head), len(ids)) - 1


def fact_rows(tokenizer: PreTrainedTokenizerBase, facts: Sequence[Fact], templates: Sequence[str], *,
              bos: bool = False) -> tuple[list[list[int]], list[int]]:
    """Token ids and subject-last positions for every (fact, template) pair, fact-major.

    Row ``i * len(templates) + j`` is fact ``i`` in template ``j``; with ``bos`` every row starts
    with the BOS token (pass ``needs_bos(spec)``).
    """
    parts = [template_parts(t) for t in templates]
    rows, positions = [], []
    for f in facts:
        p_before, p_after = f.prompt.split("{}", 1)
        for before, after in parts:
            start = len(before) + len(p_before)
            text = before + p_before + f.subject + p_after + after
            ids, pos = encode_with_subject(tokenizer, text, start, start + len(f.subject), bos=bos)
            rows.append(ids)
            positions.append(pos)
    return rows, positions


def _type_weights(templates: Sequence[str]) -> torch.Tensor:
    """Averaging weights over templates: 1/2 for the plain ones, 1/2 for the prefixed ones."""
    plain = torch.tensor([template_parts(t) == ("", "") for t in templates])
    n_plain, n_pref = int(plain.sum()), int((~plain).sum())
    if n_plain and n_pref:
        w = torch.where(plain, 0.5 / n_plain, 0.5 / n_pref)
    else:
        w = torch.full((len(templates),), 1.0 / len(templates))
    return w.to(torch.float32)  # (T,)


def _check_layers(spec: ModelSpec, layers) -> list[int]:
    layers = list(layers)
    if not layers or not all(isinstance(l, int) and 0 <= l < spec.n_layers for l in layers):
        raise HyperparameterError(f"layers must be ints in [0, {spec.n_layers}); got {layers}")
    return layers


def _run_capture(model, tokenizer, rows, positions, modules: dict, *, outputs: bool, batch_size: int):
    """Forward ``rows`` in right-padded batches; return {key: (n_rows, width) float32} at ``positions``.

    Captures module inputs (``outputs=False``) or outputs; stops the forward pass once the last
    module has been seen, so layers above it are never run.
    """
    device = input_device(model)
    pad = pad_id(tokenizer)
    order = list(modules)
    found: dict = {key: [] for key in order}
    was_training = model.training
    model.eval()
    base = getattr(model, "base_model", model)
    capture = capture_outputs if outputs else capture_inputs
    try:
        for lo in range(0, len(rows), batch_size):
            chunk, pos = rows[lo: lo + batch_size], positions[lo: lo + batch_size]
            input_ids, attn = right_pad(chunk, pad, device)
            with capture(modules, stop=True) as seen, torch.no_grad():
                run_until_stopped(base, input_ids=input_ids, attention_mask=attn, use_cache=False)
            rows_idx = torch.arange(len(chunk))
            pos_t = torch.tensor(pos)
            for key in order:
                x = seen[key]
                if x.dim() == 2 and x.shape[0] == input_ids.shape[0] * input_ids.shape[1]:
                    x = x.view(input_ids.shape[0], input_ids.shape[1], -1)  # OPT: MLP on (batch * seq, d)
                found[key].append(x[rows_idx.to(x.device), pos_t.to(x.device)].float())
    finally:
        model.train(was_training)
    return {key: torch.cat(v, dim=0) for key, v in found.items()}


# --------------------------------------------------------------------------------------------
# Public key functions
# --------------------------------------------------------------------------------------------
def compute_keys_multi(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, spec: ModelSpec,
                       layers: Sequence[int], facts: Iterable[Fact | Mapping[str, Any]], templates: Sequence[str], *,
                       batch_size: int = 64) -> dict[int, torch.Tensor]:
    """Keys of every fact at several layers from shared forward passes.

    Parameters
    ----------
    layers : layer indices; the edited module of each is ``spec.edit_module_path.format(layer)``
    facts : :class:`Fact` objects or records (see :func:`rlsedit_llm.pipeline.facts.as_fact`)
    templates : context templates (see :func:`generate_templates`); ``["{}"]`` for the bare prompt

    Returns
    -------
    dict layer -> tensor (u, d_k) float32 on that edited module's device: the type-weighted
    average over templates of the module input at the subject's last token.
    """
    facts = checked_facts(facts, tokenizer, purpose="compute keys for")
    templates = check_templates(templates)
    layers = _check_layers(spec, layers)
    weights = _type_weights(templates)  # (T,)
    rows, positions = fact_rows(tokenizer, facts, templates, bos=needs_bos(spec))
    modules = {l: get_module(model, spec.edit_module_path.format(l)) for l in sorted(set(layers))}
    per_row = _run_capture(model, tokenizer, rows, positions, modules, outputs=False, batch_size=batch_size)
    keys = {}
    for l in layers:
        x = per_row[l].view(len(facts), len(templates), -1)  # (u, T, d_k)
        k = torch.einsum("utd,t->ud", x, weights.to(x.device))  # (u, d_k)
        keys[l] = k.to(next(modules[l].parameters()).device)
    return keys


def compute_keys(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, spec: ModelSpec, layer: int,
                 facts: Iterable[Fact | Mapping[str, Any]], templates: Sequence[str], *,
                 batch_size: int = 64) -> torch.Tensor:
    """Keys (u, d_k) float32 at one layer; see :func:`compute_keys_multi`."""
    return compute_keys_multi(model, tokenizer, spec, [layer], facts, templates, batch_size=batch_size)[layer]


def subject_hidden_states(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, spec: ModelSpec, layer: int,
                          facts: Iterable[Fact | Mapping[str, Any]], *,
                          batch_size: int = 64) -> torch.Tensor:
    """Output of decoder layer ``layer`` (the residual stream after it) at the subject's last
    token of each fact's bare prompt: (u, d_model) float32 on that layer's device."""
    facts = checked_facts(facts, tokenizer, purpose="read hidden states of")
    (layer,) = _check_layers(spec, [layer])
    rows, positions = fact_rows(tokenizer, facts, ["{}"], bos=needs_bos(spec))
    module = get_module(model, spec.layer_path.format(layer))
    h = _run_capture(model, tokenizer, rows, positions, {layer: module}, outputs=True, batch_size=batch_size)[layer]
    dev = next(module.parameters()).device
    return h.to(dev)
