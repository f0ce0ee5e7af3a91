"""Tiny offline models and texts for the key-statistics tests, and the torchrun worker.

Imported by ``test_stats.py`` (by file path) for the builders; run as a script by
``python -m torch.distributed.run --nproc_per_node 2 _stats_worker.py CORPUS CACHE_DIR OUT_DIR``
for the two-process test: every rank computes the sharded statistic and writes what it got.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

WORDS = (
    "the of and to in a is was for on as by with he at from his an were are which this be or "
    "has had not first one their its new after but who they have her she two been other when "
    "there all during into school time may years more most only over city some world would where "
    "later up such used many can state about national out known university united then made"
).split()

LLAMA_TEMPLATE = "model.layers.{}.mlp.down_proj"
GPT2_TEMPLATE = "transformer.h.{}.mlp.c_proj"


def tiny_tokenizer():
    """A word-level fast tokenizer over ``WORDS`` (ids 0 = [PAD], 1 = [UNK]), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def tiny_model(family: str = "llama", *, seed: int = 0, n_layers: int = 4, dtype=torch.float64):
    """A random tiny causal LM (Llama: down_proj 24 -> 16; GPT-2: c_proj 64 -> 16)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    vocab_size = len(WORDS) + 2
    if family == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=16, intermediate_size=24, num_hidden_layers=n_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    elif family == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_embd=16, n_layer=n_layers, n_head=4, n_positions=256)
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.eval()
    return model


def tiny_texts(n_docs: int = 40, *, seed: int = 0, min_words: int = 5, max_words: int = 90) -> list[str]:
    """Deterministic random documents over ``WORDS`` (one token per word), some longer than
    the test ``max_length`` so that windowing is exercised."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        n = int(rng.integers(min_words, max_words + 1))
        docs.append(" ".join(rng.choice(WORDS, size=n)))
    return docs


def main(corpus: str, cache_dir: str, out_dir: str) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from rlsedit_llm.pipeline.stats import second_moments

    torch.set_num_threads(1)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    forwards = [0]
    model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    means = second_moments(
        model, tok, LLAMA_TEMPLATE, [0, 2, 3], corpus=corpus, n_tokens=1500, max_length=32,
        dtype=torch.float64, cache_dir=cache_dir, progress=False, distributed=True, batch_size=4,
    )
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {f"mean{layer}": m.contiguous() for layer, m in means.items()}
    out["forwards"] = torch.tensor([forwards[0]])
    out["world"] = torch.tensor([world])
    save_file(out, f"{out_dir}/rank{rank}.safetensors")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
