"""Key statistics: the uncentred second moment E[k kᵀ] of each edited module's input.

For every edited module (the MLP down-projection of a layer) the key ``k`` is the module's input
at one token, ``d_k`` wide. Over a text corpus the statistic is

    Σ = (1/n) Σ_tokens k kᵀ        (d_k, d_k), uncentred, padding excluded,

the ``E[kkᵀ]`` that MEMIT, AlphaEdit and RLSEdit use as the preservation metric (the anchor Gram
is ``N·Σ``). This module computes it for all edited layers in one pass over the corpus.

The token stream
----------------
Documents are tokenized in corpus order with ``add_special_tokens=False``. With
``overflow="split"`` (default) a document longer than ``max_length`` tokens is cut into
consecutive windows of ``max_length`` tokens, each a sequence of its own; with
``overflow="truncate"`` only its first window is kept (MEMIT's rule, which needs a corpus of many
documents: the shipped 97-article sample holds about 50k tokens that way, but about 500k split).
The stream stops after exactly ``max_tokens`` tokens: the last sequence is cut short, which for a
causal model equals masking its tail. Sequences are batched with right padding and an attention
mask; a forward pre-hook on each edited module takes its input ``x (B, T, d_k)``, keeps the rows
of real tokens ``a (n, d_k)`` and adds ``aᵀa`` to a float64 sum on the module's device. Once every
edited module has seen the batch, the forward pass is stopped: layers above the last edited one
and the LM head are never run.

Caching and resumption
----------------------
:func:`second_moments` caches each layer's mean in ``<cache_dir>/`` (default
``$XDG_CACHE_HOME/rlsedit/stats`` or ``~/.cache/rlsedit/stats``) as a safetensors file plus a JSON
sidecar holding the key fields and the file's SHA-256; both are written atomically (temporary
file in the same folder, fsync, ``os.replace``). A file is used only if its sidecar names the
same key and its bytes hash to the recorded digest, and the tensor has the right shape, dtype and
finite values; anything else is ignored, logged and rebuilt. The key covers the model weights
(:func:`model_fingerprint`), the tokenizer, the corpus (:func:`~rlsedit_llm.corpus.corpus_fingerprint`),
the token count, ``max_length``, ``overflow``, the stored dtype, the layer and its module path.

While computing, the float64 partial sums are checkpointed every ``checkpoint_every`` of the
tokens (default 20 %) with the number of sequences consumed; a rerun with ``resume=True``
continues from the last checkpoint and gives the same result as one uninterrupted pass.

Distributed
-----------
Under ``torch.distributed`` (``torchrun``, ``accelerate launch``) each rank runs the sequences
``rank::world_size`` of the same token stream; the float64 sums and token counts are
all-reduced (SUM), so every rank returns the one-pass statistic. Only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save
from torch import nn
from tqdm.auto import tqdm

from rlsedit_llm.pipeline.corpus import corpus_fingerprint, load_corpus
from rlsedit_llm.errors import CorpusError, HyperparameterError, ShapeError, UnsupportedArchitectureError

__all__ = [
    "MomentSum",
    "accumulate_second_moments",
    "second_moments",
    "model_fingerprint",
    "default_stats_dir",
]

logger = logging.getLogger(__name__)

_FORMAT = 1  # bump when the meaning of a cached file changes
_STORED_DTYPES = {torch.float32: "float32", torch.float64: "float64"}
_OVERFLOW = ("split", "truncate")


# ============================================================================================
# MomentSum: a running Σ k kᵀ with its token count
# ============================================================================================
@dataclasses.dataclass
class MomentSum:
    """Sum of ``k kᵀ`` over ``count`` tokens.

    Attributes
    ----------
    total : Tensor (d_k, d_k), float64
        ``Σ_tokens k kᵀ`` (symmetric positive semi-definite up to rounding).
    count : int
        Number of tokens summed.
    """

    total: torch.Tensor
    count: int

    def __post_init__(self):
        if self.total.ndim != 2 or self.total.shape[0] != self.total.shape[1]:
            raise ShapeError(f"MomentSum.total must be square (d_k, d_k), got {tuple(self.total.shape)}")
        if int(self.count) < 0:
            raise HyperparameterError(f"MomentSum.count must be >= 0, got {self.count}")
        self.count = int(self.count)

    @classmethod
    def zeros(cls, d_k: int, *, device=None, dtype: torch.dtype = torch.float64) -> MomentSum:
        """An empty sum (no token) of width ``d_k``."""
        return cls(torch.zeros(d_k, d_k, dtype=dtype, device=device), 0)

    @property
    def d_k(self) -> int:
        return self.total.shape[0]

    def merge(self, other: MomentSum) -> MomentSum:
        """The sum over the tokens of both (a new object on ``self``'s device and dtype)."""
        if other.d_k != self.d_k:
            raise ShapeError(f"cannot merge MomentSums of widths {self.d_k} and {other.d_k}")
        return MomentSum(self.total + other.total.to(self.total), self.count + other.count)

    def mean(self) -> torch.Tensor:
        """``E[k kᵀ] = total / count`` in float64 (``CorpusError`` when no token was summed)."""
        if self.count == 0:
            raise CorpusError("no token was summed: the second moment is undefined")
        return self.total.to(torch.float64) / self.count

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """``{prefix+"total": (d_k, d_k), prefix+"count": (1,) int64}`` on the CPU (for safetensors)."""
        return {
            prefix + "total": self.total.detach().to("cpu").contiguous(),
            prefix + "count": torch.tensor([self.count], dtype=torch.int64),
        }

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str = "", *, device=None) -> MomentSum:
        """Inverse of :meth:`to_tensors`."""
        total = tensors[prefix + "total"]
        count = tensors[prefix + "count"]
        if count.numel() != 1:
            raise ShapeError(f"{prefix}count must hold one integer")
        return cls(total.to(device=device), int(count.reshape(()).item()))


