"""Command line: ``rlsedit demo``, ``edit``, ``query`` (alias ``generate``), ``undo``, ``export``, ``bench``.

Building the parser imports neither torch nor transformers (``rlsedit --help`` is fast): help texts
that show a library default are computed only when that help is printed, and every command imports
what it needs when it runs. A command checks its input (facts, flags, settings, paths, the device)
before it loads a model, and never reaches the Hugging Face Hub (``local_files_only``). Every error
is one line ``error: ...`` on stderr: exit status 2 for a malformed command line (argparse), 1 for
anything found while running.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["main", "build_parser"]

log = logging.getLogger("rlsedit")

# Facts SmolLM2-135M knows (spec A), rewritten in two lifelong calls; neighbours must not move.
DEMO_CALLS = [
    [
        {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target": "Rome"},
        {"prompt": "{} is located in the city of", "subject": "The Louvre", "target": "London"},
    ],
    [
        {"prompt": "{} is located in the city of", "subject": "The Colosseum", "target": "Berlin"},
        {"prompt": "{} is a car company from", "subject": "Toyota", "target": "Germany"},
    ],
]
DEMO_NEIGHBOURS = [
    "The Statue of Liberty is located in the city of",
    "The Brandenburg Gate is located in the city of",
    "Mount Fuji is located in the country of",
    "The capital of Italy is the city of",
]
# Facts Gemma-3-270M gets right before editing (checked with BOS, top-1 first word).
GEMMA_DEMO_CALLS = [
    [
        {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target": "Rome"},
        {"prompt": "{} is located in the city of", "subject": "The Colosseum", "target": "Berlin"},
    ],
    [
        {"prompt": "{} is a car company from", "subject": "Toyota", "target": "Germany"},
        {"prompt": "The official language of {} is", "subject": "Brazil", "target": "Spanish"},
    ],
]
GEMMA_DEMO_NEIGHBOURS = ["The capital of Japan is", "The mother tongue of Danielle Darrieux is"]
#: Per offline model: the demo's two lifelong calls and the neighbouring prompts that must not move.
DEMOS = {"smollm2": (DEMO_CALLS, DEMO_NEIGHBOURS), "gemma3-270m": (GEMMA_DEMO_CALLS, GEMMA_DEMO_NEIGHBOURS)}


def _prompt_ids(model, tok, prompt: str):
    """``(1, T)`` token ids of a prompt as the editor reads it (BOS where the family needs it)."""
    import torch

    from rlsedit_llm.pipeline.tokens import encode_prompt, input_device, needs_bos

    return torch.tensor([encode_prompt(tok, prompt, bos=needs_bos(model))], device=input_device(model))


def _generate(model, tok, prompt: str, n: int) -> str:
    """The greedy continuation (at most ``n`` tokens, up to EOS) of ``prompt``."""
    import torch

    ids = _prompt_ids(model, tok, prompt)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _next_tokens(model, tok, prompt: str, k: int) -> list[tuple[str, float]]:
    """The ``k`` most probable next tokens after ``prompt`` and their probabilities."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=_prompt_ids(model, tok, prompt)).logits[0, -1].float()
    probs, ids = torch.softmax(logits, dim=-1).topk(min(k, logits.numel()))
    return [(tok.decode([i]), float(p)) for p, i in zip(probs.tolist(), ids.tolist(), strict=True)]


def _greedy(model, tok, prompt: str, n: int = 4) -> str:
    return _generate(model, tok, prompt, n).strip()


def _answer(text: str) -> str:
    """The first word of a continuation, lower-cased, without punctuation."""
    words = text.split()
    return words[0].strip(".,;:!?").lower() if words else ""


