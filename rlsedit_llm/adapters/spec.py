"""Where the editable parts of a causal LM live (:class:`ModelSpec`), and the few per-family facts
an editor needs beyond that: weight orientation, what the residual stream receives from the edited
module, and how final hidden states become logits.

    spec = detect_spec(model)
    module = get_module(model, spec.edit_module_path.format(layer))
    W = read_weight(module)          # (d_k, d_v): row-key convention, v = W^T k
    write_weight(module, W_new)      # back in the module's own orientation, dtype and device

Orientation is decided by module type, never by comparing shapes (square matrices make shape
comparison ambiguous): ``nn.Linear`` stores ``[out, in]`` and computes ``x @ weight.T``;
transformers' ``Conv1D`` (GPT-2) stores ``[in, out]`` and computes ``x @ weight``.

A family is one row of :data:`_FAMILIES` plus, where its architecture genuinely needs it, a flag on
the spec: a norm after the MLP (Gemma 2/3, OLMo 2: ``post_mlp_norm_path``), a scale on the MLP's
residual branch (Granite: ``residual_multiplier``), a transform of the logits (Gemma 2 soft-capping,
Granite ``logits_scaling``: :func:`~rlsedit_llm.adapters.residual.final_logits`). Mixture-of-experts
models are refused: they have no single MLP down-projection. Unknown architectures can be described
by the user (:meth:`ModelSpec.custom` or ``detect_spec(model, override=...)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from rlsedit_llm.errors import NonFiniteError, ShapeError, UnsupportedArchitectureError
from rlsedit_llm.presets import family_presets

__all__ = [
    "ModelSpec",
    "SUPPORTED_FAMILIES",
    "KNOWN_FAMILIES",
    "POST_NORM_FAMILIES",
    "MOE_FAMILIES",
    "detect_spec",
    "get_module",
    "read_weight",
    "write_weight",
    "model_device",
    "default_layers",
    "needs_bos",
]

def _layer_start(family: str) -> float:
    return float(family_presets(family)["layer_start"].value)


# --------------------------------------------------------------------------------------------
# Architecture table, keyed by ``config.model_type``. Paths are relative to the *ForCausalLM model.
# `edit` is the MLP output projection (the module MEMIT-family editors rewrite), relative to one
# decoder layer. `start` is where the published settings place the first edited layer, as a
# fraction of depth (rlsedit_llm.presets.FAMILY_PRESETS, with sources): GPT2-XL 13/48, GPT-J 3/28,
# Llama-2/3 4/32, Qwen2.5-7B 7/28; families without published settings use Llama's 4/32.
# `post_mlp_norm`: a norm between the MLP and the residual add.
# --------------------------------------------------------------------------------------------
_LLAMA_LIKE = dict(layers="model.layers", edit="mlp.down_proj", norm="model.norm", start=_layer_start("llama"))
_FAMILIES: dict[str, dict] = {
    "gpt2": dict(layers="transformer.h", edit="mlp.c_proj", norm="transformer.ln_f", start=_layer_start("gpt2")),
    "gptj": dict(layers="transformer.h", edit="mlp.fc_out", norm="transformer.ln_f", start=_layer_start("gptj")),
    "gpt_neox": dict(layers="gpt_neox.layers", edit="mlp.dense_4h_to_h", norm="gpt_neox.final_layer_norm",
                     start=_layer_start("gpt_neox")),
    "llama": dict(_LLAMA_LIKE),
    "mistral": dict(_LLAMA_LIKE),
    "qwen2": dict(_LLAMA_LIKE, start=_layer_start("qwen2")),
    "qwen3": dict(_LLAMA_LIKE, start=_layer_start("qwen3")),
    "phi3": dict(_LLAMA_LIKE),
    # -- families with a norm after the MLP, scaled branches or other layouts ------------------
    "gemma2": dict(_LLAMA_LIKE, post_mlp_norm="post_feedforward_layernorm", bos=True),
    "gemma3_text": dict(_LLAMA_LIKE, post_mlp_norm="post_feedforward_layernorm", bos=True),
    "olmo2": dict(_LLAMA_LIKE, post_mlp_norm="post_feedforward_layernorm"),
    "opt": dict(layers="model.decoder.layers", edit="fc2", norm="model.decoder.final_layer_norm", start=4 / 32),
    "falcon": dict(layers="transformer.h", edit="mlp.dense_4h_to_h", norm="transformer.ln_f", start=4 / 32),
    "granite": dict(_LLAMA_LIKE),
    "stablelm": dict(_LLAMA_LIKE),
}
#: Every ``config.model_type`` :func:`detect_spec` recognises.
KNOWN_FAMILIES: tuple[str, ...] = tuple(_FAMILIES)
#: Families whose whole pipeline (keys, fast values, update, save/load) is verified end to end:
#: the original eight by the parametrised editor tests, the others by tests/llm/adapters/test_families.py
#: (an edit becomes top-1 on a tiny model and survives save/load; Gemma 3 also on the real 270M
#: model). Gemma 2 needs ``attn_implementation="eager"`` (transformers has no SDPA kernel for its
#: soft-capped attention).
SUPPORTED_FAMILIES: tuple[str, ...] = (
    "gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "phi3",
    "gemma2", "gemma3_text", "olmo2", "opt", "falcon", "granite", "stablelm",
)
#: Families with a norm after the MLP: what the down-projection writes is not what the residual receives.
POST_NORM_FAMILIES: tuple[str, ...] = tuple(f for f, row in _FAMILIES.items() if row.get("post_mlp_norm"))

#: Mixture-of-experts model types, refused by :func:`detect_spec` (besides a structural check).
MOE_FAMILIES: tuple[str, ...] = (
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "granitemoe", "granitemoeshared", "dbrx",
    "deepseek_v2", "deepseek_v3", "jamba", "gpt_oss", "llama4", "llama4_text", "minimax", "qwen3_next",
    "switch_transformers", "nllb_moe", "jetmoe", "ernie4_5_moe", "glm4_moe", "dots1", "hunyuan_v1_moe",
)
_MOE_CONFIG_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")

#: Number of consecutive layers edited by default (the published MEMIT/AlphaEdit/RLSEdit block).
_N_EDIT_LAYERS = 5


@dataclass(frozen=True)
class ModelSpec:
    """Where the editable parts of a causal LM live.

    Attributes
    ----------
    family : ``config.model_type`` (one of :data:`KNOWN_FAMILIES`), or ``"custom"``
    n_layers : number of decoder layers
    layer_path : template of one decoder layer, e.g. ``"model.layers.{}"``
    edit_module_path : template of the edited MLP output projection, e.g. ``"model.layers.{}.mlp.down_proj"``
    final_norm_path : the norm applied after the last layer, e.g. ``"model.norm"``
    lm_head_path : the output embedding, e.g. ``"lm_head"``
    default_layers : the edited block, 5 consecutive layers placed like the published settings
    d_k : input width of the edited module (the key dimension, MLP inner width)
    d_model : hidden width (the value dimension)
    post_mlp_norm_path : template of a norm between the MLP and the residual add
        (``"model.layers.{}.post_feedforward_layernorm"`` for Gemma 2/3 and OLMo 2), else ``None``
    residual_multiplier : the residual receives ``residual_multiplier * mlp_output`` (Granite), else 1
    """

    family: str
    n_layers: int
    layer_path: str
    edit_module_path: str
    final_norm_path: str
    lm_head_path: str
    default_layers: tuple[int, ...]
    d_k: int
    d_model: int
    post_mlp_norm_path: str | None = None
    residual_multiplier: float = 1.0

    @classmethod
    def custom(cls, model: nn.Module, *, layers: str, edit: str, final_norm: str, lm_head: str | None = None,
               post_mlp_norm: str | None = None, residual_multiplier: float = 1.0,
               default_layers: tuple[int, ...] | None = None) -> ModelSpec:
        """A spec for an architecture :func:`detect_spec` does not know, validated against ``model``.

        Paths are like PEFT's ``target_modules`` but explicit:

        layers : the decoder layers' ``nn.ModuleList``, e.g. ``"backbone.blocks"``
        edit : the MLP output projection *relative to one layer*, e.g. ``"ffn.out"``
            (``nn.Linear`` or transformers' ``Conv1D``; same shape in every layer)
        final_norm : the norm applied after the last layer, e.g. ``"backbone.norm_f"``
        lm_head : the output embedding (default: ``model.get_output_embeddings()``)
        post_mlp_norm : a norm between the MLP and the residual add, relative to one layer
            (RMSNorm-type; see :func:`~rlsedit_llm.adapters.residual.module_target`), or ``None``
        residual_multiplier : scale of the MLP branch in the residual add
        default_layers : the edited block (default: 5 layers from 1/8 of the depth)

        Raises :class:`UnsupportedArchitectureError` naming the path that is missing or of the
        wrong type, or :class:`ShapeError` for inconsistent widths.
        """
        return _build_spec(model, "custom", dict(layers=layers, edit=edit, norm=final_norm, head=lm_head,
                                                 post_mlp_norm=post_mlp_norm, start=4 / 32),
                           residual_multiplier=residual_multiplier, layers_override=default_layers)


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old/new transformers
        return None
    return Conv1D


def _is_conv1d(module: nn.Module) -> bool:
    cls = _conv1d_class()
    return cls is not None and isinstance(module, cls)


def _weight(module: nn.Module) -> torch.Tensor:
    """``module.weight`` of an ``nn.Linear`` or ``Conv1D`` (a Parameter; ``nn.Module`` types attributes loosely)."""
    return cast(torch.Tensor, module.weight)


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule of ``model`` at dotted ``path`` (``"model.layers.3.mlp.down_proj"``).

    Raises :class:`UnsupportedArchitectureError` naming the missing path.
    """
    try:
        module = model.get_submodule(path)
    except AttributeError as exc:
        raise UnsupportedArchitectureError(
            f"model {type(model).__name__} has no submodule {path!r} ({exc}); is this a supported "
            f"causal LM ({', '.join(KNOWN_FAMILIES)}), or describe it with ModelSpec.custom(...)?"
        ) from None
    if module is None:  # e.g. OPT's final_layer_norm when the model is post-LN
        raise UnsupportedArchitectureError(f"model {type(model).__name__} has {path!r} set to None")
    return module


def default_layers(family: str, n_layers: int, start: float | None = None) -> tuple[int, ...]:
    """Five consecutive layers starting at the family's published fraction of depth.

    Scaled to the model's depth with ``floor``: Llama 32 layers -> 4..8, GPT2-XL 48 -> 13..17,
    Qwen2.5-7B 28 -> 7..11, SmolLM2 (Llama family, 30 layers) -> 3..7, Gemma-3-270M 18 -> 2..6.
    Tiny models get ``min(5, n_layers - 1)`` layers, always leaving at least one layer above the block.
    """
    if n_layers < 1:
        raise UnsupportedArchitectureError(f"model has {n_layers} layers; need at least 1")
    if n_layers == 1:
        return (0,)
    if start is None:
        start = _FAMILIES[family]["start"] if family in _FAMILIES else 4 / 32
    n = min(_N_EDIT_LAYERS, n_layers - 1)
    first = min(math.floor(start * n_layers), n_layers - 1 - n)
    return tuple(range(first, first + n))


def _moe_reason(model: nn.Module, family) -> str | None:
    config = getattr(model, "config", None)
    if family in MOE_FAMILIES:
        return f"model type {family!r} is a mixture of experts"
    for key in _MOE_CONFIG_KEYS:
        n = getattr(config, key, None)
        if isinstance(n, int) and not isinstance(n, bool) and n > 1:
            return f"its config has {key}={n}"
    for name, _module in model.named_modules():
        if name.endswith(".experts") or name.endswith(".block_sparse_moe") or name.endswith(".router"):
            return f"it has a mixture-of-experts module {name!r}"
    return None


def _refuse_moe(model: nn.Module, family) -> None:
    reason = _moe_reason(model, family)
    if reason is not None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} is not editable: {reason}. A mixture-of-experts layer routes each "
            f"token to a few of many expert MLPs, so there is no single MLP down-projection whose "
            f"input is the key and whose output writes the value; the MEMIT-family update (one "
            f"matrix per layer) does not apply."
        )


