"""Command line: ``rlsedit demo``, ``rlsedit edit``, ``rlsedit bench``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

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
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices such as 3,4,5; got {text!r}") from None
    return layers


#: `rlsedit edit` flags that set the config of a new stream (None: not given).
_CONFIG_FLAGS = {"layers": "layers", "alpha": "alpha", "beta": "beta", "mom2_weight": "mom2_weight",
                 "stats_tokens": "stats_tokens"}


def _edit(args) -> int:
    from rlsedit_llm.editing.folder_lock import state_lock

    facts = _read_facts(Path(args.facts))  # before loading the model: a bad file fails fast
    given = {k: getattr(args, k) for k in _CONFIG_FLAGS if getattr(args, k) is not None}
    state = Path(args.state) if args.state is not None else None
    if state is None:
        return _edit_stream(args, facts, given, None)
    # One writer per state folder from before the model is loaded until after the save: a second
    # `rlsedit edit` on the same folder fails at once instead of overwriting this one's edits.
    with state_lock(state):
        return _edit_stream(args, facts, given, state)


def _edit_stream(args, facts: list, given: dict, state: Path | None) -> int:
    import rlsedit_llm

    model, tok = rlsedit_llm.load_model(args.model)
    if state is not None and (state / "editor.json").exists():
        editor = rlsedit_llm.Editor.load(model, tok, state)
        saved = editor.config
        differ = [f"--{k.replace('_', '-')} {v if k != 'layers' else ','.join(map(str, v))} (saved: "
                  f"{getattr(saved, k) if k != 'layers' else ','.join(map(str, editor.layers_))})"
                  for k, v in given.items()
                  if (tuple(v) != tuple(editor.layers_) if k == "layers" else v != getattr(saved, k))]
        if differ:
            raise CLIError(f"{state} continues a saved stream whose settings cannot change: {'; '.join(differ)}. "
                           f"Drop these flags, or use a new --state folder")
        log.info("continuing the stream saved in %s (%d edits)", state, len(editor.journal_))
    else:
        defaults = {"alpha": 0.0, "beta": 1.0, "mom2_weight": None, "stats_tokens": 100_000, "layers": None}
        config = rlsedit_llm.EditConfig(**{**defaults, **given})
        editor = rlsedit_llm.Editor(model, tok, config)
    for start in range(0, len(facts), args.batch):
        print(editor.edit(facts[start:start + args.batch]))
    if state is not None:
        editor.save(state)
        print(f"saved the edit state to {state}")
    return 0


def _bench(args) -> int:
    from rlsedit_llm.evaluation.bench import BenchConfig, run_bench

    given = {k: v for k, v in vars(args).items() if k not in ("command", "func", "verbose")}
    return run_bench(BenchConfig(**given))


def _default(field: str) -> str:
    """``"default: X"`` for a flag, from :class:`BenchConfig` (the one home of the defaults)."""
    from rlsedit_llm.evaluation.bench import BenchConfig

    return f"default: {BenchConfig.__dataclass_fields__[field].default}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlsedit", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="edit an offline model (SmolLM2-135M by default) in two lifelong calls")
    demo.add_argument("--model", choices=sorted(DEMOS), default="smollm2",
                      help="the offline model to edit (default smollm2)")
    demo.add_argument("--stats-tokens", type=int, default=20_000,
                      help="Wikipedia tokens for the key statistics (default 20000)")
    demo.set_defaults(func=_demo)

    ed = sub.add_parser("edit", help="apply facts from a JSON/JSONL file, keeping state in DIR")
    ed.add_argument("--model", default="smollm2", help="'smollm2' or a HF model name/path")
    ed.add_argument("--facts", required=True, type=_path_text, help="JSON list or JSONL of facts")
    ed.add_argument("--state", type=_path_text,
                    help="edit-state directory (loaded if present, saved after; one `rlsedit edit` at a time)")
    ed.add_argument("--batch", type=_positive_int, default=10, help="facts per edit call (>= 1)")
    ed.add_argument("--layers", type=_layer_list,
                    help="comma-separated layer indices (default: family default; only for a new stream)")
    ed.add_argument("--alpha", type=float, help="default 0 (only for a new stream)")
    ed.add_argument("--beta", type=float, help="default 1 (only for a new stream)")
    ed.add_argument("--mom2-weight", type=float,
                    help="N of the anchor N*E[kk^T] (default: 15000 * d_k / 14336; only for a new stream)")
    ed.add_argument("--stats-tokens", type=int, help="default 100000 (only for a new stream)")
    ed.set_defaults(func=_edit)

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
                       help="share of the stream tracked by the retention curve (" + _default("retention_fraction") + ")")
    bench.add_argument("--fluency-cases", type=int,
                       help="cases whose first generation prompt is scored for fluency (0: skip; "
                            "default: one per 20 edits, 5 to 50)")
    bench.add_argument("--fluency-tokens", type=int, help="greedy tokens per fluency prompt")
    bench.add_argument("--no-wild", action="store_true", help="skip the generation check (no teacher forcing)")
    bench.add_argument("--ft-lr", type=float, help="Adam learning rate of the FT baseline")
    bench.add_argument("--ft-steps", type=int, help="Adam steps per batch of the FT baseline")
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
    return parser


def main(argv=None) -> int:
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
