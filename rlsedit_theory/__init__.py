"""rlsedit_theory: the exact RLSEdit objective, closed form and recursion in NumPy/SciPy (float64).

Row-key convention: ``W (d_k, d_v)``, edit batch ``K (u, d_k)``, ``V (u, d_v)``, fit ``K W ~ V``;
optional positive per-row (per-fact) weights ``omega (u,)`` weight the batch's misfit by
``Omega = diag(omega)`` (``weights=`` everywhere; applied by row scaling, :func:`scale_rows`).
"""

from .errors import (
    HyperparameterError,
    NonFiniteError,
    NotPositiveDefiniteError,
    RLSEditError,
    ShapeError,
)
from .objective import (
    ObjectiveTerms,
    closed_form,
    gradient,
    information_matrix,
    normal_rhs,
    objective,
    objective_terms,
    stack_edits,
    weighted_edits,
)
from .problem import Problem, check_row_weights, scale_rows
from .recursive import RecursiveLS, StepInfo, woodbury_downdate, woodbury_update
from .reference import DenseCumulative, HardWrite, NullSpaceProjection, PerBatchReset, run_stream

__all__ = [
    "Problem",
    "objective",
    "objective_terms",
    "ObjectiveTerms",
    "gradient",
    "information_matrix",
    "normal_rhs",
    "closed_form",
    "stack_edits",
    "weighted_edits",
    "check_row_weights",
    "scale_rows",
    "RecursiveLS",
    "StepInfo",
    "woodbury_update",
    "woodbury_downdate",
    "HardWrite",
    "PerBatchReset",
    "NullSpaceProjection",
    "DenseCumulative",
    "run_stream",
    "RLSEditError",
    "ShapeError",
    "NonFiniteError",
    "HyperparameterError",
    "NotPositiveDefiniteError",
]
