"""What an edit returns (:class:`EditReport`, :class:`FactReport`) and what the journal keeps
(:class:`EditRecord`)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

from rlsedit_llm.pipeline.facts import Fact

__all__ = ["FactReport", "EditReport", "EditRecord"]


@dataclass
class FactReport:
    """What one edit did to one fact."""

    fact: Fact
    prob_before: float  # P(target | prompt) before the call
    prob_after: float
    residual_before: float  # ||z* - h|| at the last edited layer before the write
    residual_after: float  # what is left unfitted after the write
    replaced: tuple[int, ...] = ()  # ids of earlier edits this fact retracted


@dataclass
class EditReport:
    """Result of one :meth:`Editor.edit` call."""

    edit_id: int
    layers: tuple[int, ...]
    facts: list[FactReport]
    seconds: dict[str, float] = field(default_factory=dict)
    extras: dict[str, float] = field(default_factory=dict)  # method-specific figures (e.g. FT losses)
    # Value-norm instruments, per fact: "z" the written value z* and "h0" the model's norm there
    # before the edit (last edited layer); per edited layer l, "V{l}" the written module outputs and
    # "KW0{l}" the unedited module's output at the same keys. Empty for methods without values.
    norms: dict[str, list[float]] = field(default_factory=dict)

    @property
    def efficacy(self) -> float:
        """Share of facts whose target became more probable than before."""
        return sum(f.prob_after > f.prob_before for f in self.facts) / max(len(self.facts), 1)

    def __str__(self) -> str:
        lines = [f"edit {self.edit_id} on layers {list(self.layers)}: {len(self.facts)} fact(s)"]
        for r in self.facts:
            lines.append(
                f"  {r.fact.text()!r} -> {r.fact.target!r}: P {r.prob_before:.4f} -> {r.prob_after:.4f}, "
                f"residual {r.residual_before:.3g} -> {r.residual_after:.3g}"
                + (f" (replaced edit {', '.join(map(str, r.replaced))})" if r.replaced else "")
            )
        if self.seconds:
            lines.append("  seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in self.seconds.items()))
        return "\n".join(lines)


@dataclass
class EditRecord:
    """Journal entry of one applied edit: enough to retract it exactly (downdate)."""

    edit_id: int
    facts: list[Fact]
    keys: dict[int, torch.Tensor]  # layer -> K (u, d_k), in the state dtype, on CPU
    values: dict[int, torch.Tensor]  # layer -> V = K W_prev + R (u, d_v), absolute values
    created: float = field(default_factory=time.time)

    def rows(self, keep: list[int]) -> EditRecord:
        """A copy holding only the facts (and their keys and values) at the indices ``keep``."""
        return dataclasses.replace(self, facts=[self.facts[j] for j in keep],
                                   keys={l: K[keep] for l, K in self.keys.items()},
                                   values={l: V[keep] for l, V in self.values.items()})

    def to_state(self) -> dict:
        """The entry as plain data and tensors (the journal part of ``Editor.state_dict()``)."""
        return {"edit_id": self.edit_id, "created": self.created, "facts": [dataclasses.asdict(f) for f in self.facts],
                "keys": dict(self.keys), "values": dict(self.values)}

    @classmethod
    def from_state(cls, entry: dict) -> EditRecord:
        """Inverse of :meth:`to_state` (``KeyError``/``TypeError``/``ValueError`` for a malformed entry)."""
        return cls(int(entry["edit_id"]), [Fact(**f) for f in entry["facts"]],
                   {int(l): K for l, K in entry["keys"].items()}, {int(l): V for l, V in entry["values"].items()},
                   created=entry["created"])

