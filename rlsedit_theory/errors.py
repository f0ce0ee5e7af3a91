"""Typed errors shared by both layers.

Every error says what was wrong and what to change. They subclass ``ValueError`` where the
problem is a bad argument, so generic callers that catch ``ValueError`` keep working.
"""


class RLSEditError(Exception):
    """Base class of every error raised by rlsedit."""


class ShapeError(RLSEditError, ValueError):
    """An array has the wrong number of dimensions or a size that does not match."""


class NonFiniteError(RLSEditError, ValueError):
    """An input contains NaN or infinity."""


class HyperparameterError(RLSEditError, ValueError):
    """A hyperparameter is out of range (for example a negative alpha or beta)."""


class NotPositiveDefiniteError(RLSEditError, ValueError):
    """A matrix that must be symmetric positive definite is not (for example a singular
    preservation metric ``A = alpha*I + beta*K0^T K0``, or a downdate of data never added)."""