def _edit_shape(module: nn.Module, path: str) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        return cast(tuple[int, int], tuple(_weight(module).shape))  # Conv1D stores [in, out]: 2-D
    raise UnsupportedArchitectureError(f"{path!r} is a {type(module).__name__}; expected nn.Linear or Conv1D")


def _head_path(model: nn.Module) -> str:
    get_output_embeddings = getattr(model, "get_output_embeddings", None)  # a Hugging Face model's method
    head = get_output_embeddings() if get_output_embeddings is not None else None
    path = next((name for name, m in model.named_modules() if m is head and name), None) if head is not None else None
    if path is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no LM head; load the model with AutoModelForCausalLM"
        )
    return path


def _family_checks(model: nn.Module, family: str) -> float:
    """What a family's architecture genuinely needs checked; returns the residual multiplier."""
    config: Any = model.config  # a Hugging Face PretrainedConfig
    if family == "opt":
        if not getattr(config, "do_layer_norm_before", True):
            raise UnsupportedArchitectureError(
                "this OPT model is post-LN (do_layer_norm_before=False, e.g. opt-350m): the residual "
                "stream is re-normalised after every layer, so a residual target cannot be written by "
                "the MLP output projection alone")
        if getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
            raise UnsupportedArchitectureError(
                "this OPT model projects the final hidden state (project_out) before the LM head; not supported")
    if family == "falcon" and getattr(config, "alibi", False):
        raise UnsupportedArchitectureError("Falcon with ALiBi attention is not supported (no rotary positions)")
    if family == "granite":
        return float(getattr(config, "residual_multiplier", 1.0))
    return 1.0