def _demo(args) -> int:
    import rlsedit_llm
    from rlsedit_llm.editing.methods import edit_config_from_mapping

    data = _read_config_file(Path(args.config)) if args.config is not None else {}
    given = {"stats_tokens": args.stats_tokens} if args.stats_tokens is not None else {}
    if "stats_tokens" not in data and not given:
        given["stats_tokens"] = DEMO_STATS_TOKENS
    config = _with_file(args.config, lambda: edit_config_from_mapping(data, **given))
    loading = _model_request(args)
    t0 = time.perf_counter()
    calls, neighbours = DEMOS[args.model]
    model, tok = _load_model(args, loading)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s")
    facts = [rlsedit_llm.as_fact(f) for call in calls for f in call]
    watch = [f.text() for f in facts] + neighbours
    before = {p: _greedy(model, tok, p) for p in watch}

    def show(title):
        print(f"\n{title}")
        for p in watch:
            now = _greedy(model, tok, p)
            mark = "" if now == before[p] else "   (was: " + before[p] + ")"
            print(f"  {p!r:<60} -> {now!r}{mark}")

    show("before editing")
    for i, call in enumerate(calls, 1):
        t = time.perf_counter()
        report = rlsedit_llm.edit(model, call, tokenizer=tok, config=config)
        print(f"\ncall {i} ({time.perf_counter() - t:.1f} s):\n{report}")
        show(f"after call {i}")

    first = [rlsedit_llm.as_fact(f) for f in calls[0]]
    survived = sum(_answer(_greedy(model, tok, f.text())) == f.target.lower() for f in first)
    moved = sum(_answer(_greedy(model, tok, p)) != _answer(before[p]) for p in neighbours)
    print(f"\nfirst call's edits still hold after the second: {survived}/{len(first)}")
    print(f"neighbouring prompts whose answer (first word) changed: {moved}/{len(neighbours)}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0


class CLIError(Exception):
    """A problem with the command line's input, reported as one line."""


# ----------------------------------------------------------------------------------------------
# Models: name, device, dtype (checked before anything is loaded)

#: Values of ``--device``; ``auto`` is CUDA, else MPS, else the CPU.
_DEVICE_RE = re.compile(r"^(cpu|cuda(:[0-9]+)?|mps|auto)$")
#: Values of ``--dtype``; ``auto`` is the checkpoint's own (float32 for the offline GGUF models).
DTYPES = ("float32", "bfloat16", "float16", "auto")


def _device_text(text: str) -> str:
    value = text.strip().lower()
    if not _DEVICE_RE.match(value):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N, mps or auto; got {text!r}")
    return value


def _looks_like_path(name: str) -> bool:
    """A ``--model`` value that can only be a folder: it holds a slash (or the OS's separator) or
    starts with ``.`` or ``~``. (``org/model`` may also be a Hugging Face id, found in the local cache.)"""
    return name.startswith((".", "~")) or "/" in name or os.sep in name


def _in_hub_cache(name: str) -> bool:
    """Whether the local Hugging Face cache holds the model ``name`` (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:  # not a valid repo id, no huggingface_hub: not there
        return False


def _check_model_name(name: str) -> None:
    """A ``--model`` that names a path must exist: ``no model at PATH`` before anything is
    imported or looked up (an id ``org/model`` in the local Hugging Face cache is accepted)."""
    if not _looks_like_path(name) or Path(name).expanduser().exists():
        return
    if not name.startswith(("/", ".", "~")) and _in_hub_cache(name):
        return
    raise CLIError(f"no model at {name}")


def _torch_device(text: str | None) -> Any:
    """The ``torch.device`` of ``--device`` (``None``: where the model loads, the CPU), refused
    with one line when this machine has no such device."""
    if text is None:
        return None
    import torch

    mps = getattr(torch.backends, "mps", None)
    has_mps = mps is not None and mps.is_available()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = " (this torch is a CPU-only build)" if torch.version.cuda is None else ""
            raise CLIError(f"--device {text}: no CUDA device is visible{build}; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CLIError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                           f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if device.type == "mps" and not has_mps:
        raise CLIError(f"--device {text}: MPS (Apple GPU) is not available here; use --device cpu")
    return device


def _torch_dtype(text: str, model: str) -> Any:
    """The ``torch.dtype`` of ``--dtype``; ``auto``: the one the checkpoint's config names (float32
    for the offline models and when it names none)."""
    import torch

    if text != "auto":
        return getattr(torch, text)
    from rlsedit_llm.adapters.loading import OFFLINE_MODELS

    if model.lower() in OFFLINE_MODELS:
        return torch.float32
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(os.path.expanduser(model), local_files_only=True)
        named = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    except Exception:  # load_model reports an unloadable model
        named = None
    if isinstance(named, str):
        named = getattr(torch, named, None)
    return named if isinstance(named, torch.dtype) else torch.float32


class _ModelRequest(NamedTuple):
    device: Any  # torch.device | None
    dtype: Any  # torch.dtype


def _model_request(args) -> _ModelRequest:
    """``--model``, ``--device``, ``--dtype`` checked (in that order) before anything is loaded."""
    _check_model_name(args.model)  # again: cheap
    device = _torch_device(args.device)
    return _ModelRequest(device, _torch_dtype(args.dtype, args.model))


def _load_model(args, request: _ModelRequest | None = None):
    """``(model, tokenizer)`` of ``--model`` as asked; never reaches the Hugging Face Hub."""
    import rlsedit_llm

    request = request if request is not None else _model_request(args)
    name = os.path.expanduser(args.model) if args.model.startswith("~") else args.model
    return rlsedit_llm.load_model(name, dtype=request.dtype, device=request.device, local_files_only=True)


# ----------------------------------------------------------------------------------------------
# Saved streams


def _saved_stream(state: Path) -> str:
    """The method of the stream saved in ``state`` (``"layer"`` for an :class:`Editor` save);
    one line when there is none."""
    if not state.is_dir():
        raise CLIError(f"no saved edit state at {state}: no such folder")
    method = _saved_method(state)
    if method is None:
        raise CLIError(f"no saved edit state in {state} (it holds no editor.json; `rlsedit edit --state` writes one)")
    return method


def _load_editor(saved: str, model, tok, state: Path):
    """The editor of the stream saved in ``state``, put onto ``model``."""
    import rlsedit_llm
    from rlsedit_llm.editing.methods import load_editor

    if saved == "layer":
        return rlsedit_llm.Editor.load(model, tok, state)
    return load_editor(saved, model, tok, state)


def _read_facts(path: Path) -> list:
    """The records of a JSON list/object file or a JSONL file, each checked to be a fact; errors
    name ``file:line``."""
    from rlsedit_llm.errors import FactError
    from rlsedit_llm.pipeline.facts import as_fact

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CLIError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    records = []  # (line, record)
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CLIError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
        for i, rec in enumerate(data if isinstance(data, list) else [data]):
            records.append((f"{path}: record {i + 1}", rec))
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise CLIError(f"{path}:{lineno}: invalid JSON at column {exc.colno}: {exc.msg}") from None
    for where, rec in records:
        try:
            as_fact(rec)
        except FactError as exc:
            raise FactError(f"{where}: {exc}") from None
    if not records:
        raise CLIError(f"{path}: no facts in the file")
    return [rec for _, rec in records]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1; got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1; got {value}")
    return value


def _path_text(text: str) -> str:
    """A file or folder argument: refused before anything runs when empty (it would name the
    current folder) or holding NUL."""
    if not text.strip() or "\0" in text:
        raise argparse.ArgumentTypeError(f"expected a file or folder path; got {text!r}")
    return text


def _layer_list(text: str) -> tuple[int, ...]:
    try:
        layers = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer indices such as 3,4,5; got {text!r}") from None
    return layers


#: `rlsedit edit` flags that set EditConfig fields of a new stream (None: not given).
_CONFIG_FLAGS = ("layers", "alpha", "beta", "mom2_weight", "stats_tokens")


class _Request(NamedTuple):
    """What `rlsedit edit` was asked for: the config of a new stream, and what was given explicitly
    (by --config or flags), which a continued stream must not change."""

    config: Any  # EditConfig
    fields: dict  # EditConfig fields given explicitly, method included
    settings: dict  # the method's settings given explicitly


#: Suffixes of a YAML `--config` file (any other is read as JSON).
YAML_SUFFIXES = (".yaml", ".yml")


def _yaml_loader() -> Any:
    """PyYAML's safe loader, reading ``1e-3`` as a float as JSON does (YAML 1.1 needs ``1.0e-3``)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+"
                   r"(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
        list("-+0123456789."))
    return Loader