# ============================================================================================
# Fingerprints
# ============================================================================================
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


def _tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of the tokenizer's full definition (fast tokenizers) or vocabulary (slow ones)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode() + b"\0")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        vocab = tokenizer.get_vocab()
        h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    return "sha256:" + h.hexdigest()


def _texts_fingerprint(texts) -> str:
    h = hashlib.sha256(b"rlsedit-texts-v1")
    for text in _iter_texts(texts):
        b = text.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
    return "sha256:" + h.hexdigest()


# ============================================================================================
# Modules, devices, validation
# ============================================================================================
def _input_width(module: nn.Module, layer) -> int:
    """``d_k``: the input width of an edited module, decided by module type (never by shape)."""
    if isinstance(module, nn.Linear):
        return int(module.in_features)
    from transformers.pytorch_utils import Conv1D  # GPT-2 family: weight stored (in, out)

    if isinstance(module, Conv1D):
        return int(module.weight.shape[0])
    raise UnsupportedArchitectureError(
        f"edited module of layer {layer} is a {type(module).__name__}; key statistics support "
        "torch.nn.Linear and transformers Conv1D modules"
    )


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return torch.device("cpu") if p.device.type in ("meta", "mps") else p.device
    return torch.device("cpu")


def _input_device(model: nn.Module) -> torch.device:
    try:
        device = model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        device = next(model.parameters()).device
    return torch.device("cpu") if device.type == "meta" else device


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HyperparameterError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_modules(modules: Mapping[int, nn.Module]) -> dict[int, nn.Module]:
    if not isinstance(modules, Mapping) or len(modules) == 0:
        raise HyperparameterError("no layers given: pass at least one edited layer")
    if len({id(m) for m in modules.values()}) != len(modules):
        raise HyperparameterError("two layers name the same module object")
    for layer, module in modules.items():
        if not isinstance(module, nn.Module):
            raise HyperparameterError(f"layer {layer}: expected a torch.nn.Module, got {type(module).__name__}")
    return dict(sorted(modules.items()))


