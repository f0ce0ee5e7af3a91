"""What one benchmark stream is and how it is scored: :class:`ProtocolConfig`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from rlsedit_llm.errors import HyperparameterError
from rlsedit_llm.evaluation.data import DATASETS

__all__ = ["ProtocolConfig"]


@dataclass(frozen=True)
class ProtocolConfig:
    """What one benchmark stream is and how it is scored.

    Attributes
    ----------
    dataset : one of :data:`rlsedit_llm.evaluation.data.DATASETS`
    n_edits, batch_size : the stream: the first ``n_edits`` records, ``batch_size`` per edit call
    checkpoints : number of evenly spaced re-scoring points (the last batch is always one)
    retention_fraction : share of the stream (rounded up to whole batches) tracked by the
        retention curve
    fluency_cases : cases whose first generation prompt is used for fluency (CounterFact; 0 = off)
    fluency_tokens : greedy tokens generated per fluency prompt
    glue_items : items per GLUE task for the zero-shot accuracy (0 = off)
    wild : also run the generation check (greedy decoding, no teacher forcing)
    score_batch_size : sequences per scoring forward pass
    full_checkpoints : edit counts after which (rounded up to whole batches) *every* edit so far
        is re-scored, so that a long stream can be compared with shorter ones at equal length
    """

    dataset: str = "counterfact"
    n_edits: int = 100
    batch_size: int = 10
    checkpoints: int = 5
    retention_fraction: float = 0.1
    fluency_cases: int = 50
    fluency_tokens: int = 100
    glue_items: int = 0
    wild: bool = True
    score_batch_size: int = 32
    full_checkpoints: tuple[int, ...] = ()

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise HyperparameterError(f"dataset must be one of {DATASETS}; got {self.dataset!r}")
        for name in ("n_edits", "batch_size", "checkpoints", "fluency_tokens", "score_batch_size"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise HyperparameterError(f"{name} must be an int >= 1; got {getattr(self, name)!r}")
        if not 0 < self.retention_fraction <= 1:
            raise HyperparameterError(f"retention_fraction must lie in (0, 1]; got {self.retention_fraction}")
        if self.fluency_cases < 0 or self.glue_items < 0:
            raise HyperparameterError("fluency_cases and glue_items must be >= 0")
        bad = [e for e in self.full_checkpoints if not (isinstance(e, int) and 1 <= e <= self.n_edits)]
        if bad:
            raise HyperparameterError(f"full_checkpoints must be edit counts in [1, {self.n_edits}]; got {bad}")

    @property
    def n_batches(self) -> int:
        return math.ceil(self.n_edits / self.batch_size)

    @property
    def retention_batches(self) -> int:
        """Number of leading batches whose edits form the retention set."""
        return min(self.n_batches, math.ceil(math.ceil(self.retention_fraction * self.n_edits) / self.batch_size))

    @property
    def retention_size(self) -> int:
        return min(self.n_edits, self.retention_batches * self.batch_size)

    def checkpoint_batches(self) -> list[int]:
        """Batch counts after which the retention set is re-scored (1-based, ascending): the end
        of the retention set, ``checkpoints`` evenly spaced points, the full checkpoints and the
        last batch."""
        n = self.n_batches
        points = {self.retention_batches, n} | set(self.full_checkpoint_batches())
        points |= {max(1, round(n * (j + 1) / self.checkpoints)) for j in range(self.checkpoints)}
        return sorted(points)

    def full_checkpoint_batches(self) -> list[int]:
        """Batch counts after which every edit so far is re-scored (before the last batch)."""
        return sorted({math.ceil(e / self.batch_size) for e in self.full_checkpoints} - {self.n_batches})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["full_checkpoints"] = list(self.full_checkpoints)
        return d
