"""Fingerprints of a model's weights and of a tokenizer: the identity cache keys and saved
states are checked against (a statistic computed for, or an edit made on, other weights must
never be reused)."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["model_fingerprint", "tokenizer_fingerprint"]

logger = logging.getLogger(__name__)

_FULL_HASH_BYTES = 1 << 16  # tensors up to 64 KiB are hashed whole
_SAMPLE_BLOCKS = 64  # larger ones: 64 evenly spaced blocks of 1 KiB ...
_SAMPLE_BLOCK = 1 << 10
_CHECKSUM_CHUNK = 1 << 24  # ... plus an exact integer checksum of every 32-bit word


def _tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` as a flat uint8 tensor on ``t``'s device."""
    t = t.detach().contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return t.view(torch.uint8)


def _word_checksum(raw: torch.Tensor) -> int:
    """Exact sum of the tensor's 32-bit words (bytes if the size is not a multiple of 4).

    Integer sums are exact and independent of summation order, so the value is the same on any
    device and thread count. Any change of a single element changes it.
    """
    words = raw.view(torch.int32) if raw.numel() % 4 == 0 else raw
    if words.device.type == "cpu":  # numpy's widening integer sum is ~30x faster than torch's here
        import numpy as np

        return int(np.add.reduce(words.numpy(), dtype=np.int64))
    total = 0
    for start in range(0, words.numel(), _CHECKSUM_CHUNK):
        total += int(words[start : start + _CHECKSUM_CHUNK].sum(dtype=torch.int64).item())
    return total


def model_fingerprint(model: nn.Module) -> str:
    """A cheap, deterministic fingerprint of a model's architecture and weights.

    For every parameter and persistent buffer (in ``named_parameters``/``named_buffers`` order;
    non-persistent buffers such as rotary frequency tables are derived, not weights) the SHA-256
    is fed with its name, dtype and shape; tensors of at most 64 KiB are then hashed whole, larger
    ones through 64 evenly spaced 1 KiB blocks of their bytes **and** the exact integer sum of all
    their 32-bit words. The word sum reads every element (a single changed weight anywhere
    changes it) yet costs one pass of integer additions, which are exact and order-independent,
    so the fingerprint is identical on CPU and GPU and across thread counts. What can escape it
    is a change that keeps every sampled byte and the word sum exactly, which edits (dense
    low-rank updates) and accidental modifications do not do. The model's class name is
    included; the weights of the whole model are covered (a stricter rule than "every layer up
    to the last edited one").

    Parameters on the ``meta`` device (offloaded) contribute their name, dtype and shape only,
    and a warning is logged.

    Returns ``"sha256:<64 hex digits>"``.
    """
    h = hashlib.sha256(b"rlsedit-model-fingerprint-v1\0" + type(model).__name__.encode())
    persistent = set(model.state_dict(keep_vars=True))  # no copy; excludes derived buffers
    buffers = ((n, b) for n, b in model.named_buffers() if n in persistent)
    named = itertools.chain(model.named_parameters(), buffers)
    warned = False
    for name, tensor in named:
        h.update(f"\0{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        if tensor.device.type == "meta":
            if not warned:
                logger.warning("model_fingerprint: %s is on the meta device; only its shape is hashed", name)
                warned = True
            continue
        raw = _tensor_bytes(tensor)  # (nbytes,) uint8
        n = raw.numel()
        if n <= _FULL_HASH_BYTES:
            h.update(raw.cpu().numpy().tobytes())
            continue
        starts = [(i * (n - _SAMPLE_BLOCK)) // (_SAMPLE_BLOCKS - 1) for i in range(_SAMPLE_BLOCKS)]
        if raw.device.type == "cpu":  # slicing in numpy: tiny torch ops cost ms each on a busy CPU
            flat = raw.numpy()
            h.update(b"".join(flat[s : s + _SAMPLE_BLOCK].tobytes() for s in starts))
        else:  # gather on the device, move 64 KiB
            index = torch.tensor(starts, device=raw.device)[:, None] + torch.arange(_SAMPLE_BLOCK, device=raw.device)
            h.update(raw[index.reshape(-1)].cpu().numpy().tobytes())
        h.update(f"\0{_word_checksum(raw)}".encode())
    return "sha256:" + h.hexdigest()


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """SHA-256 of the tokenizer's full definition (fast tokenizers) or vocabulary (slow ones)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode() + b"\0")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        vocab = tokenizer.get_vocab()
        h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    return "sha256:" + h.hexdigest()
