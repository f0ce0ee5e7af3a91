"""Every field of an editor state read from files, checked as if forged.

A save is user-supplied input: it can be damaged, or written by hand to make this code run for
ever, allocate without limit or build an editor that corrupts the model. :func:`validate_state`
checks every field (tensor names, shapes against the model's edited layers, dtypes and
finiteness; solver scalars; the value-optimisation settings, bounded; the templates; the journal)
before the editor is built, so the model is never touched by a bad save;
:func:`check_consistency` cross-checks a manifest against itself and its tensor files first.
:mod:`rlsedit_llm.editing.state` calls both when it reads a save.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, NoReturn

import torch

from rlsedit_llm.adapters.spec import detect_spec
from rlsedit_llm.errors import StateMismatchError
from rlsedit_llm.pipeline.values import MAX_VALUE_STEPS

if TYPE_CHECKING:
    from rlsedit_llm.adapters.spec import ModelSpec

__all__ = ["MAX_COUNT", "MAX_TEMPLATES", "MAX_TEXT_CHARS", "MAX_VALUE_STEPS", "check_consistency", "validate_state"]

#: Bounds on what a save may ask of this code: a forged save must not make an edit run for ever
#: or allocate without limit (the defaults are 25 steps, 6 templates of about 10 tokens).
#: ``MAX_VALUE_STEPS`` is :mod:`rlsedit_llm.pipeline.values`' own bound, imported above.
MAX_TEMPLATES = 1_000
MAX_TEXT_CHARS = 10_000
MAX_COUNT = 2**62
#: The tensors a method cannot work without (the others, e.g. the anchor Gram, may be absent).
_REQUIRED_TENSORS = {"rlsedit": ("W0", "W", "C"), "memit": ("W0", "W", "C"), "memit_seq": ("W0", "W", "G"),
                     "encore": ("W0", "W", "G"), "alphaedit": ("W0", "W", "P", "X")}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value) -> bool:
    return type(value) is int and 0 <= value <= MAX_COUNT


def validate_state(state: dict, model: torch.nn.Module, *, spec: ModelSpec | None = None) -> None:
    """Check every field of an editor state read from files as if it were forged; raise
    :class:`StateMismatchError` (``"the save is damaged or forged: <field> ..."``) at the first
    bad one. :func:`read_state` calls it, so the editor is never built from such a state.

    Checked: the config and the value-optimisation settings (valid, finite, ``steps`` at most
    :data:`MAX_VALUE_STEPS`); the layers (distinct ints of the model); the templates (at most
    :data:`MAX_TEMPLATES` strings of at most :data:`MAX_TEXT_CHARS` characters, each with exactly one
    ``{}`` slot); ``next_id``, the fingerprints and the stream id; per solver its method and state dtype, its tensor
    names (the method's own; the required ones present), every tensor's dtype (the state dtype),
    shape (``W0`` and ``W`` ``(d_k, d_v)`` of the model's edited layers, every other ``(d_k, d_k)``)
    and finiteness, its scalars (the method's names; counts ints >= 0, the rest finite numbers
    >= 0); per journal entry its time, facts, and keys and values (float, ``(rows, d_k)`` and
    ``(rows, d_v)``, finite). ``spec``: the model's, if already detected."""
    spec = spec if spec is not None else detect_spec(model)
    d_k, d_v = spec.d_k, spec.d_model
    _check_keys(state)
    config = _check_configs(state)
    layers = _check_layers(state["layers"], spec.n_layers)
    _check_templates(state["templates"])
    if not _is_count(state["next_id"]):
        _bad("next_id", f"must be an int in [0, 2**62]; got {state['next_id']!r}"[:300])
    if not isinstance(state["base_fingerprint"], str):
        _bad("base_fingerprint", "must be a string")
    stream = state.get("stream")  # absent in saves before streams were recorded
    if stream is not None and not (isinstance(stream, str) and len(stream) == 32
                                   and all(c in "0123456789abcdef" for c in stream)):
        _bad("stream", f"must be 32 hex digits; got {stream!r}"[:300])
    _check_solvers(state["solvers"], layers, config, (d_k, d_v))
    journal = state["journal"]
    if not isinstance(journal, list):
        _bad("journal", "must be a list")
    for entry in journal:
        _check_journal_entry(entry, layers, (d_k, d_v))


def _bad(field: str, why: str) -> NoReturn:
    """Refuse the save: ``field`` is wrong for the reason ``why``."""
    raise StateMismatchError(f"the save is damaged or forged: {field} {why}")


def _check_keys(state) -> None:
    """The state is a mapping with every top-level key."""
    if not isinstance(state, dict):
        _bad("the state", "is not a mapping")
    for key in ("config", "value_config", "layers", "templates", "next_id", "base_fingerprint", "solvers", "journal"):
        if key not in state:
            _bad(key, "is missing")


def _check_configs(state: dict):
    """The edit config (returned) and both value-optimisation configs are valid."""
    from rlsedit_llm.editing.config import EditConfig
    from rlsedit_llm.errors import RLSEditError

    try:
        config = EditConfig.from_dict(state["config"])
        config.validate()
    except (RLSEditError, TypeError, ValueError, KeyError, AttributeError) as exc:
        _bad("config", f"is invalid ({exc})")
    if config.value is not None:
        _check_value_config("config.value", config.value, _bad)
    _check_value_config("value_config", state["value_config"], _bad)
    return config


def _check_layers(layers, n_layers: int) -> list[int]:
    """The edited layers (returned): distinct indices of the model's layers."""
    if not (isinstance(layers, list) and layers and all(type(l) is int and 0 <= l < n_layers for l in layers)
            and len(set(layers)) == len(layers)):
        _bad("layers", f"must be distinct layer indices in [0, {n_layers}); got {layers!r}"[:300])
    return layers


def _check_templates(templates) -> None:
    """The context templates: null, or a bounded list of bounded strings with one ``{}`` slot."""
    from rlsedit_llm.errors import RLSEditError
    from rlsedit_llm.pipeline.keys import template_parts

    if templates is None:
        return
    if not (isinstance(templates, list) and 1 <= len(templates) <= MAX_TEMPLATES):
        _bad("templates", f"must be a list of 1 to {MAX_TEMPLATES} strings (or null)")
    for i, template in enumerate(templates):
        if not isinstance(template, str) or len(template) > MAX_TEXT_CHARS:
            _bad(f"templates[{i}]", f"must be a string of at most {MAX_TEXT_CHARS} characters")
        try:
            template_parts(template)
        except RLSEditError as exc:
            _bad(f"templates[{i}]", f"is unusable ({exc})")


def _check_solvers(solvers, layers: list[int], config, shape: tuple[int, int]) -> None:
    """The per-layer solvers: a mapping, empty unless the method keeps them, each one valid."""
    from rlsedit_llm.kernel.registry import get_method, is_layer_method

    if not isinstance(solvers, dict):
        _bad("solvers", "must be a mapping layer -> solver")
    if solvers and not is_layer_method(config.method):
        _bad("solvers", f"are saved for {config.method!r}, which keeps no per-layer solver")
    for layer, solver in solvers.items():
        _check_solver(f"solvers[{layer}]", layer, solver, layers, config, shape, _bad, get_method)


def _check_journal_entry(entry, layers: list[int], shape: tuple[int, int]) -> None:
    """One journal entry: a mapping with a valid id, creation time, facts, keys and values."""
    if not isinstance(entry, dict):
        _bad("journal", "entries must be mappings")
    where = f"journal edit {entry.get('edit_id')!r}"
    if not _is_count(entry.get("edit_id")):
        _bad(where, "has no valid id")
    if not _is_real(entry.get("created")):
        _bad(f"{where}: created", "must be a finite number (seconds since the epoch)")
    facts = _check_journal_facts(where, entry.get("facts"))
    for part, width in (("keys", shape[0]), ("values", shape[1])):
        _check_journal_tensors(f"{where}: {part}", entry.get(part), layers, (len(facts), width))


def _check_journal_facts(where: str, facts) -> list:
    """A journal entry's facts (returned): a non-empty list of records this rlsedit can read."""
    from rlsedit_llm.errors import RLSEditError
    from rlsedit_llm.pipeline.facts import Fact

    if not isinstance(facts, list) or not facts:
        _bad(f"{where}: facts", "must be a non-empty list")
    for record in facts:
        if not (isinstance(record, dict)
                and all(isinstance(record.get(k), str) for k in ("prompt", "subject", "target"))):
            _bad(f"{where}: facts", "must be records with string prompt, subject and target")
        try:
            Fact(**record)
        except (RLSEditError, TypeError, ValueError) as exc:
            _bad(f"{where}: facts", f"hold a record this rlsedit cannot read ({exc})")
    return facts


def _check_journal_tensors(where: str, tensors, layers: list[int], shape: tuple[int, int]) -> None:
    """A journal entry's keys or values: per edited layer a finite float tensor of ``shape``."""
    if not isinstance(tensors, dict) or sorted(tensors) != sorted(layers):
        _bad(where, f"must be given for the layers {layers}")
    for layer, t in tensors.items():
        field = f"{where} of layer {layer}"
        if not isinstance(t, torch.Tensor) or t.dtype not in _FLOAT_DTYPES:
            _bad(field, "must be a floating-point tensor")
        if tuple(t.shape) != shape:
            _bad(field, f"has shape {tuple(t.shape)}, not ({shape[0]}, {shape[1]})")
        if not torch.isfinite(t).all():
            _bad(field, "holds NaN or infinity")


def _check_value_config(field: str, value_config, bad) -> None:
    """A value-optimisation config (a dict from a save, or a ValueConfig): valid, every number
    finite, every string bounded, ``steps`` at most :data:`MAX_VALUE_STEPS`."""
    import dataclasses

    from rlsedit_llm.errors import RLSEditError
    from rlsedit_llm.pipeline.values import ValueConfig

    try:
        if not isinstance(value_config, ValueConfig):
            if not isinstance(value_config, dict):
                bad(field, "must be a mapping")
            value_config = ValueConfig(**value_config)
        value_config.validate()
    except (RLSEditError, TypeError, ValueError) as exc:
        if isinstance(exc, StateMismatchError):
            raise
        bad(field, f"is invalid ({exc})")
    for f in dataclasses.fields(ValueConfig):  # by the type of each default: fields added later are covered
        value, default = getattr(value_config, f.name), f.default
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = type(value) is int
        elif isinstance(default, float):
            ok = _is_real(value)
        elif isinstance(default, str):
            ok = isinstance(value, str) and len(value) <= MAX_TEXT_CHARS
        else:
            ok = True
        if not ok:
            bad(f"{field}.{f.name}", f"= {value!r} is not a valid {type(default).__name__}"[:300])
    if value_config.steps > MAX_VALUE_STEPS:
        bad(f"{field}.steps", f"= {value_config.steps} is above the most this rlsedit runs ({MAX_VALUE_STEPS})")


def _check_solver(field: str, layer, solver, layers, config, shape, bad, get_method) -> None:
    """One solver's method, dtype, tensors and scalars (see :func:`validate_state`)."""
    d_k, d_v = shape
    if layer not in layers:
        bad(field, f"is for a layer outside {layers}")
    if not (isinstance(solver, dict) and isinstance(solver.get("tensors"), dict)
            and isinstance(solver.get("scalars"), dict)):
        bad(field, "must hold a method, a dtype, tensors and scalars")
    method = solver.get("method")
    if method != config.method:
        bad(f"{field}.method", f"= {method!r} differs from the config's {config.method!r}")
    if solver.get("dtype") != config.state_dtype:
        bad(f"{field}.dtype", f"= {solver.get('dtype')!r} differs from the config's state dtype {config.state_dtype!r}")
    dtype = getattr(torch, config.state_dtype)
    cls = get_method(method)
    names = {a.rstrip("_") for a in cls.state_tensors}
    tensors = solver["tensors"]
    unknown = sorted(set(tensors) - names)
    if unknown:
        bad(f"{field}.tensors", f"hold {unknown}, which {method} does not have (it has {sorted(names)})")
    missing = [n for n in _REQUIRED_TENSORS.get(method, ("W0", "W")) if n not in tensors]
    if missing:
        bad(f"{field}.tensors", f"lack {missing}")
    for name, t in tensors.items():
        where = f"{field} tensor {name}"
        expected = (d_k, d_v) if name in ("W0", "W") else (d_k, d_k)
        if not isinstance(t, torch.Tensor) or t.dtype != dtype:
            bad(where, f"must be a {config.state_dtype} tensor; got {getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != expected:
            bad(where, f"has shape {tuple(t.shape)}; the model's edited layer needs {expected}")
        if not torch.isfinite(t).all():
            bad(where, "holds NaN or infinity")
    scalars = solver["scalars"]
    expected_scalars = {a.rstrip("_") for a in cls.state_scalars}
    if set(scalars) != expected_scalars:
        bad(f"{field}.scalars", f"are {sorted(scalars)}; {method} has {sorted(expected_scalars)}")
    for name, value in scalars.items():
        if name in ("n_updates", "n_rows"):
            if not _is_count(value):
                bad(f"{field}.scalars.{name}", f"= {value!r} must be an int >= 0"[:300])
        elif not (_is_real(value) and value >= 0):
            bad(f"{field}.scalars.{name}", f"= {value!r} must be a finite number >= 0"[:300])


def _damaged(msg: str) -> NoReturn:
    raise StateMismatchError(msg + "; the save is damaged or was edited by hand")


def check_consistency(manifest: dict, solver_tensors: dict[str, torch.Tensor],
                      journal_tensors: dict[str, torch.Tensor]) -> None:
    """Cross-check a (version-2 layout) manifest against itself and the tensors; raise
    :class:`StateMismatchError` naming the first inconsistency.

    The config against every solver's method and scalars (alpha, beta and the method config's own
    settings, e.g. AlphaEdit's threshold), the layers, edit ids
    (ints, unique, increasing, below ``next_id``), every solver's row count against the journal's
    rows, every journal entry's tensors (present, ``(rows, d_k)`` / ``(rows, d_v)``), every solver's
    W0 and W ``(d_k, d_v)``."""
    from rlsedit_llm.editing.config import EditConfig
    from rlsedit_llm.errors import RLSEditError

    bad = _damaged
    try:
        config = EditConfig.from_dict(manifest["config"])
        config.validate()
    except (RLSEditError, TypeError, KeyError, ValueError) as exc:
        bad(f"the saved config is invalid ({exc})")
    layers = manifest["layers"]
    if not (isinstance(layers, list) and all(type(l) is int for l in layers)):
        bad(f"layers must be a list of ints; got {layers!r}")
    if config.layers is not None and list(config.layers) != layers:
        bad(f"the config's layers {list(config.layers)} differ from the saved layers {layers}")
    next_id = manifest["next_id"]
    if type(next_id) is not int or next_id < 0:
        bad(f"next_id must be an int >= 0; got {next_id!r}")
    templates = manifest["templates"]
    if templates is not None and not (isinstance(templates, list) and all(isinstance(t, str) for t in templates)):
        bad("templates must be a list of strings")
    shape = (manifest["spec"]["d_k"], manifest["spec"]["d_model"])
    journal = manifest["journal"]
    if not isinstance(journal, list):
        bad("the journal must be a list")
    _check_edit_ids([e["edit_id"] for e in journal], next_id)
    solvers = manifest["solvers"]
    if not isinstance(solvers, dict):
        bad("solvers must be a mapping layer -> solver")
    if solvers and sorted(int(k) for k in solvers) != layers:
        bad(f"solvers saved for layers {sorted(int(k) for k in solvers)}, expected {layers}")
    if not solvers and journal:
        bad("the journal holds edits but no solver state was saved")
    rows = _check_journal(journal, journal_tensors, layers, shape)
    for key, meta in solvers.items():
        _check_saved_solver(key, meta, solver_tensors, config, rows, shape)


def _check_edit_ids(ids: list, next_id: int) -> None:
    """Edit ids: ints, unique, increasing, in ``[0, next_id)``."""
    if not all(type(i) is int for i in ids):
        _damaged(f"edit ids must be ints; got {ids}")
    if ids != sorted(set(ids)):
        _damaged(f"edit ids must be unique and increasing; got {ids}")
    if ids and not (0 <= ids[0] and ids[-1] < next_id):
        _damaged(f"edit ids {ids} must lie in [0, next_id = {next_id})")


def _check_journal(journal: list, journal_tensors: dict[str, torch.Tensor], layers: list[int],
                   shape: tuple[int, int]) -> int:
    """Every journal entry's facts and tensors; returns the journal's total number of rows."""
    bad, (d_k, d_v) = _damaged, shape
    rows = 0
    for entry in journal:
        eid, facts = entry["edit_id"], entry["facts"]
        if not (isinstance(facts, list) and facts and all(isinstance(f, dict) for f in facts)):
            bad(f"edit {eid}: facts must be a non-empty list of records")
        if sorted(entry["layers"]) != layers:
            bad(f"edit {eid}: keys saved for layers {entry['layers']}, expected {layers}")
        for l in entry["layers"]:
            K, V = journal_tensors.get(f"edit{eid}.layer{l}.K"), journal_tensors.get(f"edit{eid}.layer{l}.V")
            if K is None or V is None:
                bad(f"the journal file lacks the keys or values of edit {eid} at layer {l}")
            if tuple(K.shape) != (len(facts), d_k) or tuple(V.shape) != (len(facts), d_v):
                bad(f"edit {eid}, layer {l}: keys {tuple(K.shape)} and values {tuple(V.shape)} do not fit "
                    f"{len(facts)} fact(s) and ({d_k}, {d_v}) weights")
        rows += len(facts)
    return rows


def _check_saved_solver(key: str, meta: dict, solver_tensors: dict[str, torch.Tensor], config, rows: int,
                        shape: tuple[int, int]) -> None:
    """One solver's method and scalars against the config and the journal, and its W0 and W."""
    bad = _damaged
    if meta.get("method") != config.method:
        bad(f"layer {key}: solver of method {meta.get('method')!r}, config says {config.method!r}")
    scalars = meta["scalars"]
    for name in ("alpha", "beta"):
        if scalars.get(name) != getattr(config, name):
            bad(f"layer {key}: solver {name} = {scalars.get(name)!r}, config {name} = {getattr(config, name)!r}")
    for name, value in config.resolved_method_config().to_dict().items():  # the method's own settings
        if name in scalars and scalars[name] != value:
            bad(f"layer {key}: solver {name} = {scalars[name]!r}, the method config's {name} = {value!r}")
    if scalars.get("n_rows") != rows:
        bad(f"layer {key}: the solver holds {scalars.get('n_rows')!r} rows, the journal {rows}")
    for name in ("W0", "W"):
        t = solver_tensors.get(f"layer{key}.{name}")
        if t is None or tuple(t.shape) != shape:
            bad(f"layer {key}: {name} missing or not {shape}")