def _build_spec(model: nn.Module, family: str, table: Mapping, *, residual_multiplier: float = 1.0,
                layers_override=None) -> ModelSpec:
    layers_path = table["layers"]
    layers = get_module(model, layers_path)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedArchitectureError(f"{layers_path!r} is not a non-empty ModuleList in this {family} model")
    n_layers = len(layers)
    layer_path = layers_path + ".{}"
    edit_path = layer_path + "." + table["edit"]
    d_k, d_model = _edit_shape(get_module(model, edit_path.format(0)), edit_path.format(0))
    for i in range(1, n_layers):
        if _edit_shape(get_module(model, edit_path.format(i)), edit_path.format(i)) != (d_k, d_model):
            raise UnsupportedArchitectureError(f"edited modules differ in shape across layers in this {family} model")
    norm = get_module(model, table["norm"])
    if isinstance(norm, (nn.ModuleList, nn.ModuleDict, nn.Linear, nn.Embedding)):
        raise UnsupportedArchitectureError(f"final norm {table['norm']!r} is a {type(norm).__name__}, not a norm")
    if table.get("head"):
        head = get_module(model, table["head"])
        if not isinstance(head, nn.Linear):
            raise UnsupportedArchitectureError(
                f"LM head {table['head']!r} is a {type(head).__name__}; expected nn.Linear"
            )
        head_path = table["head"]
    else:
        head_path = _head_path(model)
    head = get_module(model, head_path)
    if isinstance(head, nn.Linear) and head.in_features != d_model:
        raise ShapeError(f"LM head {head_path!r} takes {head.in_features} features but the edited module "
                         f"outputs {d_model}")
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if hidden is not None and hidden != d_model:
        raise UnsupportedArchitectureError(f"edited module outputs {d_model} features but the hidden size is {hidden}")
    post = None
    if table.get("post_mlp_norm"):
        post = layer_path + "." + table["post_mlp_norm"]
        for i in range(n_layers):
            _rms_norm_parts(get_module(model, post.format(i)), post.format(i), d_model)
    if not (isinstance(residual_multiplier, (int, float)) and math.isfinite(residual_multiplier)
            and residual_multiplier != 0):
        raise UnsupportedArchitectureError(
            f"residual_multiplier must be a finite non-zero number; got {residual_multiplier!r}"
        )
    if layers_override is not None:
        chosen = tuple(int(l) for l in layers_override)
        if not chosen or any(not 0 <= l < n_layers for l in chosen):
            raise UnsupportedArchitectureError(f"default_layers {layers_override!r} outside [0, {n_layers})")
    else:
        chosen = default_layers(family, n_layers, table.get("start"))
    return ModelSpec(
        family=family, n_layers=n_layers, layer_path=layer_path, edit_module_path=edit_path,
        final_norm_path=table["norm"], lm_head_path=head_path, default_layers=chosen, d_k=int(d_k),
        d_model=int(d_model), post_mlp_norm_path=post, residual_multiplier=float(residual_multiplier),
    )


