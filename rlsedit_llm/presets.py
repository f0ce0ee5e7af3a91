"""Published settings: one table per method and one per model family, each entry with its source.

Pure data, importable from every floor (the kernel's method configs, the family table of
:mod:`rlsedit_llm.adapters.spec`, the value defaults of :mod:`rlsedit_llm.pipeline.values` and
:class:`~rlsedit_llm.EditConfig` read their defaults here). A setting that is rlsedit's own
choice rather than a paper's says so in its source.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["Published", "METHOD_PRESETS", "FAMILY_PRESETS", "SMALL_MODEL_D_MODEL", "method_preset",
           "family_presets"]

_RLSEDIT = "RLSEdit (arXiv 2601.15686)"
_ALPHAEDIT = "AlphaEdit (Fang et al., ICLR 2025)"
_MEMIT = "MEMIT (Meng et al., ICLR 2023)"
_ENCORE = "ENCORE (Gupta et al., arXiv 2502.01636)"
_ULTRAEDIT = "UltraEdit (Gu et al., arXiv 2505.14679)"


@dataclass(frozen=True)
class Published:
    """One published setting: its value and where it comes from (paper, released config file)."""

    value: float | int | bool
    source: str


def _table(rows: dict[str, dict[str, Published]]) -> Mapping[str, Mapping[str, Published]]:
    return MappingProxyType({name: MappingProxyType(row) for name, row in rows.items()})


#: Per method: the settings its paper or released configuration uses.
METHOD_PRESETS: Mapping[str, Mapping[str, Published]] = _table({
    "rlsedit": {
        "alpha": Published(0.0, f"{_RLSEDIT}: lambda = 0"),
        "beta": Published(1.0, f"{_RLSEDIT}: mu = 1"),
        "mom2_weight": Published(15000.0, f"{_RLSEDIT} and {_ALPHAEDIT}, released Llama-3-8B configs: "
                                          "mom2_update_weight = 15000"),
        "d_k": Published(14336, "Llama-3-8B config.json: intermediate_size, the input width of the edited "
                                "down-projection (the model the published N was set for)"),
    },
    "alphaedit": {
        "threshold": Published(1e-2, f"rlsedit's choice: {_ALPHAEDIT} keeps the anchor covariance's directions "
                                     "of small eigenvalue; rlsedit takes the cut relative to the largest one"),
        "ridge": Published(1.0, f"rlsedit's choice: the identity added to {_ALPHAEDIT}'s projected normal "
                                "equations"),
        "released_threshold": Published(2e-2, f"{_ALPHAEDIT}, released configs (GPT-2 XL, GPT-J, Llama-3-8B alike): "
                                              "nullspace_threshold = 2e-2, an absolute cut on the singular values "
                                              "of the per-token second moment E[kk^T] (layer_stats' mom2 / token "
                                              "count), not scaled by mom2_update_weight (experiments/evaluate.py "
                                              "get_project keeps S < threshold)"),
        "released_ridge": Published(10.0, f"{_ALPHAEDIT}, released configs: L2 = 10, added to P (K K^T + cache_c), "
                                          "the raw key Grams of the batch and of every earlier batch"),
    },
    "encore": {
        "norm_weight": Published(20.0, f"{_ENCORE}, released Llama-3-8B config: update_norm_lambda = 20 "
                                       "(10 for GPT-2 XL and Llama-2-7B)"),
        "stop_when_top1": Published(True, f"{_ENCORE}: most-probable early stopping of the value optimisation"),
    },
    "ultraedit": {
        "lr": Published(1e-6, f"{_ULTRAEDIT}, released configs: lr = 1e-6 for every model"),
        "ridge": Published(1.0, f"{_ULTRAEDIT}, released code: the closed form adds the identity"),
        "d_k": Published(14336, "Llama-3-8B config.json: intermediate_size (the width the released lr was "
                                "used at on a down-projection)"),
    },
})

#: Below this hidden size a Llama-like model keeps the value learning rate ``value_lr_small``.
SMALL_MODEL_D_MODEL = 1024

_SMOLLM2 = Published(0.5, "rlsedit's measurement: SmolLM2-135M (d_model < 1024) with CounterFact misses the target "
                          "within 25 steps at lr 0.1")
_LLAMA_VALUE_LR = Published(0.1, f"{_ALPHAEDIT} and {_RLSEDIT}, released Llama-3-8B configs: v_lr (the published "
                                 "value for Llama/Qwen 7-8B models)")

#: Per model family (``config.model_type``): where the edited block starts, as a fraction of depth
#: (``layer_start``), and the value optimisation's learning rate and budget. A family without a
#: row uses ``llama``'s (see :func:`family_presets`).
FAMILY_PRESETS: Mapping[str, Mapping[str, Published]] = _table({
    "gpt2": {
        "layer_start": Published(13 / 48, f"{_MEMIT}, GPT-2 XL: layers 13-17 of 48"),
        "value_lr": Published(0.5, f"{_MEMIT}, released GPT-2 XL config: v_lr"),
        "value_steps": Published(20, f"{_MEMIT}, released GPT-2 XL config: v_num_grad_steps"),
    },
    "gptj": {
        "layer_start": Published(3 / 28, f"{_MEMIT}, GPT-J: layers 3-8 of 28"),
        "value_lr": Published(0.5, f"{_MEMIT}, released GPT-J config: v_lr"),
    },
    "gpt_neox": {
        "layer_start": Published(3 / 28, "no published setting: GPT-J's placement"),
        "value_lr": Published(0.5, "no published setting: GPT-J's"),
    },
    "llama": {
        "layer_start": Published(4 / 32, f"{_ALPHAEDIT} and {_RLSEDIT}, Llama-3-8B: layers 4-8 of 32"),
        "value_lr": _LLAMA_VALUE_LR,
        "value_lr_small": _SMOLLM2,
    },
    "qwen2": {
        "layer_start": Published(7 / 28, "published Qwen2.5-7B editing block: layers 7-11 of 28"),
        "value_lr": _LLAMA_VALUE_LR,
        "value_lr_small": _SMOLLM2,
    },
    "qwen3": {
        "layer_start": Published(7 / 28, "no published setting: Qwen2.5-7B's placement"),
        "value_lr": _LLAMA_VALUE_LR,
        "value_lr_small": _SMOLLM2,
    },
})


def method_preset(method: str, setting: str) -> float | int | bool:
    """The published value of ``setting`` for ``method`` (``KeyError`` if there is none)."""
    return METHOD_PRESETS[method][setting].value


def family_presets(family: str) -> Mapping[str, Published]:
    """The published settings of a model family; Llama's for a family without a row of its own."""
    return FAMILY_PRESETS.get(family, FAMILY_PRESETS["llama"])
