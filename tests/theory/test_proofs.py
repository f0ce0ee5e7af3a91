"""The sympy scripts in proofs/ verify the algebraic steps of T1-T7 and of per-fact weights, and
the checkers they use can reject a wrong identity (so these tests can fail)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import sympy as sp

PROOFS = Path(__file__).resolve().parents[2] / "proofs"
SCRIPTS = [
    "check_woodbury.py",
    "check_energy_identity.py",
    "check_one_step.py",
    "check_perturbation.py",
    "check_limits.py",
    "check_weights.py",
]


@pytest.fixture
def proofs_module(monkeypatch):
    monkeypatch.syspath_prepend(str(PROOFS))

    def load(name: str):
        return importlib.import_module(name)

    return load


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_verifies_every_identity(script):
    result = subprocess.run(
        [sys.executable, str(PROOFS / script)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout
    assert result.stdout.count("[verified]") >= 4, result.stdout


def test_word_checker_rejects_wrong_identities(proofs_module):
    sym = proofs_module("_symbolic")
    A, B = sym.nc("A B")
    # non-commutativity is respected: AB - BA is not zero
    assert not sym.is_zero_word_polynomial(A * B - B * A, [])
    # a relation is used only where it applies (A B -> 1 does not give B A -> 1)
    assert sym.is_zero_word_polynomial(A * B - 1, [(A * B, sp.Integer(1))])
    assert not sym.is_zero_word_polynomial(B * A - 1, [(A * B, sp.Integer(1))])


def test_matrix_checker_rejects_wrong_identities(proofs_module):
    sym = proofs_module("_symbolic")
    X, Y = sym.generic("x", 2, 2), sym.generic("y", 2, 2)
    assert sym.is_zero_matrix(X * Y - (Y.T * X.T).T)
    assert not sym.is_zero_matrix(X * Y - Y * X)
    assert not sym.is_zero_matrix((X + Y).det() - X.det() - Y.det())


def test_wrong_variants_of_the_theorems_are_rejected(proofs_module):
    woodbury = proofs_module("check_woodbury")
    energy = proofs_module("check_energy_identity")
    one_step = proofs_module("check_one_step")
    perturbation = proofs_module("check_perturbation")
    limits = proofs_module("check_limits")
    weights = proofs_module("check_weights")
    assert woodbury.update_is_right_inverse(-1) and not woodbury.update_is_right_inverse(+1)
    assert energy.energy_identity(2, 2, 2) and not energy.energy_identity(2, 2, 2, weight=1)
    assert one_step.residual_identity() and not one_step.residual_identity(use_inverse=False)
    assert perturbation.perturbation_identity(-1) and not perturbation.perturbation_identity(+1)
    assert limits.resolvent_rate(+1) and not limits.resolvent_rate(-1)
    # weighted T2 in the original coordinates: (I + K C K^T Omega)^-1, not (I + Omega K C K^T)^-1
    assert weights.weighted_residual_original() and not weights.weighted_residual_original(correct_order=False)
    assert weights.weighted_energy_identity(2, 2, 1) and not weights.weighted_energy_identity(2, 2, 1, weight=1)


def test_main_reports_failure_when_a_check_fails(proofs_module, monkeypatch, capsys):
    woodbury = proofs_module("check_woodbury")
    original = woodbury.update_is_right_inverse
    monkeypatch.setattr(woodbury, "update_is_right_inverse", lambda: original(+1))
    assert woodbury.main() is False
    assert "FAILED" in capsys.readouterr().out
