"""Model inputs from token rows: the pad id, right padding, and the device input ids go to
(:func:`input_device`, defined with the model adapters as ``model_device``).

Every pipeline stage batches rows of token ids the same way: right padding with an attention
mask, so a row's real tokens keep positions ``0 .. len - 1`` and, the model being causal, the
padding after them changes nothing they compute (the pad id itself is therefore arbitrary).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlsedit_llm.adapters.spec import model_device

__all__ = ["pad_id", "right_pad", "input_device"]


def pad_id(tokenizer) -> int:
    """The tokenizer's pad token, else its EOS token, else 0."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return 0 if pad is None else int(pad)


def right_pad(rows: Sequence[Sequence[int]], pad: int, device=None, extra: int = 0):
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