def detect_spec(model: nn.Module, override: Mapping | ModelSpec | None = None) -> ModelSpec:
    """Detect the :class:`ModelSpec` of a Hugging Face causal LM from the model object.

    Uses ``model.config.model_type`` to pick the layout, then checks that the decoder layers,
    the edited modules (``nn.Linear`` or ``Conv1D``), the final norm and the LM head are where
    the layout says. Mixture-of-experts models are refused. Raises
    :class:`UnsupportedArchitectureError` otherwise.

    override : for unknown or custom architectures, either a :class:`ModelSpec` (returned as is)
        or a mapping of :meth:`ModelSpec.custom`'s keyword arguments (``layers``, ``edit``,
        ``final_norm``, optional ``lm_head``, ``post_mlp_norm``, ``residual_multiplier``,
        ``default_layers``), validated against the model.
    """
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if override is not None:
        if isinstance(override, ModelSpec):
            return override
        if not isinstance(override, Mapping):
            raise UnsupportedArchitectureError(
                f"override must be a mapping or a ModelSpec; got {type(override).__name__}"
            )
        allowed = {"layers", "edit", "final_norm", "lm_head", "post_mlp_norm", "residual_multiplier", "default_layers"}
        unknown = set(override) - allowed
        missing = {"layers", "edit", "final_norm"} - set(override)
        if unknown or missing:
            raise UnsupportedArchitectureError(
                f"override: unknown keys {sorted(unknown)} / missing keys {sorted(missing)}; expected "
                f"layers, edit, final_norm (required), lm_head, post_mlp_norm, residual_multiplier, default_layers")
        _refuse_moe(model, family)
        return ModelSpec.custom(model, **override)
    _refuse_moe(model, family)
    if family not in _FAMILIES:
        extra = (" (the multimodal Gemma 3: load its text model with Gemma3ForCausalLM)" if family == "gemma3" else "")
        raise UnsupportedArchitectureError(
            f"model type {family!r} ({type(model).__name__}) is not supported{extra}; supported families: "
            f"{', '.join(KNOWN_FAMILIES)}; describe another architecture with detect_spec(model, override=...)"
        )
    residual_multiplier = _family_checks(model, family)
    return _build_spec(model, family, _FAMILIES[family], residual_multiplier=residual_multiplier)