# ============================================================================================
# The token stream
# ============================================================================================
def _iter_texts(texts) -> Iterable[str]:
    """Yield the documents of a Dataset (its "text" column, read in chunks) or of an iterable."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        datasets = None
    if isinstance(texts, str):
        raise CorpusError("texts must be a collection of documents, not a single string")
    if datasets is not None and isinstance(texts, datasets.Dataset):
        if "text" not in texts.column_names:
            raise CorpusError(f"the corpus Dataset has no 'text' column (columns: {texts.column_names})")
        for start in range(0, len(texts), 256):
            yield from texts[start : start + 256]["text"]
        return
    yield from texts


@dataclasses.dataclass
class _Plan:
    """The global token stream: sequences of token ids and the checkpoints after some of them."""

    seqs: list[torch.Tensor]  # each (T_i,) int64, 1 <= T_i <= max_length
    checkpoints: list[int]  # sorted sequence indices after which partial sums are checkpointed
    n_tokens: int

    def tokens_before(self, index: int) -> int:
        return sum(int(s.numel()) for s in self.seqs[:index])


def _plan_sequences(
    tokenizer, texts, *, max_tokens: int, max_length: int, overflow: str, checkpoint_every: float | None
) -> _Plan:
    """Tokenize documents in order into sequences until exactly ``max_tokens`` tokens."""
    if overflow not in _OVERFLOW:
        raise HyperparameterError(f"overflow must be one of {_OVERFLOW}, got {overflow!r}")
    thresholds: list[int] = []
    if checkpoint_every:
        if not 0 < checkpoint_every < 1:
            raise HyperparameterError(f"checkpoint_every must be in (0, 1), got {checkpoint_every!r}")
        n_marks = int(1 / checkpoint_every) + 1
        thresholds = sorted({math.ceil(k * checkpoint_every * max_tokens) for k in range(1, n_marks)})
        thresholds = [t for t in thresholds if 0 < t < max_tokens]
    seqs: list[torch.Tensor] = []
    checkpoints: list[int] = []
    total = 0
    n_docs = 0
    docs = iter(_iter_texts(texts))
    chunk_size = 4  # grows to 256: few documents are tokenized beyond what a small run needs
    while total < max_tokens:
        chunk = list(itertools.islice(docs, chunk_size))
        chunk_size = min(2 * chunk_size, 256)
        if not chunk:
            break
        for doc in chunk:
            if not isinstance(doc, str):
                raise CorpusError(f"corpus documents must be strings, got {type(doc).__name__}")
        chunk = [d for d in chunk if d.strip()]
        n_docs += len(chunk)
        if not chunk:
            continue
        kwargs = {"truncation": True, "max_length": max_length} if overflow == "truncate" else {}
        encoded = tokenizer(chunk, add_special_tokens=False, verbose=False, **kwargs)["input_ids"]
        for ids in encoded:
            for start in range(0, len(ids), max_length if overflow == "split" else max(len(ids), 1)):
                window = ids[start : start + max_length][: max_tokens - total]
                if not window:
                    continue
                seqs.append(torch.tensor(window, dtype=torch.int64))
                total += len(window)
                while thresholds and total >= thresholds[0]:
                    thresholds.pop(0)
                    if total < max_tokens:
                        checkpoints.append(len(seqs))  # checkpoint once len(seqs) sequences are done
                if total >= max_tokens:
                    break
            if total >= max_tokens:
                break
    if total < max_tokens:
        raise CorpusError(
            f"the corpus holds only {total} tokens in {n_docs} non-empty documents "
            f"(max_length={max_length}, overflow={overflow!r}), fewer than the {max_tokens} "
            "requested: lower the token count or use a larger corpus"
        )
    return _Plan(seqs=seqs, checkpoints=sorted(set(checkpoints)), n_tokens=total)


# ============================================================================================
# The hooked forward pass
# ============================================================================================
class _StopForward(Exception):
    """Raised by the last edited module's hook: nothing above it is needed."""


