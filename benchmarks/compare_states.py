"""How far apart are two saved editor states? Per edited layer, the weights' relative difference.

    .venv/bin/python benchmarks/compare_states.py STATE_A STATE_B

STATE_A and STATE_B are folders written by ``Editor.save`` (for example the per-method resume
states of ``rlsedit bench --keep-state``: ``OUT/state/rlsedit`` and ``OUT/state/memit_seq``).
For each layer it prints ``||W_A - W_B||_F / ||W_A - W0||_F`` (the gap relative to the edit
itself) and ``||W_A - W_B||_max``. With alpha = 0 RLSEdit and MEMIT-seq minimise the same
objective, so on one stream the gap is rounding plus whatever the value optimisation amplifies.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common beside this script, also when imported by path
from _common import read_saved_state


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args(argv)
    a, b = read_saved_state(args.a), read_saved_state(args.b)
    print(f"edit calls in the journals: {len(a['journal'])} ({args.a.name}), {len(b['journal'])} ({args.b.name})")
    print("layer   ||W_a - W_b|| / ||W_a - W0||   max |W_a - W_b|")
    for layer in sorted(set(a["solvers"]) & set(b["solvers"])):
        ta, tb = a["solvers"][layer]["tensors"], b["solvers"][layer]["tensors"]
        wa, wb, w0 = ta["W"].double(), tb["W"].double(), ta["W0"].double()
        gap = (wa - wb).norm() / (wa - w0).norm().clamp_min(1e-300)
        print(f"{'layer' + str(layer):<8}{float(gap):>28.3e}{float((wa - wb).abs().max()):>18.3e}")


if __name__ == "__main__":
    main()
