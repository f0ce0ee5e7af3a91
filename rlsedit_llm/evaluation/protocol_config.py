"""What one benchmark stream is and how it is scored: :class:`ProtocolConfig`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from rlsedit_llm.errors import HyperparameterError
from rlsedit_llm.evaluation.data import DATASETS, ZSRE_TARGETS

__all__ = ["ProtocolConfig", "FLUENCY_PROTOCOLS", "LEGACY_FLUENCY", "LITERATURE_FLUENCY"]

#: How fluency generations are drawn and their n-grams counted (:func:`.metrics.fluency_texts`):
#: ``rome``: ROME's released evaluation (top-5 sampling, seeded, to a fixed length of prompt plus
#: generation, no early stop; Treebank-style words), the one MEMIT, AlphaEdit and EasyEdit reuse;
#: ``greedy-eos``: greedy decoding of ``fluency_tokens`` new tokens stopped at end-of-sequence,
#: words and punctuation marks by a regular expression (every run recorded before the choice existed).
FLUENCY_PROTOCOLS = ("rome", "greedy-eos")
#: The protocol of a run whose settings do not name one (recorded before the choice existed).
LEGACY_FLUENCY = "greedy-eos"
#: The protocol of a new ``rlsedit bench`` run unless told otherwise.
LITERATURE_FLUENCY = "rome"

#: Settings a run recorded before they existed did not write; such a run had these values, and a
#: settings record leaves them out at these values (:meth:`ProtocolConfig.to_dict`).
_LEGACY = {"stream_seed": 0, "fluency_protocol": LEGACY_FLUENCY, "zsre_target": "alt"}


@dataclass(frozen=True)
class ProtocolConfig:
    """What one benchmark stream is and how it is scored.

    Attributes
    ----------
    dataset : one of :data:`rlsedit_llm.evaluation.data.DATASETS`
    n_edits, batch_size : the stream: the first ``n_edits`` records (in the order of
        ``stream_seed``), ``batch_size`` per edit call
    checkpoints : number of evenly spaced re-scoring points (the last batch is always one)
    retention_fraction : share of the stream (rounded up to whole batches) tracked by the
        retention curve
    fluency_cases : cases whose first generation prompt is used for fluency (CounterFact; 0 = off)
    fluency_tokens : ``greedy-eos``: the most tokens generated per fluency prompt; ``rome``: the
        length of prompt plus generation, in tokens (ROME's ``max_out_len``)
    glue_items : items per GLUE task for the zero-shot accuracy (0 = off)
    wild : also run the generation check (greedy decoding, no teacher forcing)
    score_batch_size : sequences per scoring forward pass
    full_checkpoints : edit counts after which (rounded up to whole batches) *every* edit so far
        is re-scored, so that a long stream can be compared with shorter ones at equal length
    stream_seed : which stream of the data set (:func:`.data.stream_order`): 0 is the file order,
        ``s >= 1`` other records in another order; also seeds the ``rome`` fluency sampling
    fluency_protocol : one of :data:`FLUENCY_PROTOCOLS` (default here: the legacy ``greedy-eos``,
        which a settings record without the key means; ``rlsedit bench`` starts new runs with
        ``rome``)
    zsre_target : the object zsRE edits write, one of :data:`.data.ZSRE_TARGETS` (``alt``,
        EasyEdit's, or ``answer``, MEMIT's ``answers[0]``)
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
    stream_seed: int = 0
    fluency_protocol: str = LEGACY_FLUENCY
    zsre_target: str = "alt"

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise HyperparameterError(f"dataset must be one of {DATASETS}; got {self.dataset!r}")
        seed = self.stream_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise HyperparameterError(f"stream_seed must be an int >= 0 (0: the data set's file order); got {seed!r}")
        if self.fluency_protocol not in FLUENCY_PROTOCOLS:
            raise HyperparameterError(f"fluency_protocol must be one of {FLUENCY_PROTOCOLS} (rome: the literature's "
                                      f"top-5 sampling to a fixed length); got {self.fluency_protocol!r}")
        if self.zsre_target not in ZSRE_TARGETS:
            raise HyperparameterError(f"zsre_target must be one of {ZSRE_TARGETS} (alt: EasyEdit's, answer: "
                                      f"MEMIT's answers[0]); got {self.zsre_target!r}")
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
        """The settings as a JSON object; ``stream_seed``, ``fluency_protocol`` and ``zsre_target``
        are left out at the values of a run recorded before they existed (0, ``greedy-eos``,
        ``alt``), so such a run's settings read and write back unchanged."""
        d = asdict(self)
        d["full_checkpoints"] = list(self.full_checkpoints)
        return {k: v for k, v in d.items() if not (k in _LEGACY and v == _LEGACY[k])}