def _accumulate(
    model: nn.Module,
    modules: dict[int, nn.Module],
    plan: _Plan,
    *,
    batch_size: int,
    dtype: torch.dtype,
    progress: bool,
    start: Mapping[int, MomentSum] | None,
    skip_sequences: int,
    shard: tuple[int, int] = (0, 1),
    on_checkpoint=None,
) -> dict[int, MomentSum]:
    """Run this shard's sequences of ``plan[skip_sequences:]`` and return the running sums.

    ``on_checkpoint(position, sums)`` is called (on every rank, in the same order) each time the
    global stream reaches a checkpoint: ``position`` sequences are then covered by the sums of
    all ranks together.
    """
    rank, world = shard
    sums: dict[int, MomentSum] = {}
    for layer, module in modules.items():
        d_k, device = _input_width(module, layer), _module_device(module)
        if start is not None and layer in start:
            s = start[layer]
            if s.d_k != d_k:
                raise ShapeError(f"start sum of layer {layer} has width {s.d_k}, the module takes {d_k}")
            sums[layer] = MomentSum(s.total.to(device=device, dtype=dtype).clone(), s.count)
        else:
            sums[layer] = MomentSum.zeros(d_k, device=device, dtype=dtype)

    state = {"masks": {}, "seen": set()}  # masks: device -> (B, T) bool of the current batch

    def make_hook(layer: int):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))  # (B, T, d_k)
            if layer in state["seen"]:
                raise UnsupportedArchitectureError(
                    f"the edited module of layer {layer} is called more than once per forward pass"
                )
            acc = sums[layer]
            masks = state["masks"]
            if x.device not in masks:
                masks[x.device] = masks[torch.device("cpu")].to(x.device)
            mask = masks[x.device]  # (B, T) bool
            a = x[mask].to(device=acc.total.device, dtype=dtype)  # (n, d_k), real tokens only
            acc.total.addmm_(a.mT, a)  # += aᵀa
            acc.count += a.shape[0]
            state["seen"].add(layer)
            if len(state["seen"]) == len(modules):
                raise _StopForward

        return hook

    # Segments of the global stream end at checkpoints; batches never straddle one, so a resumed
    # run adds exactly the same batches in the same order as an uninterrupted one.
    bounds = [skip_sequences] + [c for c in plan.checkpoints if c > skip_sequences] + [len(plan.seqs)]
    todo = [i for i in range(skip_sequences, len(plan.seqs)) if i % world == rank]
    bar = tqdm(
        total=sum(int(plan.seqs[i].numel()) for i in todo),
        unit="tok",
        desc="key second moments",
        disable=not progress or rank != 0,
    )
    input_device = _input_device(model)
    modes = [(m, m.training) for m in model.modules()]
    handles = [m.register_forward_pre_hook(make_hook(l), with_kwargs=True) for l, m in modules.items()]
    try:
        model.eval()
        with torch.no_grad():
            for seg_start, seg_stop in zip(bounds[:-1], bounds[1:]):
                mine = [i for i in range(seg_start, seg_stop) if i % world == rank]
                for b in range(0, len(mine), batch_size):
                    batch = [plan.seqs[i] for i in mine[b : b + batch_size]]
                    lengths = torch.tensor([s.numel() for s in batch])
                    width = int(lengths.max())
                    ids = torch.zeros(len(batch), width, dtype=torch.int64)  # right padding
                    for row, s in enumerate(batch):
                        ids[row, : s.numel()] = s
                    mask = torch.arange(width)[None, :] < lengths[:, None]  # (B, T) bool
                    state["masks"], state["seen"] = {torch.device("cpu"): mask}, set()
                    try:
                        model(
                            input_ids=ids.to(input_device),
                            attention_mask=mask.to(input_device, torch.int64),
                            use_cache=False,
                        )
                    except _StopForward:
                        pass
                    if len(state["seen"]) != len(modules):
                        missing = sorted(set(modules) - state["seen"])
                        raise UnsupportedArchitectureError(
                            f"the edited modules of layers {missing} were not called in the forward pass"
                        )
                    bar.update(int(lengths.sum()))
                if on_checkpoint is not None and seg_stop < len(plan.seqs):
                    on_checkpoint(seg_stop, sums)
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes:
            m.training = training
        state["masks"] = {}
        bar.close()
    return sums


