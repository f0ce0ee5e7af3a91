"""What the benchmark scripts share: the machine they ran on, best-of-n timing, the shipped
CounterFact records, and a saved editor state read without a model.

Not a library module: the scripts import it from beside them (``benchmarks/`` is put on
``sys.path`` by each script, so this also works when a test imports a script by its path).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from rlsedit_llm.editing import state as saved

ROOT = Path(__file__).resolve().parents[1]

__all__ = ["ROOT", "cpu_name", "load_average", "machine_description", "sync", "best_of", "counterfact_records",
           "read_saved_state"]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), name)
    except OSError:
        return name


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan


def machine_description(device: torch.device | str = "cpu") -> str:
    """One line: CPU, logical CPUs, torch and its threads, the load average, and the GPU on CUDA."""
    text = (f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
            f"torch threads {torch.get_num_threads()}, load average {load_average():.2f}")
    if torch.device(device).type == "cuda":
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def sync(device: torch.device | str | None) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def best_of(fn: Callable[[], object], trials: int, device: torch.device | str | None = None) -> float:
    """The shortest wall time of ``trials`` calls of ``fn`` (seconds): the most reproducible figure
    on a shared machine. On CUDA the device is synchronised around each call."""
    best = math.inf
    for _ in range(trials):
        sync(device)
        tic = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - tic)
    return best


def counterfact_records(n: int) -> list[dict]:
    """The first ``n`` records of the shipped CounterFact copy (``rlsedit_llm/data``)."""
    return json.loads((ROOT / "rlsedit_llm" / "data" / "counterfact.json").read_text())[:n]


def read_saved_state(directory: str | os.PathLike) -> dict:
    """The editor state dict of the save at ``directory`` without a model
    (:func:`rlsedit_llm.editing.state.read_state_files`: checksums, migration, the manifest
    cross-checked against the tensors); use :meth:`rlsedit_llm.Editor.load` to put a state on a model.

    Raises :class:`~rlsedit_llm.errors.StateMismatchError` for a damaged or foreign save.
    """
    return saved.read_state_files(Path(directory))


#: The stages of one edit call as the benchmarks print them: ``EditReport.seconds`` keys, and
#: ``"write"``, the update's share outside the solver's propose (targets and the weight write).
EDIT_STAGES = {"score": "report scoring", "values": "values", "keys": "keys", "solve": "solve",
               "write": "targets + write", "residual": "checks", "commit": "commit"}


def edit_stages(seconds: dict[str, float]) -> dict[str, float]:
    """One call's ``EditReport.seconds`` as :data:`EDIT_STAGES` (absent stages are 0)."""
    sec = dict(seconds)
    sec["write"] = sec.get("update", 0.0) - sec.get("solve", 0.0)
    return {stage: sec.get(stage, 0.0) for stage in EDIT_STAGES}