def _read_config_file(path: Path) -> dict:
    """The object of a `--config` file: JSON, or YAML (``.yaml``/``.yml``, needs PyYAML); EditConfig
    fields, `method_config` an object of the method's settings."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CLIError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if path.suffix.lower() in YAML_SUFFIXES:
        if importlib.util.find_spec("yaml") is None:
            raise CLIError(f"{path}: a YAML config needs PyYAML (pip install pyyaml); or write the file as JSON")
        import yaml

        try:
            data = yaml.load(text, Loader=_yaml_loader())  # noqa: S506  (a SafeLoader subclass)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else f"{path}"
            raise CLIError(f"{where}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from None
        kind = "YAML mapping"
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CLIError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
        kind = "JSON object"
    if not isinstance(data, dict):
        raise CLIError(f"{path}: a config file holds one {kind} of EditConfig fields")
    return data


def _with_file(path: str | None, build: Callable[[], Any]) -> Any:
    """``build()``, a :class:`HyperparameterError` naming the `--config` file it came from."""
    from rlsedit_llm.errors import HyperparameterError

    try:
        return build()
    except HyperparameterError as exc:
        raise HyperparameterError(f"{path}: {exc}" if path is not None else str(exc)) from None


def _edit_request(args) -> _Request:
    """The validated config of `rlsedit edit`: the --config file, then the flags over it."""
    data = _read_config_file(Path(args.config)) if args.config is not None else {}  # before the imports
    from rlsedit_llm.editing.config import EditConfig
    from rlsedit_llm.editing.methods import edit_config_from_mapping, parse_settings
    from rlsedit_llm.errors import HyperparameterError

    given = {k: getattr(args, k) for k in _CONFIG_FLAGS if getattr(args, k) is not None}
    method = args.method or data.get("method") or EditConfig.method
    try:
        settings = parse_settings(method, args.set or [])
        config = edit_config_from_mapping(data, method=method, settings=settings, **given)
    except HyperparameterError as exc:
        where = f"{args.config}: " if args.config is not None else ""
        raise HyperparameterError(f"{where}{exc}") from None
    fields = {k: getattr(config, k) for k in {*data, *given} - {"method", "method_config"}}
    if args.method is not None or "method" in data:
        fields["method"] = method
    named = {*(data.get("method_config") or {}), *settings}
    chosen = config.resolved_method_config()
    return _Request(config, fields, {k: getattr(chosen, k) for k in named})


def _edit(args) -> int:
    _check_model_name(args.model)  # before anything is imported: a missing model folder fails at once
    facts = _read_facts(Path(args.facts))  # before loading the model: a bad file fails fast
    request = _edit_request(args)  # likewise a bad setting
    loading = _model_request(args)  # and a device this machine lacks
    state = Path(args.state) if args.state is not None else None
    if state is None:
        return _edit_stream(args, facts, request, None, loading)
    from rlsedit_llm.editing.folder_lock import state_lock

    # One writer per state folder from before the model is loaded until after the save: a second
    # `rlsedit edit` on the same folder fails at once instead of overwriting this one's edits.
    with state_lock(state):
        if args.new_stream and _saved_method(state) is not None:
            raise CLIError(f"--new-stream starts a new stream, but {state} holds a saved one (continued without the "
                           f"flag); give another --state folder")
        return _edit_stream(args, facts, request, state, loading)


def _saved_method(state: Path) -> str | None:
    """The method whose saved stream ``state`` holds (None: no saved stream)."""
    from rlsedit_llm.editing.save_paths import MANIFEST
    from rlsedit_llm.kernel.registry import get_method, method_names

    if (state / MANIFEST).exists():
        return "layer"
    for name in method_names():
        state_file = getattr(get_method(name), "state_file", None)
        if state_file is not None and (state / state_file).exists():
            return name
    return None


def _refuse_changes(state: Path, editor, request: _Request) -> None:
    """A continued stream keeps its saved settings: refuse explicitly given ones that differ."""
    config = getattr(editor, "config", None)  # the EditConfig of a layer-solver editor
    saved_method = config.method if config is not None else editor.name
    saved_settings = config.resolved_method_config() if config is not None else editor.method_config

    def show(value) -> str:
        return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)

    differ = []
    for k, v in request.fields.items():
        if k == "layers":
            saved = editor.layers_
        elif k == "method":
            saved = saved_method
        elif config is not None:
            saved = getattr(config, k)
        else:
            continue  # a field the editor-level method does not have
        if (tuple(v) if k == "layers" else v) != saved:
            differ.append(f"{k.replace('_', '-')} {show(v)} (saved: {show(saved)})")
    if request.fields.get("method", saved_method) == saved_method:
        differ += [f"{k}={v} (saved: {getattr(saved_settings, k)})" for k, v in request.settings.items()
                   if v != getattr(saved_settings, k)]
    if differ:
        raise CLIError(f"{state} continues a saved stream whose settings cannot change: {'; '.join(differ)}. "
                       f"Drop these settings, or use a new --state folder")


def _edit_stream(args, facts: list, request: _Request, state: Path | None, loading: _ModelRequest) -> int:
    from rlsedit_llm.editing.methods import make_editor

    model, tok = _load_model(args, loading)
    saved = _saved_method(state) if state is not None else None
    if state is not None and saved is not None:
        editor = _load_editor(saved, model, tok, state)
        _refuse_changes(state, editor, request)
        log.info("continuing the stream saved in %s (%d batches)", state, editor.n_batches_)
    else:
        from rlsedit_llm.errors import StreamError

        try:
            editor = make_editor(request.config.method, model, tok, request.config, new_stream=args.new_stream)
        except StreamError as exc:
            raise CLIError(f"{exc}. On the command line: give that stream's folder as --state, or pass "
                           f"--new-stream") from None
    for start in range(0, len(facts), args.batch):
        print(editor.edit(facts[start:start + args.batch]))
    if state is not None:
        editor.save(state)
        print(f"saved the edit state to {state}")
    return 0


def _query(args) -> int:
    """`rlsedit query`: the greedy continuation of each prompt (and the top-k next tokens) on the
    model, with the saved stream of ``--state`` put onto it first."""
    _check_model_name(args.model)
    state = Path(args.state) if args.state is not None else None
    saved = _saved_stream(state) if state is not None else None
    model, tok = _load_model(args)
    if state is not None and saved is not None:
        editor = _load_editor(saved, model, tok, state)
        log.info("loaded the stream saved in %s (%d batches)", state, editor.n_batches_)
    for prompt in args.prompt:
        print(f"{prompt!r} -> {_generate(model, tok, prompt, args.max_new_tokens)!r}")
        if args.top_k:
            for rank, (token, p) in enumerate(_next_tokens(model, tok, prompt, args.top_k), 1):
                print(f"  {rank:>3}. {token!r:<24} {p:.4f}")
    return 0


def _fact_text(fact: dict) -> str:
    """``'prompt with subject' -> 'target'`` of a fact saved in a manifest's journal."""
    prompt, subject = str(fact.get("prompt", "")), str(fact.get("subject", ""))
    return f"{prompt.replace('{}', subject, 1)!r} -> {str(fact.get('target', ''))!r}"


