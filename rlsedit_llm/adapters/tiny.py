"""Tiny randomly initialised causal LMs of every known family, and their tokenizer, built offline
from configs (no weights, no network): for tests."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from rlsedit_llm.adapters.spec import KNOWN_FAMILIES
from rlsedit_llm.errors import UnsupportedArchitectureError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

__all__ = ["tiny_model"]

_TINY_ALIASES = {"gemma3": "gemma3_text"}

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


def _tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained deterministically on a fixed built-in text.

    Byte-level means every string encodes; leading-space handling matches GPT-2 style
    tokenizers (``" Paris"`` is one token), so subject positions are found as with real models.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tk_models
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
                 d_ff: int, max_positions: int, **overrides: Any) -> PretrainedConfig:
    import transformers

    ids: dict[str, Any] = dict(bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    cfg: PretrainedConfig
    kv_heads = max(1, n_heads // 2)
    head_dim = d_model // n_heads
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=max_positions, n_embd=d_model, n_layer=n_layers,
                                      n_head=n_heads, n_inner=d_ff, **ids)
    elif family == "gptj":
        cfg = transformers.GPTJConfig(vocab_size=vocab, n_positions=max_positions, n_embd=d_model, n_layer=n_layers,
                                      n_head=n_heads, n_inner=d_ff, rotary_dim=max(2, head_dim // 2), **ids)
    elif family == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(vocab_size=vocab, max_position_embeddings=max_positions, hidden_size=d_model,
                                         num_hidden_layers=n_layers, num_attention_heads=n_heads,
                                         intermediate_size=d_ff, **ids)
    elif family == "opt":
        cfg = transformers.OPTConfig(vocab_size=vocab, max_position_embeddings=max_positions, hidden_size=d_model,
                                     num_hidden_layers=n_layers, num_attention_heads=n_heads, ffn_dim=d_ff,
                                     word_embed_proj_dim=d_model, do_layer_norm_before=True, **ids)
    elif family == "falcon":
        cfg = transformers.FalconConfig(vocab_size=vocab, max_position_embeddings=max_positions, hidden_size=d_model,
                                        num_hidden_layers=n_layers, num_attention_heads=n_heads, ffn_hidden_size=d_ff,
                                        parallel_attn=True, alibi=False, bias=False, **ids)
    else:
        common: dict[str, Any] = dict(vocab_size=vocab, max_position_embeddings=max_positions, hidden_size=d_model,
                      num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=kv_heads,
                      intermediate_size=d_ff, **ids)
        if family in ("gemma2", "gemma3_text"):
            # Sliding-window and global layers alternate (Gemma 3 270M: 5 sliding, then 1 global);
            # embeddings tied and scaled by sqrt(d_model), as in the real models.
            layer_types = ["full_attention" if (i + 1) % 2 == 0 else "sliding_attention" for i in range(n_layers)]
            cls: type[PretrainedConfig] = (transformers.Gemma2Config if family == "gemma2"
                                           else transformers.Gemma3TextConfig)
            extra: dict[str, Any] = dict(head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=16,
                                         layer_types=layer_types, tie_word_embeddings=True)
            cfg = cls(**common, **extra)
        else:
            cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
                   "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
                   "phi3": transformers.Phi3Config, "olmo2": transformers.Olmo2Config,
                   "granite": transformers.GraniteConfig, "stablelm": transformers.StableLmConfig}[family]
            extra = {"tie_word_embeddings": False}
            if family == "qwen3":
                extra["head_dim"] = head_dim
            if family == "granite":  # non-trivial multipliers, so tests see them
                extra.update(residual_multiplier=0.5, logits_scaling=2.0, embedding_multiplier=2.0)
            cfg = cls(**common, **extra)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(family: str, *, seed: int = 0, n_layers: int = 4, d_model: int = 32, n_heads: int = 4,
               d_ff: int | None = None, max_positions: int = 256, dtype: torch.dtype = torch.float32,
               attn_implementation: str | None = None, init_std: float | None = None,
               **config_overrides: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A tiny randomly initialised causal LM of ``family`` and a matching tokenizer, built offline.

    ``family`` is one of :data:`KNOWN_FAMILIES` (``"gemma3"`` is accepted for ``"gemma3_text"``).

    ``d_ff`` is the MLP inner width (the key dimension ``d_k``; default ``2 * d_model``; pass
    ``d_ff=d_model`` for a square edited matrix). ``init_std`` overrides the weight initialisation
    scale (``initializer_range``, default 0.02): with a larger scale (e.g. 0.3) the output
    distribution is far from uniform and a hidden-state change can move it, as in a trained
    model. Extra keyword arguments are set on the config.
    Deterministic for a ``seed``. Returns ``(model, tokenizer)`` with the model in eval mode.
    """
    from transformers import AutoModelForCausalLM

    family = _TINY_ALIASES.get(family, family)
    if family not in KNOWN_FAMILIES:
        raise UnsupportedArchitectureError(
            f"no tiny model for family {family!r}; supported families: {', '.join(KNOWN_FAMILIES)}"
        )
    tok = _tiny_tokenizer()
    eos = tok.eos_token_id
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
