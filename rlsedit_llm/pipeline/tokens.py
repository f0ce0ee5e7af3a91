"""Model inputs from token rows: the pad id, right padding, and the device input ids go to
(:func:`input_device`, defined with the model adapters as ``model_device``).

Every pipeline stage batches rows of token ids the same way: right padding with an attention
mask, so a row's real tokens keep positions ``0 .. len - 1`` and, the model being causal, the
padding after them changes nothing they compute (the pad id itself is therefore arbitrary).

Prompts are encoded in one place, :func:`encode_prompt`: the text's tokens without special
tokens, preceded by the tokenizer's BOS token where the family needs it (Gemma;
:func:`~rlsedit_llm.adapters.spec.needs_bos`, decided from the spec or the model). Targets and
other continuations are appended without special tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from rlsedit_llm.adapters.spec import model_device, needs_bos
from rlsedit_llm.errors import UnsupportedArchitectureError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["pad_id", "right_pad", "input_device", "needs_bos", "bos_prefix", "encode_prompt"]


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad token, else its EOS token, else 0."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else int(pad)


def bos_prefix(tokenizer: PreTrainedTokenizerBase, bos: bool) -> list[int]:
    """``[tokenizer.bos_token_id]`` when ``bos``, else ``[]``.

    Raises :class:`UnsupportedArchitectureError` when ``bos`` is asked for and the tokenizer has
    no BOS token (the model would be run off-distribution)."""
    if not bos:
        return []
    token = getattr(tokenizer, "bos_token_id", None)
    if token is None:
        raise UnsupportedArchitectureError(
            "this model family needs a BOS token at the start of every prompt, but the tokenizer has "
            "no bos_token_id; load the tokenizer that ships with the model")
    return [int(token)]


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str, *, bos: bool) -> list[int]:
    """Token ids of a prompt: ``text`` without special tokens, preceded by BOS when ``bos``
    (pass ``needs_bos(spec)`` or ``needs_bos(model)``). Positions in the text's own tokenisation
    shift by ``len(bos_prefix(tokenizer, bos))``."""
    return bos_prefix(tokenizer, bos) + list(tokenizer(text, add_special_tokens=False)["input_ids"])


def right_pad(rows: Sequence[Sequence[int] | torch.Tensor], pad: int, device: torch.device | str | None = None,
              extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows (lists or 1-D tensors) into ``(input_ids, attention_mask)``, both
    int64 of shape (n, max_len + extra), on ``device`` (``None``: the CPU)."""
    width = max(len(r) for r in rows) + extra
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    if device is not None:
        ids, mask = ids.to(device), mask.to(device)
    return ids, mask


input_device = model_device  # one home: rlsedit_llm.adapters.spec.model_device