def _journal(state: Path, saved: str) -> tuple[str, list[dict]]:
    """The method and the journal entries (``edit_id``, ``created``, ``facts``) of a save, read from
    its manifest alone (no model); one line for a method that keeps no journal."""
    if saved != "layer":
        raise CLIError(f"{state} holds a stream of the editor-level method {saved!r}, which keeps no journal: "
                       "its edits cannot be listed or undone one by one")
    from rlsedit_llm.editing.state import read_manifest

    manifest = read_manifest(state)
    method = str((manifest.get("config") or {}).get("method", "rlsedit"))
    journal = manifest.get("journal")
    if not isinstance(journal, list) or not all(isinstance(e, dict) and "edit_id" in e for e in journal):
        raise CLIError(f"{state}: the saved journal is malformed; the save is damaged")
    return method, journal


def _undo(args) -> int:
    """`rlsedit undo`: ``--list`` the journal, or retract ``--edit-id`` edits and save the state back."""
    from rlsedit_llm.editing.folder_lock import state_lock
    from rlsedit_llm.kernel.registry import capabilities

    if not args.list:
        _check_model_name(args.model)
    state = Path(args.state)
    method, journal = _journal(state, _saved_stream(state))
    if args.list:
        print(f"{state}: method {method}, {len(journal)} edit(s) in the journal")
        for entry in journal:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(float(entry.get("created") or 0)))
            facts = entry.get("facts") or [{}]
            print(f"  edit {entry['edit_id']:<5} {when}  {_fact_text(facts[0])}")
            for fact in facts[1:]:
                print(f"  {'':<27} {_fact_text(fact)}")
        return 0
    if not capabilities(method).retracts:
        raise CLIError(f"the stream in {state} is of method {method!r}, which keeps no exact memory of past edits: "
                       "its edits cannot be undone (methods that can: rlsedit, memit_seq)")
    ids = [int(e["edit_id"]) for e in journal]
    missing = [i for i in args.edit_id if i not in ids]
    if missing:
        raise CLIError(f"no edit {', '.join(map(str, missing))} in {state} (its journal holds ids {ids}; "
                       f"`rlsedit undo --state {state} --list` shows them)")
    loading = _model_request(args)
    with state_lock(state):  # one writer per state folder, from the load until after the save
        model, tok = _load_model(args, loading)
        editor = _load_editor("layer", model, tok, state)
        for edit_id in dict.fromkeys(args.edit_id):
            facts = next(r.facts for r in editor.journal_ if r.edit_id == edit_id)
            editor.undo(edit_id)
            print(f"retracted edit {edit_id}: " + "; ".join(f"{f.text()!r} -> {f.target!r}" for f in facts))
        editor.save(state)
    print(f"saved the edit state to {state}")
    return 0


