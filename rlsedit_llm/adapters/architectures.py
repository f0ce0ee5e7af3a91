"""Model architectures rlsedit can edit, weight orientation, and loading (offline SmolLM2 and
Gemma 3 270M, tiny test models).

This module is the stable import point; the code lives in

* :mod:`rlsedit_llm.adapters.spec`: :class:`ModelSpec`, the family table, :func:`detect_spec`,
  :func:`get_module`, :func:`read_weight` / :func:`write_weight`, :func:`module_target`,
  :func:`final_logits`;
* :mod:`rlsedit_llm.adapters.loading`: :func:`load_model` and the offline model caches;
* :mod:`rlsedit_llm.adapters.tiny`: :func:`tiny_model`.

    spec = detect_spec(model)
    module = get_module(model, spec.edit_module_path.format(layer))
    W = read_weight(module)          # (d_k, d_v): row-key convention, v = W^T k
    write_weight(module, W_new)      # back in the module's own orientation, dtype and device
"""

from __future__ import annotations

from rlsedit_llm.adapters.loading import (  # noqa: F401  (re-exported)
    GEMMA3_GGUF,
    GEMMA3_SHA256,
    OFFLINE_MODELS,
    SMOLLM2_GGUF,
    _CACHE_MARKER,
    _cache_fingerprint,
    _finish,
    _load_gemma3,
    _load_smollm2,
    _smollm2_folder,
    _user_cache_root,
    _write_cache,
    load_model,
)
from rlsedit_llm.adapters.spec import (  # noqa: F401  (re-exported)
    _FAMILIES,
    _N_EDIT_LAYERS,
    KNOWN_FAMILIES,
    MOE_FAMILIES,
    POST_NORM_FAMILIES,
    SUPPORTED_FAMILIES,
    ModelSpec,
    _conv1d_class,
    _is_conv1d,
    default_layers,
    detect_spec,
    get_module,
    model_device,
    needs_bos,
    read_weight,
    write_weight,
)
from rlsedit_llm.adapters.residual import (  # noqa: F401  (re-exported)
    final_logits,
    module_target,
    residual_contribution,
    transform_logits,
)
from rlsedit_llm.adapters.tiny import _tiny_config, _tiny_tokenizer, tiny_model  # noqa: F401  (re-exported)

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
    "module_target",
    "residual_contribution",
    "final_logits",
    "transform_logits",
    "needs_bos",
    "load_model",
    "tiny_model",
    "model_device",
    "default_layers",
    "SMOLLM2_GGUF",
    "GEMMA3_GGUF",
]
