"""The anchor statistics of an edit: ``E[k k^T]`` per edited layer and the checks on the
regulariser they define. The one home of both: :class:`~rlsedit_llm.Editor` prepares its solvers
from :func:`layer_moments`, and the benchmark asks an editor (or this function) for the same
numbers instead of computing its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from rlsedit_llm.adapters.spec import ModelSpec
from rlsedit_llm.editing.config import EditConfig
from rlsedit_llm.errors import HyperparameterError
from rlsedit_llm.pipeline.stats import second_moments
from rlsedit_llm.pipeline.stats_npz import load_stats

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["layer_moments", "max_positions", "check_absorption", "MIN_ABSORPTION", "MAX_ABSORPTION"]

#: An absorption below this (a typical key moves its output by less than this share of the
#: demanded change) means the regulariser swamps every edit: refused at prepare.
MIN_ABSORPTION = 1e-6
#: An absorption above this (a regulariser a million times weaker than a typical key) leaves the
#: state nearly singular along every edited key: a later undo's downdate ``I - K C K^T`` then
#: cancels to rounding and is refused. Refused at prepare, with the reason.
MAX_ABSORPTION = 1e6


def max_positions(model: torch.nn.Module) -> int:
    """The longest sequence the model accepts (learned position tables cap it)."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30


def layer_moments(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, spec: ModelSpec, layers: Sequence[int],
                  config: EditConfig, *, progress: bool = True) -> dict[int, torch.Tensor]:
    """``E[k k^T]`` (d_k, d_k) per layer in ``layers``, as ``config`` asks: from the bound MEMIT/ROME
    files of ``config.precomputed_stats``, else from ``config.stats_tokens`` tokens of
    ``config.corpus`` (cached on disk, sequences capped at the model's positions)."""
    if config.precomputed_stats is not None:
        return load_stats(model, spec, list(layers), config.precomputed_stats)
    return second_moments(model, tokenizer, spec, list(layers), corpus=config.corpus,
                          n_tokens=config.stats_tokens, cache_dir=config.cache_dir, progress=progress,
                          max_length=min(config.stats_max_length, max_positions(model)))


def check_absorption(moments: dict[int, torch.Tensor], config: EditConfig, mom2_weight: float) -> None:
    """Refuse a regulariser that swamps every edit (e.g. alpha = 1e308: every write a no-op), or
    one so weak that the state is numerically singular (e.g. alpha = 0, mom2_weight = 1e-12).

    A typical key's absorption is ``E||k||^2 / (alpha + beta N E||k||^2 / d_k)``: the share of a
    demanded change its edit delivers, against the regulariser's weight along it."""
    for layer, m in moments.items():
        m = m.double()
        d_k = m.shape[0]
        trace = float(torch.trace(m))  # E||k||^2
        denom = config.alpha + config.beta * mom2_weight * trace / d_k
        absorption = trace / denom if denom > 0 else math.inf
        weights = f"alpha={config.alpha:g}, beta={config.beta:g}, mom2_weight={mom2_weight:g}"
        if not absorption >= MIN_ABSORPTION:
            raise HyperparameterError(
                f"{weights} swamp every edit at layer {layer}: a typical key would move its output by "
                f"{absorption:.1e} of the requested change (every edit a no-op); lower alpha (e.g. alpha <= "
                f"{trace / 1e-2:.3g}) or the anchor weight")
        if absorption > MAX_ABSORPTION:
            raise HyperparameterError(
                f"{weights} are too weak at layer {layer}: the regulariser is {1 / absorption:.1e} of a typical "
                f"key's weight, so the state is numerically singular along every edited key and undo would fail. "
                f"Raise alpha (e.g. alpha >= {trace / MAX_ABSORPTION * 10:.3g}) or mom2_weight")