def _export(args) -> int:
    """`rlsedit export`: the model with the saved stream of ``--state`` on it, written in Hugging
    Face format (``save_pretrained``) to a new folder."""
    _check_model_name(args.model)
    out = Path(args.out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CLIError(f"{out} already exists and is not an empty folder; export to a new folder")
    state = Path(args.state)
    saved = _saved_stream(state)
    model, tok = _load_model(args)
    editor = _load_editor(saved, model, tok, state)
    if args.out_dtype is not None:
        import torch

        model.to(dtype=getattr(torch, args.out_dtype))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))  # then renamed: no half export
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    journal = getattr(editor, "journal_", None)
    held = f"{len(journal)} edit(s) in its journal" if journal is not None else f"{editor.n_batches_} batch(es)"
    print(f"wrote the model with the stream saved in {state} ({held}) to {out}")
    return 0


def _config_default(name: str) -> str:
    """``"default X"`` for an `rlsedit edit` flag, from :class:`EditConfig` (the one home of the defaults)."""
    from rlsedit_llm.editing.config import EditConfig

    return f"default {EditConfig.__dataclass_fields__[name].default}"


def _comma_list(flag: str, text: str, item: type, example: str) -> tuple:
    """``"a,b"`` -> ``(a, b)`` of ``item``; a typed error that names ``flag`` otherwise."""
    from rlsedit_llm.errors import HyperparameterError

    try:
        return tuple(item(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise HyperparameterError(f"{flag} takes comma-separated {example}; got {text!r}") from None


#: `rlsedit bench` flags of one method's own settings: flag -> (method, setting).
_METHOD_FLAGS = {"ft_lr": ("ft", "lr"), "ft_steps": ("ft", "steps"), "ultraedit_lr": ("ultraedit", "lr"),
                 "ultraedit_ridge": ("ultraedit", "ridge")}


def _bench_config(args: argparse.Namespace):
    """The :class:`BenchConfig` of the parsed `rlsedit bench` flags: comma lists and 'all'
    parsed here, the per-method flags gathered into ``method_settings``."""
    from rlsedit_llm.errors import HyperparameterError
    from rlsedit_llm.evaluation.bench_config import DEFAULT_METHOD_SETTINGS, BenchConfig
    from rlsedit_llm.kernel.registry import method_names

    given = {k: v for k, v in vars(args).items() if k not in ("command", "func", "verbose")}
    if "methods" in given:
        text = given["methods"]
        given["methods"] = method_names() if text.strip() == "all" else \
            _comma_list("--methods", text, str, "registered method names, or 'all'")
    if "layers" in given:
        given["layers"] = _comma_list("--layers", given["layers"], int, "layer indices, e.g. 3,4,5")
    if "shadow" in given:
        given["shadow"] = _comma_list("--shadow", given["shadow"], str, "method names, e.g. memit_seq")
    if "score_all_at" in given:
        given["score_all_at"] = _comma_list("--score-all-at", given["score_all_at"], int, "edit counts, e.g. 300,600")
    settings = {m: dict(s) for m, s in DEFAULT_METHOD_SETTINGS.items()}
    for flag, (method, name) in _METHOD_FLAGS.items():
        if flag in given:
            value = given.pop(flag)
            if method == "ultraedit" and not value > 0:
                raise HyperparameterError(f"--{flag.replace('_', '-')} must be > 0; got {value}")
            settings.setdefault(method, {})[name] = value
    return BenchConfig(**given, method_settings=settings)


def _bench(args: argparse.Namespace) -> int:
    config = _bench_config(args)
    if importlib.util.find_spec("matplotlib") is None:  # before any edit: the report's figures need it
        raise CLIError("rlsedit bench draws its figures with matplotlib, part of the bench extra: "
                       "pip install 'rlsedit[bench]'")
    from rlsedit_llm.evaluation.bench import run_bench

    return run_bench(config)


def _default(field: str) -> str:
    """``"default: X"`` for a flag, from :class:`BenchConfig` (the one home of the defaults)."""
    from rlsedit_llm.evaluation.bench_config import BenchConfig

    default = BenchConfig.field_default(field)
    return f"default: {','.join(map(str, default)) if isinstance(default, tuple) else default}"


def _ft_default(setting: str) -> str:
    from rlsedit_llm.evaluation.bench_config import DEFAULT_METHOD_SETTINGS

    return f"default: {DEFAULT_METHOD_SETTINGS['ft'][setting]}"


# ----------------------------------------------------------------------------------------------
# The parser: built without torch


class _Later(str):
    """A help text computed on first use (printing help, ``in``, ``str()``, ``%``), not when the
    parser is built: the defaults it shows live in modules that import torch. Its own ``str``
    value is a placeholder; :meth:`_Parser.format_help` puts the text in its place."""

    _make: Callable[[], str]
    _text: str | None

    def __new__(cls, make: Callable[[], str]) -> _Later:
        later = super().__new__(cls, "(shown with --help)")
        later._make, later._text = make, None
        return later

    def text(self) -> str:
        if self._text is None:
            self._text = self._make()
        return self._text

    def __str__(self) -> str:
        return self.text()

    def __format__(self, spec: str) -> str:
        return format(self.text(), spec)

    def __contains__(self, part: object) -> bool:
        return isinstance(part, str) and part in self.text()

    def __mod__(self, values: Any) -> str:  # argparse fills in %(default)s and the like
        return self.text() % values


class _LaterChoices:
    """``choices`` read from a module that imports torch only when argparse checks or shows them."""

    def __init__(self, load: Callable[[], Sequence[str]]) -> None:
        self._load = load
        self._items: tuple[str, ...] | None = None

    def _all(self) -> tuple[str, ...]:
        if self._items is None:
            self._items = tuple(self._load())
        return self._items

    def __contains__(self, value: object) -> bool:
        return value in self._all()

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``error: ...``, exit status 2) and whose
    :class:`_Later` help texts are computed when help is printed."""

    def format_help(self) -> str:
        for action in self._actions:
            if isinstance(action.help, _Later):
                action.help = action.help.text()
        return super().format_help()

    def error(self, message: str) -> Any:  # NoReturn in argparse
        self.exit(2, f"error: {' '.join(message.split())} (see `{self.prog} --help`)\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rlsedit")
    except PackageNotFoundError:  # a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The ``rlsedit`` command line: ``demo``, ``edit``, ``query``, ``undo``, ``export`` and ``bench``."""
    parser = _Parser(prog="rlsedit", description="Lifelong editing of causal language models by soft recursive "
                     "least squares (RLSEdit).", epilog="`rlsedit COMMAND --help` describes a command.")
    parser.add_argument("--version", action="version", version=f"rlsedit {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (and tracebacks of errors)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    _add_edit(sub)
    _add_query(sub)
    _add_undo(sub)
    _add_export(sub)
    _add_bench(sub)
    return parser


def _add_model_options(p: argparse.ArgumentParser, *, model_help: str = "'smollm2', 'gemma3-270m' or a local "
                       "folder (save_pretrained output; or a Hugging Face id already in the local cache); never "
                       "downloaded (default smollm2)", choices: Sequence[str] | None = None) -> None:
    """``--model``, ``--device`` and ``--dtype``: checked before anything is loaded."""
    p.add_argument("--model", default="smollm2", choices=choices, help=model_help)
    p.add_argument("--device", type=_device_text, metavar="DEVICE",
                   help="where the model runs: cpu (default), cuda, cuda:N, mps, or auto (cuda, else mps, else cpu); "
                        "a device this machine lacks is refused before loading")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="the dtype the model is loaded (and edited) in (default float32; auto: the checkpoint's). "
                        "A saved edit state loads only onto the dtype it was made in")


def _add_config_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=_path_text, metavar="FILE",
                   help="a JSON object (or, with PyYAML, a .yaml/.yml mapping) of EditConfig fields, its "
                        "method_config an object of the method's settings; flags override it")