def accumulate_second_moments(
    model: nn.Module,
    tokenizer,
    modules: Mapping[int, nn.Module],
    texts,
    *,
    max_tokens: int,
    max_length: int = 512,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float64,
    progress: bool = True,
    start: Mapping[int, MomentSum] | None = None,
    skip_sequences: int = 0,
    overflow: str = "split",
) -> dict[int, MomentSum]:
    """Sum ``k kᵀ`` over the first ``max_tokens`` tokens of a corpus, for all modules in one pass.

    Parameters
    ----------
    model : torch.nn.Module
        A causal LM taking ``input_ids``, ``attention_mask`` and ``use_cache``. It is put in eval
        mode for the pass and restored; its weights are not touched.
    tokenizer
        A transformers tokenizer (called with ``add_special_tokens=False``).
    modules : dict[int, nn.Module]
        Layer index -> edited module (``nn.Linear`` or GPT-2 ``Conv1D``) whose input is the key.
    texts : datasets.Dataset (with a "text" column) or iterable of str
        Documents, read in order; whitespace-only ones are skipped.
    max_tokens : int
        Exact number of tokens summed (see the module docstring for the token stream).
    max_length, batch_size : int
        Sequence length (window size) and sequences per forward pass.
    dtype : torch.float64 (default) or torch.float32
        Accumulation dtype of the sums.
    progress : bool
        Show a tqdm bar.
    start, skip_sequences
        Continue a previous run: ``start`` holds its sums over the first ``skip_sequences``
        sequences of the stream, which are not run again.
    overflow : "split" or "truncate"
        What to do with documents longer than ``max_length``.

    Returns
    -------
    dict[int, MomentSum]
        Per layer the float64 (or ``dtype``) sum on the module's device, ``count == max_tokens``.

    Raises
    ------
    HyperparameterError
        No layers, non-positive sizes, unknown ``overflow``, dtype not float32/float64.
    CorpusError
        The corpus holds fewer than ``max_tokens`` tokens, or a document is not a string.
    UnsupportedArchitectureError
        A module is not Linear/Conv1D, or is not called by the model's forward pass.
    """
    modules = _check_modules(modules)
    _check_positive_int("max_tokens", max_tokens)
    _check_positive_int("max_length", max_length)
    _check_positive_int("batch_size", batch_size)
    if dtype not in _STORED_DTYPES:
        raise HyperparameterError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if isinstance(skip_sequences, bool) or not isinstance(skip_sequences, int) or skip_sequences < 0:
        raise HyperparameterError(f"skip_sequences must be an integer >= 0, got {skip_sequences!r}")
    plan = _plan_sequences(
        tokenizer, texts, max_tokens=max_tokens, max_length=max_length, overflow=overflow, checkpoint_every=None
    )
    if skip_sequences > len(plan.seqs):
        raise HyperparameterError(f"skip_sequences={skip_sequences} exceeds the {len(plan.seqs)} sequences")
    return _accumulate(
        model, modules, plan, batch_size=batch_size, dtype=dtype, progress=progress,
        start=start, skip_sequences=skip_sequences,
    )


