"""Shared fixtures of the LLM-layer tests.

- ``smollm2``: the real offline SmolLM2-135M-Instruct ``(model, tokenizer)``, loaded once per
  session (fp32, eval mode; uses the on-disk dequantised cache after the first load). Only for
  tests marked ``@pytest.mark.slow``. Tests must leave its weights unchanged.
- ``tiny``: factory ``tiny(family, **kwargs) -> (model, tokenizer)`` building a fresh tiny random
  model offline (see :func:`rlsedit_llm.adapters.tiny.tiny_model`); cheap (tens of milliseconds).
- ``one_thread_unless_slow``: torch on one thread for the test, unless it is marked ``slow``
  (tiny matrices gain nothing from threads, and on shared CI cores OpenMP threads oversubscribe).
- ``benchmark_script``: factory ``benchmark_script(name)`` importing ``benchmarks/<name>.py`` as a
  module (the benchmark scripts are not a package).
- ``counterfact`` / ``counterfact_simple`` / ``zsre``: the raw records of the data sets (the copies
  shipped in ``rlsedit_llm/data`` first, else ``/work/shared/data``; skipped when neither exists).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from rlsedit_llm.adapters.tiny import tiny_model

DATA = Path("/work/shared/data")
_ROOT = Path(__file__).resolve().parents[2]
_PACKAGED = _ROOT / "rlsedit_llm" / "data"
#: Where each data fixture reads its records: the copy shipped in the package first (present in
#: every clone), else the shared reference folder.
DATASETS = {
    "counterfact": (_PACKAGED / "counterfact.json", DATA / "counterfact" / "counterfact.json"),
    "counterfact_simple": (_PACKAGED / "counterfact_simple.json", DATA / "counterfact" / "counterfact_simple.json"),
    "zsre": (_PACKAGED / "zsre_eval.json", DATA / "zsre" / "zsre_eval.json"),
}


@pytest.fixture(scope="session")
def benchmark_script():
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, _ROOT / "benchmarks" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


def _load_json(*candidates: Path):
    for path in candidates:
        if path.is_file():
            return json.loads(path.read_text())
    pytest.skip(f"data file not found: {candidates[0]}")


@pytest.fixture(scope="session")
def smollm2():
    from rlsedit_llm.adapters.loading import load_model

    return load_model("smollm2")


@pytest.fixture
def tiny():
    def make(family: str = "llama", **kwargs):
        return tiny_model(family, **kwargs)

    return make


@pytest.fixture
def one_thread_unless_slow(request):
    if request.node.get_closest_marker("slow") is not None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def counterfact():
    return _load_json(*DATASETS["counterfact"])


@pytest.fixture(scope="session")
def counterfact_simple():
    return _load_json(*DATASETS["counterfact_simple"])


@pytest.fixture(scope="session")
def zsre():
    return _load_json(*DATASETS["zsre"])


def counterfact_stream(model, tok, facts, cache_dir) -> tuple[float, float, float]:
    """Edit ``facts`` (CounterFact, 20) with RLSEdit in 4 calls of 5 on the real ``model`` and put
    its weights back; return the efficacy (new target more probable than the true one) before,
    after, and of the first call's 5 edits after all 4 calls."""
    import rlsedit_llm
    from rlsedit_llm.pipeline.scoring import score_targets

    saved = {n: p.detach().clone() for n, p in model.named_parameters()}

    def efficacy(fs):
        new = score_targets(model, tok, [f.text() for f in fs], [f.target for f in fs])
        true = score_targets(model, tok, [f.text() for f in fs], [f.target_true for f in fs])
        return sum(a.mean_nll < b.mean_nll for a, b in zip(new, true, strict=True)) / len(fs)

    try:
        before = efficacy(facts)
        editor = rlsedit_llm.Editor(model, tok, rlsedit_llm.EditConfig(stats_tokens=20_000, cache_dir=str(cache_dir)),
                                    take_over=True)
        for start in range(0, len(facts), 5):
            editor.edit(facts[start:start + 5])
        editor.release()
        return before, efficacy(facts), efficacy(facts[:5])
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved[n])