def needs_bos(spec_or_model: ModelSpec | nn.Module) -> bool:
    """Whether every prompt must start with the tokenizer's BOS token: the family table's one
    rule (Gemma 2/3: without it the model is badly off-distribution; Gemma 3 270M gets 0 of 20
    simple facts right without BOS, 10 with it). Every other family, and custom specs, run
    without special tokens.

    Takes a :class:`ModelSpec` or the model itself (read from ``model.config.model_type``), so
    functions that see only ``(model, tokenizer)`` apply the same rule. Token rows are built by
    :func:`rlsedit_llm.pipeline.tokens.encode_prompt`.
    """
    family: str | None
    if isinstance(spec_or_model, ModelSpec):
        family = spec_or_model.family
    else:
        family = getattr(getattr(spec_or_model, "config", None), "model_type", None)
    return bool((_FAMILIES.get(family, {}) if family is not None else {}).get("bos", False))


# --------------------------------------------------------------------------------------------
# The RMSNorm after the MLP (checked when the spec is built; used by adapters.residual)
# --------------------------------------------------------------------------------------------
def _rms_norm_parts(norm: nn.Module, path: str, d_model: int) -> tuple[torch.Tensor, float]:
    """(effective gain g (d_model,), eps) of an RMSNorm ``x -> g * x / sqrt(mean(x^2) + eps)``.

    The gain is measured, not assumed (Gemma stores ``1 + weight``, OLMo 2 ``weight``), and the
    module is checked to be an RMSNorm on a random input; anything else (LayerNorm subtracts the
    mean, which no down-projection target can undo) raises :class:`UnsupportedArchitectureError`.
    """
    eps = next((getattr(norm, a) for a in ("eps", "variance_epsilon", "epsilon") if hasattr(norm, a)), None)
    if not isinstance(eps, (int, float)):
        raise UnsupportedArchitectureError(
            f"post-MLP norm {path!r} ({type(norm).__name__}) has no eps; expected an RMSNorm"
        )
    p = next(norm.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.dtype.is_floating_point else torch.float32
    with torch.no_grad():
        one = torch.ones(1, d_model, dtype=dtype, device=device)
        g = norm(one).double()[0] * math.sqrt(1.0 + eps)  # N(1) = g / sqrt(1 + eps)
        x = torch.randn(2, d_model, generator=torch.Generator().manual_seed(0), dtype=torch.float32).to(device, dtype)
        expected = g * x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + eps)
        low_precision = dtype in (torch.float16, torch.bfloat16)
        ok = torch.allclose(norm(x).double(), expected, rtol=2e-2 if low_precision else 1e-4,
                            atol=1e-3 if low_precision else 1e-5)
    if not ok:
        raise UnsupportedArchitectureError(
            f"post-MLP norm {path!r} ({type(norm).__name__}) is not an RMSNorm x -> g * x / rms(x); "
            f"its output cannot be inverted by a down-projection target")
    return g, float(eps)