#: `rlsedit demo`'s Wikipedia tokens for the key statistics (a quick first run).
DEMO_STATS_TOKENS = 20_000


def _add_demo(sub) -> None:
    demo = sub.add_parser("demo", help="edit an offline model (SmolLM2-135M by default) in two lifelong calls",
                          description="Edit an offline model in two lifelong calls and show its answers "
                                      "before and after.")
    _add_model_options(demo, model_help="the offline model to edit (default smollm2)", choices=sorted(DEMOS))
    _add_config_option(demo)
    demo.add_argument("--stats-tokens", type=_positive_int,
                      help=f"Wikipedia tokens for the key statistics (default {DEMO_STATS_TOKENS})")
    demo.set_defaults(func=_demo)


def _add_edit(sub) -> None:
    ed = sub.add_parser("edit", help="apply facts from a JSON/JSONL file, keeping state in DIR",
                        description="Apply facts from a JSON list or JSONL file, in batches; with --state, "
                                    "continue the stream saved there and save it back. The facts, the "
                                    "settings and the model's folder are checked before the model loads.")
    _add_model_options(ed)
    ed.add_argument("--facts", required=True, type=_path_text, help="JSON list or JSONL of facts")
    ed.add_argument("--state", type=_path_text,
                    help="edit-state directory (loaded if present, saved after; one `rlsedit edit` at a time)")
    ed.add_argument("--batch", type=_positive_int, default=10, help="facts per edit call (>= 1)")
    ed.add_argument("--new-stream", action="store_true",
                    help="start a new stream on a model that carries the edits of a stream whose state is not "
                         "given (an exported edited model); refused with a --state that holds a saved stream")
    ed.add_argument("--method", help=_Later(lambda: f"a registered method ({_config_default('method')}; "
                                                    "only for a new stream)"))
    ed.add_argument("--set", action="append", metavar="FIELD=VALUE",
                    help="a setting of the method's config, e.g. --set threshold=0.02 for alphaedit (repeatable; "
                         "only for a new stream)")
    _add_config_option(ed)
    ed.add_argument("--layers", type=_layer_list,
                    help="comma-separated layer indices (default: family default; only for a new stream)")
    ed.add_argument("--alpha", type=float, help=_Later(lambda: f"weight of ||W - W0||^2 "
                                                               f"({_config_default('alpha')}; only for a new stream)"))
    ed.add_argument("--beta", type=float, help=_Later(lambda: f"weight of the anchor term "
                                                              f"({_config_default('beta')}; only for a new stream)"))
    ed.add_argument("--mom2-weight", type=float, help=_Later(_mom2_help))
    ed.add_argument("--stats-tokens", type=int, help=_Later(lambda: f"Wikipedia tokens for the key statistics "
                                                                    f"({_config_default('stats_tokens')}; only for "
                                                                    "a new stream)"))
    ed.set_defaults(func=_edit)


