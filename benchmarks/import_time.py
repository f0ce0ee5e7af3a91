"""How long a first contact with rlsedit takes: ``import rlsedit_llm`` and ``rlsedit --help``.

Each figure is the wall time of a fresh interpreter (a subprocess, so no module is cached in this
process), best of ``--trials``, next to the interpreter's own start (``python -c pass``) and
``import rlsedit_theory`` (NumPy and SciPy). The targets: the import under 2 s, the help under 1 s.
``--importtime`` adds the slowest imports of ``import rlsedit_llm`` (``python -X importtime``),
and a line saying whether torch, transformers, datasets or matplotlib were imported (they must not be).

    python benchmarks/import_time.py                 # best of 5
    python benchmarks/import_time.py --trials 3 --importtime
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common beside this script, also when imported by path
from _common import ROOT, best_of, cpu_name, load_average

HEAVY = ("torch", "transformers", "datasets", "matplotlib", "pandas", "pyarrow", "gguf", "sympy")
#: The targets (seconds) of the timed commands; the others are references.
TARGETS = {"import rlsedit_llm": 2.0, "rlsedit --help": 1.0}


def cli_command() -> list[str]:
    """``rlsedit --help`` as installed (the console script beside this interpreter), else through
    ``python -m rlsedit_llm.cli``."""
    script = shutil.which("rlsedit", path=str(Path(sys.executable).parent))
    return [script, "--help"] if script else [sys.executable, "-m", "rlsedit_llm.cli", "--help"]


def commands() -> dict[str, list[str]]:
    py = sys.executable
    return {"python -c pass": [py, "-c", "pass"],
            "import rlsedit_theory": [py, "-c", "import rlsedit_theory"],
            "import rlsedit_llm": [py, "-c", "import rlsedit_llm"],
            "rlsedit --help": cli_command()}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def time_command(argv: list[str], trials: int) -> float:
    """Wall seconds of ``argv`` in a fresh process, best of ``trials`` (one untimed run first, so
    the bytecode caches are written)."""
    def run() -> None:
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=_env(), cwd=ROOT)

    run()
    return best_of(run, trials)


def heavy_modules(code: str) -> list[str]:
    """The heavy modules a fresh interpreter holds after ``code``."""
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, env=_env(),
                         cwd=ROOT)
    return [m for m in out.stdout.strip().split(",") if m]


def slowest_imports(n: int) -> list[tuple[float, str]]:
    """The ``n`` imports of ``import rlsedit_llm`` with the largest cumulative time (seconds, name)."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import rlsedit_llm"], check=True,
                         capture_output=True, text=True, env=_env(), cwd=ROOT)
    rows = []
    for line in out.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[1].strip().isdigit():
            rows.append((int(parts[1]) / 1e6, parts[2].rstrip()))
    return sorted(rows, reverse=True)[:n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5, help="runs per command; the best counts (default 5)")
    parser.add_argument("--importtime", action="store_true", help="also list the slowest imports")
    args = parser.parse_args()
    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, load average {load_average():.2f}, "
          f"Python {sys.version.split()[0]}; best of {args.trials}")
    print(f"{'command':<24} {'seconds':>8}  target")
    for label, argv in commands().items():
        seconds = time_command(argv, args.trials)
        target = TARGETS.get(label)
        verdict = "" if target is None else f"< {target:g} s: {'met' if seconds < target else 'MISSED'}"
        print(f"{label:<24} {seconds:>8.3f}  {verdict}")
    heavy = heavy_modules("import rlsedit_llm, rlsedit_llm.cli\nrlsedit_llm.cli.build_parser().format_help()")
    print(f"heavy modules after import and --help: {', '.join(heavy) if heavy else 'none'}")
    if args.importtime:
        print("slowest imports of `import rlsedit_llm` (cumulative seconds):")
        for seconds, name in slowest_imports(10):
            print(f"  {seconds:>7.3f}  {name.strip()}")


if __name__ == "__main__":
    main()
