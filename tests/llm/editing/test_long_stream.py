"""2,000 sequential single-fact edits: the recursion's state stays symmetric positive definite and
the weights stay the exact minimiser (a dense re-solve from the journal agrees)."""

from __future__ import annotations

import itertools
import logging
import time

import numpy as np
import pytest
import torch

from rlsedit_llm.adapters.spec import read_weight
from rlsedit_llm.adapters.tiny import tiny_model
from rlsedit_llm.editing.config import EditConfig
from rlsedit_llm.editing.editor import Editor
from rlsedit_llm.pipeline.facts import Fact
from rlsedit_llm.pipeline.values import ValueConfig
from rlsedit_theory import Problem, closed_form

log = logging.getLogger(__name__)

N_EDITS = 2000
FIRST = ["Anna", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas",
         "Kofi", "Lena", "Marco", "Nadia", "Omar", "Paula", "Quentin", "Rosa", "Sven", "Tariq"]
LAST = ["Abbott", "Berg", "Costa", "Dahl", "Eder", "Fischer", "Gomez", "Holm", "Ivanov", "Jensen",
        "Keller", "Lund", "Moreau", "Nagy", "Olsen", "Petrov", "Quinn", "Rossi", "Sato", "Toth"]
MIDDLE = ["", "A.", "B.", "C.", "D.", "E."]
PROMPTS = ["The mother tongue of {} is", "{} was born in", "{} works in the field of", "{} plays the"]
TARGETS = ["English", "French", "Paris", "Berlin", "music", "physics", "piano", "football", "Japan", "Rome"]


def synthetic_facts(n: int) -> list[Fact]:
    """``n`` distinct facts (distinct subjects, so no edit replaces another)."""
    names = (" ".join(p for p in (f, m, l) if p) for m, f, l in itertools.product(MIDDLE, FIRST, LAST))
    facts = []
    for i, subject in zip(range(n), names, strict=False):
        facts.append(Fact(PROMPTS[i % len(PROMPTS)], subject, TARGETS[(7 * i) % len(TARGETS)]))
    assert len(facts) == n and len({f.subject for f in facts}) == n
    return facts


@pytest.fixture
def one_thread():
    """Tiny matrices: thread start-up costs more than it saves (and shared CI cores oversubscribe)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _assert_spd(C: torch.Tensor):
    assert torch.equal(C, C.mT)  # symmetrised after every step: exactly symmetric
    _, info = torch.linalg.cholesky_ex(C)
    assert int(info) == 0
    assert float(torch.linalg.eigvalsh(C)[0]) > 0


@pytest.mark.slow
def test_two_thousand_sequential_edits(tmp_path, one_thread):
    model, tok = tiny_model("llama", n_layers=3)
    config = EditConfig(cache_dir=str(tmp_path), stats_tokens=1000, stats_max_length=128, layers=(0, 1),
                        n_templates=0, value=ValueConfig(steps=2))
    editor = Editor(model, tok, config)
    facts = synthetic_facts(N_EDITS)

    started = time.perf_counter()
    for i, fact in enumerate(facts, 1):
        editor.edit([fact])
        if i % 500 == 0:
            for solver in editor.solvers_.values():
                _assert_spd(solver.C_)
            log.info("%d edits in %.1f s", i, time.perf_counter() - started)
    seconds = time.perf_counter() - started
    log.info("%d single-fact edits: %.1f s (%.1f ms per edit)", N_EDITS, seconds, 1000 * seconds / N_EDITS)

    assert len(editor.journal_) == N_EDITS and editor.next_id_ == N_EDITS
    for layer in editor.layers_:
        s = editor.solvers_[layer]
        assert s.n_rows_ == N_EDITS and s.n_updates_ == N_EDITS
        _assert_spd(s.C_)
        # Dense re-solve of the normal equations from the journal (Cholesky, float64).
        problem = Problem(s.W0_.numpy(), s.alpha, s.beta, gram0=s.gram0_.numpy())
        edits = [(r.keys[layer].numpy(), r.values[layer].numpy()) for r in editor.journal_]
        dense = closed_form(problem, edits)
        rel = np.linalg.norm(s.W_.numpy() - dense) / np.linalg.norm(dense - problem.W0)
        assert rel < 1e-8, rel  # relative to the size of the edit, not of the weights
        held = read_weight(editor._module(layer))
        assert torch.equal(held, s.W_.to(held.dtype))
    cert = editor.certificate()
    assert cert.gradient < 1e-10 and cert.drift < 1e-8 and cert.holds(), str(cert)


def test_batches_of_one_hundred(tmp_path, one_thread):
    """The published protocol's batch size: three calls of 100 facts, with alpha > 0 and value-norm
    anchoring. The weights stay the exact minimiser of J_t over all 300 rows, the state SPD, and
    every written value has its pre-edit norm."""
    model, tok = tiny_model("llama", n_layers=3)
    config = EditConfig(cache_dir=str(tmp_path), stats_tokens=1000, stats_max_length=128, layers=(0, 1),
                        n_templates=1, template_length=4, value=ValueConfig(steps=3), alpha=0.5,
                        anchor_value_norms=True, replace=False)
    editor = Editor(model, tok, config)
    facts = synthetic_facts(300)
    reports = [editor.edit(facts[i:i + 100]) for i in range(0, 300, 100)]
    for report in reports:
        assert len(report.facts) == 100
        assert torch.allclose(torch.tensor(report.norms["z"]), torch.tensor(report.norms["h0"]), rtol=1e-5)
    for layer in editor.layers_:
        s = editor.solvers_[layer]
        assert s.n_rows_ == 300 and s.n_updates_ == 3
        _assert_spd(s.C_)
        problem = Problem(s.W0_.numpy(), s.alpha, s.beta, gram0=s.gram0_.numpy())
        edits = [(r.keys[layer].numpy(), r.values[layer].numpy()) for r in editor.journal_]
        dense = closed_form(problem, edits)
        assert np.linalg.norm(s.W_.numpy() - dense) / np.linalg.norm(dense - problem.W0) < 1e-9
    assert editor.certificate().holds()