def _mom2_help() -> str:
    from rlsedit_llm.editing.config import PUBLISHED_D_K, PUBLISHED_MOM2_WEIGHT

    return (f"N of the anchor N*E[kk^T] (default: {PUBLISHED_MOM2_WEIGHT:g} * d_k / {PUBLISHED_D_K}; "
            "only for a new stream)")


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0; got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0; got {value}")
    return value


def _prompt_text(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a non-empty prompt")
    return text


def _add_query(sub) -> None:
    q = sub.add_parser("query", aliases=["generate"], help="what the (edited) model says: greedy continuations",
                       description="Print the greedy continuation of each prompt, on the model with the stream "
                                   "saved in --state put onto it (the model as it is without --state).")
    _add_model_options(q)
    q.add_argument("--state", type=_path_text, help="a saved edit state (`rlsedit edit --state`) to put onto the model")
    q.add_argument("--prompt", action="append", required=True, type=_prompt_text,
                   help="a prompt to continue (repeatable)")
    q.add_argument("--max-new-tokens", type=_positive_int, default=20, help="tokens per continuation (default 20)")
    q.add_argument("--top-k", type=_positive_int, metavar="K",
                   help="also print the K most probable next tokens after each prompt, with their probabilities")
    q.set_defaults(func=_query)


def _add_undo(sub) -> None:
    u = sub.add_parser("undo", help="retract an edit from a saved stream (or --list its journal)",
                       description="Retract edits from the stream saved in --state (exactly: a Woodbury "
                                   "downdate) and save it back; --list prints the journal (no model needed).")
    _add_model_options(u)
    u.add_argument("--state", type=_path_text, required=True, help="the saved edit state (changed in place)")
    what = u.add_mutually_exclusive_group(required=True)
    what.add_argument("--edit-id", type=_nonnegative_int, action="append", metavar="N",
                      help="the id of the edit to retract (repeatable); `--list` shows the ids")
    what.add_argument("--list", action="store_true", help="print the journal: edit ids and their facts")
    u.set_defaults(func=_undo)


def _add_export(sub) -> None:
    e = sub.add_parser("export", help="write the edited model in Hugging Face format",
                       description="Put the stream saved in --state onto the model and write model and tokenizer "
                                   "with save_pretrained to a new folder (an existing non-empty one is refused).")
    _add_model_options(e)
    e.add_argument("--state", type=_path_text, required=True, help="the saved edit state to put onto the model")
    e.add_argument("--out", type=_path_text, required=True, help="the folder to write (new or empty)")
    e.add_argument("--out-dtype", choices=[d for d in DTYPES if d != "auto"],
                   help="the dtype of the written weights (default: --dtype's)")
    e.set_defaults(func=_export)


def _datasets() -> Sequence[str]:
    from rlsedit_llm.evaluation.data import DATASETS

    return DATASETS


def _add_bench(sub) -> None:
    bench = sub.add_parser("bench", help="sequential editing benchmark (CounterFact / zsRE)",
                           argument_default=argparse.SUPPRESS)  # defaults: BenchConfig's only
    bench.add_argument("--dataset", choices=_LaterChoices(_datasets), metavar="NAME",
                       help=_Later(lambda: f"one of {', '.join(_datasets())} ({_default('dataset')}); "
                                           "counterfact_simple: 21,567 records for long streams"))
    bench.add_argument("--model", help=_Later(lambda: _default("model")))
    bench.add_argument("--device", help="where the model runs: cpu (default), cuda, cuda:1, ...")
    bench.add_argument("--edits", type=int, help=_Later(lambda: _default("edits")))
    bench.add_argument("--batch", type=int, help=_Later(lambda: _default("batch")))
    bench.add_argument("--stream", type=int,
                       help="which stream of records: 0 (default) the data set's file order, S >= 1 other records "
                            "in another order, reproducible from S")
    bench.add_argument("--zsre-target", choices=("alt", "answer"),
                       help="zsRE: edit toward alt (default, EasyEdit's) or answers[0] (MEMIT's)")
    bench.add_argument("--methods", help=_Later(lambda: "comma-separated registered methods, or 'all' ("
                                                        + _default("methods") + "); an entry may name a variant "
                                                        "METHOD[@PRESET][+nas], e.g. alphaedit@released+nas"))
    bench.add_argument("--out", required=True)
    bench.add_argument("--stats-tokens", type=int,
                       help="Wikipedia tokens for the key statistics (default: 20000 below 100 edits, else 100000)")
    bench.add_argument("--checkpoints", type=int, help="retention re-scoring points")
    bench.add_argument("--glue", type=int, help="GLUE items per task (0: skip; default: 0 below 100 edits, "
                                                "else one per 10 edits up to 200)")
    bench.add_argument("--layers", help="comma-separated edited layers (default: family default)")
    bench.add_argument("--alpha", type=float, help="weight of ||W - W0||^2 (all Editor methods)")
    bench.add_argument("--beta", type=float, help="weight of the anchor term")
    bench.add_argument("--anchor-value-norms", action="store_true",
                       help="value-norm anchoring, the h0 rule: rescale each solved value to the model's norm at "
                            "that position (methods that solve values; NAS is the +nas variant of --methods)")
    bench.add_argument("--nas-reference-facts", type=_positive_int,
                       help="CounterFact rewrites NAS solves on the unedited model for its reference value norm "
                            "(default 1000, NAS's; the +nas variants)")
    bench.add_argument("--value-steps", type=_positive_int,
                       help="loss evaluations of each value optimisation (default: the method's and "
                            "family's, 25 on Llama-like models; methods that solve values)")
    bench.add_argument("--mom2-weight", type=float,
                       help="N in the anchor Gram N E[kk^T] (default: the Editor's, 15000 scaled by d_k/14336)")
    bench.add_argument("--cache-dir", help="key-statistics cache folder (default: the user cache)")
    bench.add_argument("--retention-fraction", type=float,
                       help=_Later(lambda: f"share of the stream tracked by the retention curve "
                                           f"({_default('retention_fraction')})"))
    bench.add_argument("--fluency-cases", type=int,
                       help="cases whose first generation prompt is scored for fluency (0: skip; "
                            "default: one per 20 edits, 5 to 50)")
    bench.add_argument("--fluency-tokens", type=int,
                       help="fluency length: rome, tokens of prompt plus generation; greedy-eos, new tokens (100)")
    bench.add_argument("--fluency-protocol", choices=("rome", "greedy-eos"),
                       help="rome (default of a new run: ROME's top-5 sampling to a fixed length) or greedy-eos "
                            "(greedy, stops at end-of-sequence); a resumed run keeps its own")
    bench.add_argument("--no-wild", action="store_true", help="skip the generation check (no teacher forcing)")
    bench.add_argument("--ft-lr", type=float,
                       help=_Later(lambda: "Adam learning rate of the FT baseline (" + _ft_default("lr") + ")"))
    bench.add_argument("--ft-steps", type=int,
                       help=_Later(lambda: "Adam steps per batch of the FT baseline (" + _ft_default("steps") + ")"))
    bench.add_argument("--ultraedit-lr", type=float,
                       help="UltraEdit's step size (default: the released 1e-6 scaled by 14336 / d_k)")
    bench.add_argument("--ultraedit-ridge", type=float, help="UltraEdit's ridge (default: the released 1)")
    bench.add_argument("--state-dir", help="where per-method resume states live (default OUT/state)")
    bench.add_argument("--keep-state", action="store_true", help="keep finished methods' editor states")
    bench.add_argument("--save-every", type=int,
                       help=_Later(lambda: "save the resume state every this many batches ("
                                           + _default("save_every") + ")"))
    bench.add_argument("--restart", action="store_true", help="discard earlier results in OUT and start over")
    bench.add_argument("--report-only", action="store_true", help="rebuild tables and plots from OUT/results.json")
    bench.add_argument("--quiet", action="store_true", help="no progress bars")
    bench.add_argument("--interleave", action="store_true",
                       help="run the methods round robin, one batch each (all methods keep the same "
                            "number of edits if the run is stopped); needs memory for every method's state")
    bench.add_argument("--shadow",
                       help="comma-separated Editor methods that write rlsedit's keys and values instead of "
                            "computing their own (solver-only comparison; exact for memit_seq, the same "
                            "estimator); needs --interleave")
    bench.add_argument("--score-all-at",
                       help="comma-separated edit counts at which every edit so far is re-scored "
                            "(to compare a long stream with shorter ones at equal length)")
    bench.add_argument("--time-budget", type=float,
                       help="with --interleave: after this many seconds finish the current round, score the "
                            "edits written so far and stop (rerun without it to continue the stream)")
    bench.add_argument("--extend-from", metavar="OLD",
                       help="start a longer stream from the finished run in OLD (same settings, kept states): "
                            "its edits are not written again, OLD is only read")
    bench.set_defaults(func=_bench)


#: Packages of the ``llm`` extra: a command that finds one missing names the extra.
_LLM_EXTRA = ("torch", "transformers", "safetensors", "accelerate", "tqdm", "datasets", "tokenizers",
              "huggingface_hub")


def _message(exc: BaseException, command: str) -> str:
    """The one line an error is reported as."""
    missing = (exc.name or "").split(".")[0] if isinstance(exc, ModuleNotFoundError) else ""
    if missing in _LLM_EXTRA:
        return f"rlsedit {command} needs {missing}, part of the llm extra: pip install 'rlsedit[llm]'"
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc  # KeyError's str() quotes it
    message = " ".join(str(text).split()) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in message:
        message = f"{exc.filename}: {message}"
    return message


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    from rlsedit_llm.errors import RLSEditError  # NumPy and SciPy only

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted; the model and edit state were left as before the current call",
              file=sys.stderr)
        return 130
    except (CLIError, RLSEditError, OSError, ValueError, ImportError) as exc:  # input, library, file, extras
        if args.verbose:
            log.exception("failed")
        print(f"error: {_message(exc, args.command)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
