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
import json
from pathlib import Path

from safetensors.torch import load_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args()
    a = load_file(str(args.a / "solvers.safetensors"))
    b = load_file(str(args.b / "solvers.safetensors"))
    edits = [len(json.loads((d / "editor.json").read_text()).get("journal", [])) for d in (args.a, args.b)]
    print(f"edit calls in the journals: {edits[0]} ({args.a.name}), {edits[1]} ({args.b.name})")
    layers = sorted({k.split(".")[0] for k in a if k.endswith(".W_")} & {k.split(".")[0] for k in b if k.endswith(".W_")},
                    key=lambda s: int(s.removeprefix("layer")))
    print("layer   ||W_a - W_b|| / ||W_a - W0||   max |W_a - W_b|")
    for layer in layers:
        wa, wb, w0 = a[f"{layer}.W_"].double(), b[f"{layer}.W_"].double(), a[f"{layer}.W0_"].double()
        gap = (wa - wb).norm() / (wa - w0).norm().clamp_min(1e-300)
        print(f"{layer:<8}{float(gap):>28.3e}{float((wa - wb).abs().max()):>18.3e}")


if __name__ == "__main__":
    main()
