"""Command line: ``rlsedit demo``, ``rlsedit edit``, ``rlsedit bench``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

__all__ = ["main"]

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


def _greedy(model, tok, prompt: str, n: int = 4) -> str:
    import torch

    from rlsedit_llm.pipeline.tokens import encode_prompt, input_device, needs_bos

    ids = torch.tensor([encode_prompt(tok, prompt, bos=needs_bos(model))], device=input_device(model))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def _answer(text: str) -> str:
    """The first word of a continuation, lower-cased, without punctuation."""
    words = text.split()
    return words[0].strip(".,;:!?").lower() if words else ""


def _demo(args) -> int:
    import rlsedit_llm

    t0 = time.perf_counter()
    calls, neighbours = DEMOS[args.model]
    model, tok = rlsedit_llm.load_model(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s")
    config = rlsedit_llm.EditConfig(stats_tokens=args.stats_tokens)
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


def _read_config_file(path: Path) -> dict:
    """The JSON object of a `--config` file (EditConfig fields; `method_config` the method's settings)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise CLIError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise CLIError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise CLIError(f"{path}: a config file holds one JSON object of EditConfig fields")
    return data


def _edit_request(args) -> _Request:
    """The validated config of `rlsedit edit`: the --config file, then the flags over it."""
    from rlsedit_llm.editing.config import EditConfig
    from rlsedit_llm.editing.methods import edit_config_from_mapping, parse_settings
    from rlsedit_llm.errors import HyperparameterError

    data = _read_config_file(Path(args.config)) if args.config is not None else {}
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
    from rlsedit_llm.editing.folder_lock import state_lock

    facts = _read_facts(Path(args.facts))  # before loading the model: a bad file fails fast
    request = _edit_request(args)  # likewise a bad setting
    state = Path(args.state) if args.state is not None else None
    if state is None:
        return _edit_stream(args, facts, request, None)
    # One writer per state folder from before the model is loaded until after the save: a second
    # `rlsedit edit` on the same folder fails at once instead of overwriting this one's edits.
    with state_lock(state):
        return _edit_stream(args, facts, request, state)


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


def _edit_stream(args, facts: list, request: _Request, state: Path | None) -> int:
    import rlsedit_llm
    from rlsedit_llm.editing.methods import load_editor, make_editor

    model, tok = rlsedit_llm.load_model(args.model)
    saved = _saved_method(state) if state is not None else None
    if state is not None and saved is not None:
        if saved == "layer":
            editor = rlsedit_llm.Editor.load(model, tok, state)
        else:
            editor = load_editor(saved, model, tok, state)
        _refuse_changes(state, editor, request)
        log.info("continuing the stream saved in %s (%d batches)", state, editor.n_batches_)
    else:
        editor = make_editor(request.config.method, model, tok, request.config)
    for start in range(0, len(facts), args.batch):
        print(editor.edit(facts[start:start + args.batch]))
    if state is not None:
        editor.save(state)
        print(f"saved the edit state to {state}")
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
    from rlsedit_llm.evaluation.bench import run_bench

    return run_bench(_bench_config(args))


def _default(field: str) -> str:
    """``"default: X"`` for a flag, from :class:`BenchConfig` (the one home of the defaults)."""
    from rlsedit_llm.evaluation.bench_config import BenchConfig

    default = BenchConfig.field_default(field)
    return f"default: {','.join(map(str, default)) if isinstance(default, tuple) else default}"


def _ft_default(setting: str) -> str:
    from rlsedit_llm.evaluation.bench_config import DEFAULT_METHOD_SETTINGS

    return f"default: {DEFAULT_METHOD_SETTINGS['ft'][setting]}"


def build_parser() -> argparse.ArgumentParser:
    """The ``rlsedit`` command line: ``demo``, ``edit`` and ``bench``."""
    parser = argparse.ArgumentParser(prog="rlsedit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_demo(sub)
    _add_edit(sub)
    _add_bench(sub)
    return parser


def _add_demo(sub) -> None:
    demo = sub.add_parser("demo", help="edit an offline model (SmolLM2-135M by default) in two lifelong calls")
    demo.add_argument("--model", choices=sorted(DEMOS), default="smollm2",
                      help="the offline model to edit (default smollm2)")
    demo.add_argument("--stats-tokens", type=int, default=20_000,
                      help="Wikipedia tokens for the key statistics (default 20000)")
    demo.set_defaults(func=_demo)


def _add_edit(sub) -> None:
    ed = sub.add_parser("edit", help="apply facts from a JSON/JSONL file, keeping state in DIR")
    ed.add_argument("--model", default="smollm2", help="'smollm2' or a HF model name/path")
    ed.add_argument("--facts", required=True, type=_path_text, help="JSON list or JSONL of facts")
    ed.add_argument("--state", type=_path_text,
                    help="edit-state directory (loaded if present, saved after; one `rlsedit edit` at a time)")
    ed.add_argument("--batch", type=_positive_int, default=10, help="facts per edit call (>= 1)")
    ed.add_argument("--method", help=f"a registered method ({_config_default('method')}; only for a new stream)")
    ed.add_argument("--set", action="append", metavar="FIELD=VALUE",
                    help="a setting of the method's config, e.g. --set threshold=0.02 for alphaedit (repeatable; "
                         "only for a new stream)")
    ed.add_argument("--config", type=_path_text, metavar="FILE.json",
                    help="a JSON object of EditConfig fields, its method_config an object of the method's "
                         "settings; flags override it")
    ed.add_argument("--layers", type=_layer_list,
                    help="comma-separated layer indices (default: family default; only for a new stream)")
    ed.add_argument("--alpha", type=float, help=f"weight of ||W - W0||^2 ({_config_default('alpha')}; "
                                                "only for a new stream)")
    ed.add_argument("--beta", type=float, help=f"weight of the anchor term ({_config_default('beta')}; "
                                               "only for a new stream)")
    from rlsedit_llm.editing.config import PUBLISHED_D_K, PUBLISHED_MOM2_WEIGHT

    ed.add_argument("--mom2-weight", type=float,
                    help=f"N of the anchor N*E[kk^T] (default: {PUBLISHED_MOM2_WEIGHT:g} * d_k / {PUBLISHED_D_K}; "
                         "only for a new stream)")
    ed.add_argument("--stats-tokens", type=int, help=f"Wikipedia tokens for the key statistics "
                                                     f"({_config_default('stats_tokens')}; only for a new stream)")
    ed.set_defaults(func=_edit)


def _add_bench(sub) -> None:
    from rlsedit_llm.evaluation.data import DATASETS

    bench = sub.add_parser("bench", help="sequential editing benchmark (CounterFact / zsRE)",
                           argument_default=argparse.SUPPRESS)  # defaults: BenchConfig's only
    bench.add_argument("--dataset", choices=list(DATASETS),
                       help=_default("dataset") + "; counterfact_simple: 21,567 records for long streams")
    bench.add_argument("--model", help=_default("model"))
    bench.add_argument("--device", help="where the model runs: cpu (default), cuda, cuda:1, ...")
    bench.add_argument("--edits", type=int, help=_default("edits"))
    bench.add_argument("--batch", type=int, help=_default("batch"))
    bench.add_argument("--methods",
                       help="comma-separated registered methods, or 'all' (" + _default("methods") + ")")
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
                       help="value-norm anchoring: rescale each solved value to the model's norm at that "
                            "position (methods that solve values)")
    bench.add_argument("--value-steps", type=_positive_int,
                       help="loss evaluations of each value optimisation (default: the method's and "
                            "family's, 25 on Llama-like models; methods that solve values)")
    bench.add_argument("--mom2-weight", type=float,
                       help="N in the anchor Gram N E[kk^T] (default: the Editor's, 15000 scaled by d_k/14336)")
    bench.add_argument("--cache-dir", help="key-statistics cache folder (default: the user cache)")
    bench.add_argument("--retention-fraction", type=float,
                       help=f"share of the stream tracked by the retention curve ({_default('retention_fraction')})")
    bench.add_argument("--fluency-cases", type=int,
                       help="cases whose first generation prompt is scored for fluency (0: skip; "
                            "default: one per 20 edits, 5 to 50)")
    bench.add_argument("--fluency-tokens", type=int, help="greedy tokens per fluency prompt")
    bench.add_argument("--no-wild", action="store_true", help="skip the generation check (no teacher forcing)")
    bench.add_argument("--ft-lr", type=float, help="Adam learning rate of the FT baseline (" + _ft_default("lr") + ")")
    bench.add_argument("--ft-steps", type=int,
                       help="Adam steps per batch of the FT baseline (" + _ft_default("steps") + ")")
    bench.add_argument("--ultraedit-lr", type=float,
                       help="UltraEdit's step size (default: the released 1e-6 scaled by 14336 / d_k)")
    bench.add_argument("--ultraedit-ridge", type=float, help="UltraEdit's ridge (default: the released 1)")
    bench.add_argument("--state-dir", help="where per-method resume states live (default OUT/state)")
    bench.add_argument("--keep-state", action="store_true", help="keep finished methods' editor states")
    bench.add_argument("--save-every", type=int,
                       help="save the resume state every this many batches (" + _default("save_every") + ")")
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    from rlsedit_llm.errors import RLSEditError

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted; the model and edit state were left as before the current call",
              file=sys.stderr)
        return 130
    except (CLIError, RLSEditError, OSError, ValueError) as exc:  # input, library and file errors
        if args.verbose:
            log.exception("failed")
        message = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in message:
            message = f"{exc.filename}: {message}"
        print(f"error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