# ============================================================================================
# Files: atomic writes and verified reads
# ============================================================================================
def default_stats_dir() -> Path:
    """``$XDG_CACHE_HOME/rlsedit/stats`` (or ``~/.cache/rlsedit/stats``)."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "rlsedit" / "stats"


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename durable; not possible on every platform
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _write_entry(stem: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """``stem.safetensors`` then ``stem.json`` (which records the safetensors file's SHA-256)."""
    blob = _st_save(tensors, metadata={"key": meta["key"]})
    _atomic_write(stem.with_suffix(".safetensors"), blob)
    meta = dict(meta, sha256=hashlib.sha256(blob).hexdigest(), format=_FORMAT)
    _atomic_write(stem.with_suffix(".json"), json.dumps(meta, indent=1, sort_keys=True).encode())


def _read_entry(stem: Path, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """The tensors and meta of a verified entry, or ``None`` (missing, stale or corrupt)."""
    meta_path, data_path = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not meta_path.exists() and not data_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != _FORMAT or meta.get("key") != key:
            raise ValueError("its JSON sidecar names another key or format")
        blob = data_path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
            raise ValueError("its bytes do not match the recorded SHA-256")
        tensors = _st_load(blob)
    except Exception as exc:  # any defect: never trust the file
        logger.warning("ignoring cache entry %s: %s", data_path, exc)
        return None
    return tensors, meta


# ============================================================================================
# Distributed helpers
# ============================================================================================
def _dist_setup(distributed: bool | None, model: nn.Module):
    """``(rank, world, device_for_collectives)``; world 1 means single process."""
    import torch.distributed as dist

    if distributed is False or not dist.is_available():
        if distributed:
            raise HyperparameterError("distributed=True but torch.distributed is not available")
        return 0, 1, None
    if not dist.is_initialized():
        if not distributed:
            return 0, 1, None
        use_cuda = _input_device(model).type == "cuda" and dist.is_nccl_available()
        try:
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        except (ValueError, RuntimeError, KeyError) as exc:
            raise HyperparameterError(
                "distributed=True needs torch.distributed initialised, or a launcher environment "
                f"(torchrun / accelerate launch: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): {exc}"
            ) from exc
    backend = dist.get_backend()
    if backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def _all_reduce_sum(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    import torch.distributed as dist

    buf = t.to(device).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def _all_reduce_sums(sums: dict[int, MomentSum], device) -> dict[int, MomentSum]:
    out = {}
    for layer, s in sums.items():
        total = _all_reduce_sum(s.total, device)
        count = _all_reduce_sum(torch.tensor([s.count], dtype=torch.int64), device)
        out[layer] = MomentSum(total, int(count.item()))
    return out


# ============================================================================================
# Public entry point: cached, resumable, distributed
# ============================================================================================
def _module_paths(spec_or_paths, layers: list[int]) -> dict[int, str]:
    template = getattr(spec_or_paths, "edit_module_path", spec_or_paths)
    if isinstance(template, str):
        if "{}" not in template:
            raise HyperparameterError(
                f"module path template {template!r} must contain '{{}}' for the layer index"
            )
        return {layer: template.format(layer) for layer in layers}
    if isinstance(template, Mapping):
        missing = [layer for layer in layers if layer not in template]
        if missing:
            raise HyperparameterError(f"no module path given for layers {missing}")
        return {layer: str(template[layer]) for layer in layers}
    raise HyperparameterError(
        "spec_or_paths must be a ModelSpec (with edit_module_path), a path template such as "
        f"'model.layers.{{}}.mlp.down_proj', or a dict layer -> path; got {type(spec_or_paths).__name__}"
    )


def _get_module(model: nn.Module, path: str, layer: int) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise UnsupportedArchitectureError(
            f"layer {layer}: the model has no module {path!r} ({type(model).__name__}); check the "
            "module path template and the layer indices"
        ) from exc


def second_moments(
    model: nn.Module,
    tokenizer,
    spec_or_paths,
    layers: Iterable[int],
    *,
    corpus="enwiki_sample",
    n_tokens: int = 100_000,
    max_length: int = 512,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    resume: bool = True,
    progress: bool = True,
    distributed: bool | None = None,
    batch_size: int = 8,
    overflow: str = "split",
    checkpoint_every: float = 0.2,
) -> dict[int, torch.Tensor]:
    """The uncentred second moment ``E[k kᵀ]`` of each edited layer's keys, cached on disk.

    Parameters
    ----------
    model, tokenizer
        A transformers causal LM and its tokenizer.
    spec_or_paths
        A :class:`~rlsedit_llm.models.ModelSpec` (its ``edit_module_path``), a path template with
        ``{}`` for the layer (``"model.layers.{}.mlp.down_proj"``), or a dict layer -> path.
    layers : iterable of int
        Edited layers (at least one).
    corpus : str, path, datasets.Dataset or sequence of str
        A source for :func:`~rlsedit_llm.corpus.load_corpus` (versioned by
        :func:`~rlsedit_llm.corpus.corpus_fingerprint`), or the documents themselves (versioned
        by a SHA-256 over every text, so prefer a source for large corpora).
    n_tokens : int
        Tokens summed (exactly).
    max_length : int
        Sequence length; longer documents are split (``overflow="split"``) or truncated.
    dtype : torch.float32 (default) or torch.float64
        Dtype of the stored and returned mean; sums are always float64.
    cache_dir : path or None
        Folder of the cache files (default :func:`default_stats_dir`).
    resume : bool
        Continue from a checkpoint of an interrupted run with the same key.
    progress : bool
        Show a tqdm bar (rank 0 only).
    distributed : bool or None
        ``None``: shard across ranks when ``torch.distributed`` is initialised. ``True``: shard,
        initialising the process group from the launcher's environment if needed (NCCL for a
        CUDA model, else gloo). ``False``: every process computes everything.
    batch_size : int
        Sequences per forward pass (changes rounding only, not the key).
    overflow : "split" or "truncate"
        Handling of documents longer than ``max_length`` (part of the key).
    checkpoint_every : float in (0, 1)
        Fraction of the tokens between checkpoints of the partial sums.

    Returns
    -------
    dict[int, Tensor]
        Layer -> ``E[k kᵀ]`` of shape ``(d_k, d_k)`` in ``dtype`` on the module's device.

    Raises
    ------
    HyperparameterError
        No layers, bad sizes or dtype, bad ``spec_or_paths``.
    CorpusError
        Unreadable corpus, or fewer than ``n_tokens`` tokens.
    UnsupportedArchitectureError
        A module path that does not exist, or a module that is not Linear/Conv1D.
    """
    layers = sorted({int(layer) for layer in layers})
    if not layers:
        raise HyperparameterError("no layers given: pass at least one edited layer")
    if dtype not in _STORED_DTYPES:
        raise HyperparameterError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    _check_positive_int("n_tokens", n_tokens)
    _check_positive_int("max_length", max_length)
    _check_positive_int("batch_size", batch_size)
    if overflow not in _OVERFLOW:
        raise HyperparameterError(f"overflow must be one of {_OVERFLOW}, got {overflow!r}")
    paths = _module_paths(spec_or_paths, layers)
    modules = {layer: _get_module(model, path, layer) for layer, path in paths.items()}
    modules = _check_modules(modules)
    widths = {layer: _input_width(m, layer) for layer, m in modules.items()}
    rank, world, coll_device = _dist_setup(distributed, model)
    root = Path(cache_dir) if cache_dir is not None else default_stats_dir()

    # ---- cache keys -------------------------------------------------------------------------
    t0 = time.perf_counter()
    if isinstance(corpus, (str, os.PathLike)):
        corpus_fp = corpus_fingerprint(corpus)
        corpus_name = os.fspath(corpus)
    else:
        corpus_fp = _texts_fingerprint(corpus)
        corpus_name = "<in-memory corpus>"
    model_fp = model_fingerprint(model)
    common = {
        "format": _FORMAT,
        "model": model_fp,
        "tokenizer": _tokenizer_fingerprint(tokenizer),
        "corpus": corpus_fp,
        "n_tokens": n_tokens,
        "max_length": max_length,
        "overflow": overflow,
        "dtype": _STORED_DTYPES[dtype],
    }
    keys = {}
    for layer in layers:
        fields = json.dumps(dict(common, layer=layer, module=paths[layer]), sort_keys=True)
        keys[layer] = hashlib.sha256(fields.encode()).hexdigest()
    folder = root / model_fp.split(":")[1][:16]
    logger.debug("stats keys computed in %.2f s", time.perf_counter() - t0)

    # ---- cache lookup (in distributed runs a layer counts as cached only if every rank has it)
    means: dict[int, torch.Tensor] = {}
    for layer in layers:
        entry = _read_entry(folder / keys[layer], keys[layer])
        if entry is None:
            continue
        tensors, meta = entry
        mean = tensors.get("mean")
        ok = (
            mean is not None
            and tuple(mean.shape) == (widths[layer], widths[layer])
            and mean.dtype == dtype
            and meta.get("count") == n_tokens
            and bool(torch.isfinite(mean).all())
        )
        if ok:
            means[layer] = mean
        else:
            logger.warning("ignoring cache entry %s: wrong shape, dtype, count or values", folder / keys[layer])
    if world > 1:
        hits = torch.tensor([1 if layer in means else 0 for layer in layers], dtype=torch.int64)
        import torch.distributed as dist

        buf = hits.to(coll_device)
        dist.all_reduce(buf, op=dist.ReduceOp.MIN)
        means = {layer: means[layer] for layer, hit in zip(layers, buf.cpu().tolist()) if hit}
    missing = [layer for layer in layers if layer not in means]
    for layer in layers:
        if layer in means:
            logger.info("key statistics cache hit: layer %d (%s, %s)", layer, paths[layer], folder / keys[layer])
    if missing:
        logger.info(
            "key statistics cache miss: layers %s; computing over %d tokens of %s", missing, n_tokens, corpus_name
        )
        sums = _compute_missing(
            model, tokenizer, {layer: modules[layer] for layer in missing}, corpus,
            keys={layer: keys[layer] for layer in missing}, paths=paths, common=common, folder=folder,
            n_tokens=n_tokens, max_length=max_length, overflow=overflow, batch_size=batch_size,
            resume=resume, progress=progress, checkpoint_every=checkpoint_every,
            rank=rank, world=world, coll_device=coll_device,
        )
        for layer in missing:
            means[layer] = sums[layer].mean().to(dtype)
    return {layer: means[layer].to(_module_device(modules[layer])) for layer in layers}


def _compute_missing(
    model, tokenizer, modules, corpus, *, keys, paths, common, folder, n_tokens, max_length, overflow,
    batch_size, resume, progress, checkpoint_every, rank, world, coll_device,
) -> dict[int, MomentSum]:
    """One pass (sharded over ranks) for the missing layers, with checkpoints; rank 0 writes."""
    started = time.perf_counter()
    texts = load_corpus(corpus) if isinstance(corpus, (str, os.PathLike)) else corpus
    plan = _plan_sequences(
        tokenizer, texts, max_tokens=n_tokens, max_length=max_length, overflow=overflow,
        checkpoint_every=checkpoint_every,
    )
    run_key = hashlib.sha256(json.dumps(sorted(keys.items())).encode()).hexdigest()
    ckpt_stem = folder / f"{run_key}-partial"
    prefix = {layer: f"layer{layer}." for layer in modules}

    # ---- resume from a checkpoint (read by rank 0; its position is broadcast) -----------------
    start: dict[int, MomentSum] | None = None
    position = 0
    if resume and rank == 0:
        entry = _read_entry(ckpt_stem, run_key)
        if entry is not None:
            tensors, meta = entry
            try:
                pos = int(meta["position"])
                loaded = {l: MomentSum.from_tensors(tensors, prefix[l]) for l in modules}
                expected = plan.tokens_before(pos)
                if not (0 < pos < len(plan.seqs) and all(s.count == expected for s in loaded.values())):
                    raise ValueError("its position and token counts do not match this run's token stream")
                for l, s in loaded.items():
                    if s.total.dtype != torch.float64 or s.d_k != _input_width(modules[l], l):
                        raise ValueError(f"layer {l}: wrong dtype or width")
                start, position = loaded, pos
                logger.info(
                    "resuming key statistics from checkpoint %s at sequence %d/%d", ckpt_stem, pos, len(plan.seqs)
                )
            except (KeyError, ValueError, ShapeError, HyperparameterError) as exc:
                logger.warning("ignoring checkpoint %s: %s", ckpt_stem, exc)
    if world > 1:
        import torch.distributed as dist

        buf = torch.tensor([position], dtype=torch.int64).to(coll_device)
        dist.broadcast(buf, src=0)
        position = int(buf.item())

    def on_checkpoint(pos: int, sums: dict[int, MomentSum]) -> None:
        combined = _all_reduce_sums(sums, coll_device) if world > 1 else sums
        if rank != 0:
            return
        tensors = {}
        for layer, s in combined.items():
            tensors.update(s.to_tensors(prefix[layer]))
        meta = {"key": run_key, "position": pos, "tokens": plan.tokens_before(pos), "layers": sorted(combined)}
        _write_entry(ckpt_stem, tensors, meta)
        logger.info("key statistics checkpoint at sequence %d/%d (%s)", pos, len(plan.seqs), ckpt_stem)

    sums = _accumulate(
        model, modules, plan, batch_size=batch_size, dtype=torch.float64, progress=progress,
        start=start, skip_sequences=position, shard=(rank, world), on_checkpoint=on_checkpoint,
    )
    if world > 1:
        sums = _all_reduce_sums(sums, coll_device)
    for layer, s in sums.items():
        if s.count != n_tokens:  # a bug guard: the plan holds exactly n_tokens tokens
            raise RuntimeError(f"layer {layer}: summed {s.count} tokens, expected {n_tokens}")
    elapsed = time.perf_counter() - started
    if rank == 0:
        for layer, s in sums.items():
            mean = s.mean().to(getattr(torch, common["dtype"]))
            meta = dict(
                common, key=keys[layer], layer=layer, module=paths[layer], count=s.count,
                seconds=round(elapsed, 3), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            )
            _write_entry(folder / keys[layer], {"mean": mean.detach().cpu().contiguous()}, meta)
        for suffix in (".safetensors", ".json"):
            try:
                ckpt_stem.with_suffix(suffix).unlink()
            except FileNotFoundError:
                pass
        logger.info(
            "key statistics: %d tokens, layers %s in %.1f s (%.0f tokens/s); cached in %s",
            n_tokens, sorted(sums), elapsed, n_tokens / max(elapsed, 1e-9), folder,
        )
    return sums