# --------------------------------------------------------------------------------------------
# Weights in row-key convention: v = W^T k, W of shape (d_k, d_v).
# --------------------------------------------------------------------------------------------
def read_weight(module: nn.Module) -> torch.Tensor:
    """Weight of ``module`` as a detached copy ``W`` of shape ``(d_k, d_v)`` (row-key convention).

    ``nn.Linear`` (weight ``[out, in]``) gives ``weight.T``; ``Conv1D`` (weight ``[in, out]``)
    gives ``weight``. Dtype and device are the module's.
    """
    if isinstance(module, nn.Linear):
        return module.weight.detach().T.clone(memory_format=torch.contiguous_format)
    if _is_conv1d(module):
        return _weight(module).detach().clone(memory_format=torch.contiguous_format)
    raise UnsupportedArchitectureError(
        f"cannot read a weight from a {type(module).__name__}; expected nn.Linear or Conv1D"
    )


def write_weight(module: nn.Module, W: torch.Tensor) -> None:
    """Write ``W`` of shape ``(d_k, d_v)`` into ``module`` in its own orientation, dtype and device.

    Raises :class:`ShapeError` or :class:`NonFiniteError` (module untouched) for bad input.
    Finiteness is checked on the value as the module will hold it, after the cast to its dtype:
    a float64 weight of 1e5 is finite but becomes ``inf`` in a float16 model.
    """
    expected: tuple[int, ...]
    if isinstance(module, nn.Linear):
        expected = (module.in_features, module.out_features)
        transpose = True
    elif _is_conv1d(module):
        expected = tuple(_weight(module).shape)
        transpose = False
    else:
        raise UnsupportedArchitectureError(
            f"cannot write a weight into a {type(module).__name__}; expected nn.Linear or Conv1D"
        )
    if not isinstance(W, torch.Tensor) or tuple(W.shape) != expected:
        got = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise ShapeError(f"weight must have shape (d_k, d_v) = {expected}; got {got}")
    target = _weight(module)
    # Cast first (no copy when W is already in the module's dtype and device), then check what
    # would actually be stored.
    held = W.detach().to(device=target.device, dtype=target.dtype)
    if not torch.isfinite(held).all():
        if not torch.isfinite(W).all():
            raise NonFiniteError("refusing to write a weight containing NaN/inf (nothing was written)")
        limit = torch.finfo(target.dtype).max
        raise NonFiniteError(
            f"refusing to write a weight that overflows the model's dtype {target.dtype}: its largest entry "
            f"{float(W.detach().abs().max()):.4g} exceeds {limit:.4g} (nothing was written); load the model in a "
            f"wider dtype (bfloat16 or float32) or make a smaller edit")
    with torch.no_grad():
        target.copy_(held.T if transpose else held)


def model_device(model: nn.Module) -> torch.device:
    """Where input ids must go: the device of the input embedding (the first parameter's for a
    model without one; the CPU for weights offloaded to the meta device)."""
    try:
        get_input_embeddings: Any = model.get_input_embeddings  # a Hugging Face model's method
        device = get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        device = next(model.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device
