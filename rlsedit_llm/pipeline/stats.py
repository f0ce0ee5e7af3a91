"""Key statistics: the uncentred second moment E[k kᵀ] of each edited module's input.

For every edited module (the MLP down-projection of a layer) the key ``k`` is the module's input
at one token, ``d_k`` wide. Over a text corpus the statistic is

    Σ = (1/n) Σ_tokens k kᵀ        (d_k, d_k), uncentred, padding excluded,

the ``E[kkᵀ]`` that MEMIT, AlphaEdit and RLSEdit use as the preservation metric (the anchor Gram
is ``N·Σ``). This module computes it for all edited layers in one pass over the corpus and
caches it; the parts live in modules of their own:

* the token stream (exactly ``n_tokens`` tokens, documents split or truncated at ``max_length``):
  :mod:`~rlsedit_llm.pipeline.token_stream`. ``overflow="split"`` (default) keeps every window
  of a long document; ``"truncate"`` is MEMIT's rule, which needs a corpus of many documents
  (the shipped 97-article sample holds about 50k tokens that way, but about 500k split);
* the hooked forward pass, stopped above the last edited module:
  :mod:`~rlsedit_llm.pipeline.moment_pass`, summing into :class:`~rlsedit_llm.pipeline.moments.MomentSum`;
* the verified, atomically written cache files: :mod:`~rlsedit_llm.pipeline.stats_cache`;
* the reduction across ranks: :mod:`~rlsedit_llm.pipeline.distributed`.

Caching and resumption
----------------------
:func:`second_moments` caches each layer's mean in ``<cache_dir>/`` (default
``$XDG_CACHE_HOME/rlsedit/stats`` or ``~/.cache/rlsedit/stats``). A file is used only if its
sidecar names the same key and its bytes hash to the recorded digest, and the tensor has the
right shape, dtype and finite values; anything else is ignored, logged and rebuilt. The key
covers the model weights (:func:`~rlsedit_llm.adapters.fingerprint.model_fingerprint`), the
tokenizer, the corpus (:func:`~rlsedit_llm.pipeline.corpus.corpus_fingerprint`), the token
count, ``max_length``, ``overflow``, the stored dtype, the layer and its module path.

While computing, the float64 partial sums are checkpointed every ``checkpoint_every`` of the
tokens (default 20 %) with the number of sequences consumed, when at least
``checkpoint_min_seconds`` (default 60 s) of the pass have run since the last write; a rerun
with ``resume=True`` continues from the last checkpoint and gives the same result as one
uninterrupted pass. The time threshold matters at 8B widths, where one write is several GB of
float64 sums and costs more than a short pass; skipping a write changes nothing but what a resume
can reuse (batches never straddle a checkpoint position, written or not).

Distributed
-----------
Under ``torch.distributed`` (``torchrun``, ``accelerate launch``) each rank runs the sequences
``rank::world_size`` of the same token stream; the float64 sums and token counts are
all-reduced (SUM), so every rank returns the one-pass statistic. Only rank 0 writes files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from rlsedit_llm.adapters.fingerprint import model_fingerprint, tokenizer_fingerprint
from rlsedit_llm.adapters.spec import get_module, needs_bos
from rlsedit_llm.errors import HyperparameterError, ShapeError
from rlsedit_llm.pipeline.corpus import corpus_fingerprint, load_corpus, texts_fingerprint
from rlsedit_llm.pipeline.distributed import all_have, all_reduce_sums, broadcast_int
from rlsedit_llm.pipeline.distributed import setup as dist_setup
from rlsedit_llm.pipeline.moment_pass import accumulate, check_modules, input_width, module_device
from rlsedit_llm.pipeline.moments import MomentSum
from rlsedit_llm.pipeline.stats_cache import FORMAT, default_stats_dir, read_entry, write_entry
from rlsedit_llm.pipeline.token_stream import OVERFLOW, plan_sequences

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from rlsedit_llm.adapters.spec import ModelSpec

__all__ = [
    "MomentSum",  # re-exported from pipeline.moments
    "accumulate_second_moments",
    "second_moments",
    "model_fingerprint",  # re-exported from adapters.fingerprint
    "default_stats_dir",  # re-exported from pipeline.stats_cache
]

logger = logging.getLogger(__name__)

_STORED_DTYPES = {torch.float32: "float32", torch.float64: "float64"}


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HyperparameterError(f"{name} must be a positive integer, got {value!r}")
    return value


def accumulate_second_moments(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    modules: Mapping[int, nn.Module],
    texts: datasets.Dataset | Iterable[str],
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
        Show a tqdm bar (``TQDM_DISABLE`` set in the environment switches it off too).
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
    modules = check_modules(modules)
    _check_positive_int("max_tokens", max_tokens)
    _check_positive_int("max_length", max_length)
    _check_positive_int("batch_size", batch_size)
    if dtype not in _STORED_DTYPES:
        raise HyperparameterError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if isinstance(skip_sequences, bool) or not isinstance(skip_sequences, int) or skip_sequences < 0:
        raise HyperparameterError(f"skip_sequences must be an integer >= 0, got {skip_sequences!r}")
    plan = plan_sequences(
        tokenizer, texts, max_tokens=max_tokens, max_length=max_length, overflow=overflow, checkpoint_every=None
    )
    if skip_sequences > len(plan.seqs):
        raise HyperparameterError(f"skip_sequences={skip_sequences} exceeds the {len(plan.seqs)} sequences")
    return accumulate(
        model, modules, plan, batch_size=batch_size, dtype=dtype, progress=progress,
        start=start, skip_sequences=skip_sequences,
    )


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



def second_moments(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, spec_or_paths: ModelSpec | str | Mapping[int, str],
    layers: Iterable[int], *, corpus: str | os.PathLike[str] | datasets.Dataset | Sequence[str] = "enwiki_sample",
    n_tokens: int = 100_000, max_length: int = 512, dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None, resume: bool = True, progress: bool = True,
    distributed: bool | None = None, batch_size: int = 8, overflow: str = "split",
    checkpoint_every: float = 0.2, checkpoint_min_seconds: float = 60.0,
) -> dict[int, torch.Tensor]:
    """The uncentred second moment ``E[k kᵀ]`` of each edited layer's keys, cached on disk (the
    module docstring describes the cache, its checkpoints and distributed runs).

    Parameters
    ----------
    model, tokenizer
        A transformers causal LM and its tokenizer.
    spec_or_paths
        A :class:`~rlsedit_llm.adapters.spec.ModelSpec` (its ``edit_module_path``), a path template with
        ``{}`` for the layer (``"model.layers.{}.mlp.down_proj"``), or a dict layer -> path.
    layers : iterable of int
        Edited layers (at least one).
    corpus : str, path, datasets.Dataset or sequence of str
        A source for :func:`~rlsedit_llm.pipeline.corpus.load_corpus` (versioned by
        :func:`~rlsedit_llm.pipeline.corpus.corpus_fingerprint`), or the documents themselves (versioned
        by a SHA-256 over every text, so prefer a source for large corpora).
    n_tokens, max_length, batch_size : int
        Tokens summed (exactly); the sequence length (longer documents are handled per ``overflow``);
        sequences per forward pass (changes rounding only, not the key).
    dtype : torch.float32 (default) or torch.float64
        Dtype of the stored and returned mean; sums are always float64.
    cache_dir, resume, progress
        Folder of the cache files (default :func:`default_stats_dir`); continue from a checkpoint of
        an interrupted run with the same key; show a tqdm bar (rank 0 only; ``TQDM_DISABLE`` set in
        the environment switches it off too).
    distributed : bool or None
        ``None``: shard across ranks when ``torch.distributed`` is initialised. ``True``: shard,
        initialising the process group from the launcher's environment if needed (NCCL for a
        CUDA model, else gloo). ``False``: every process computes everything.
    overflow : "split" or "truncate"
        Handling of documents longer than ``max_length`` (part of the key).
    checkpoint_every, checkpoint_min_seconds : float
        Fraction of the tokens, in (0, 1), between checkpoints of the partial sums; the least
        time in seconds since the last write (or the start) for a checkpoint to be written.

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
    layers = _check_settings(layers, dtype=dtype, checkpoint_min_seconds=checkpoint_min_seconds, n_tokens=n_tokens,
                             max_length=max_length, batch_size=batch_size, overflow=overflow)
    paths = _module_paths(spec_or_paths, layers)
    modules = check_modules({layer: get_module(model, path) for layer, path in paths.items()})
    widths = {layer: input_width(m, layer) for layer, m in modules.items()}
    rank, world, coll_device = dist_setup(distributed, model)
    root = Path(cache_dir) if cache_dir is not None else default_stats_dir()
    common, keys, folder = _cache_keys(model, tokenizer, corpus, paths, root, n_tokens=n_tokens,
                                       max_length=max_length, overflow=overflow, dtype=dtype)
    means = _cached_means(folder, keys, widths, paths, dtype=dtype, n_tokens=n_tokens, world=world,
                          coll_device=coll_device)
    missing = [layer for layer in layers if layer not in means]
    if missing:
        logger.info("key statistics cache miss: layers %s; computing over %d tokens of %s", missing, n_tokens,
                    os.fspath(corpus) if isinstance(corpus, (str, os.PathLike)) else "<in-memory corpus>")
        sums = _compute_missing(
            model, tokenizer, {layer: modules[layer] for layer in missing}, corpus,
            keys={layer: keys[layer] for layer in missing}, paths=paths, common=common, folder=folder,
            n_tokens=n_tokens, max_length=max_length, overflow=overflow, batch_size=batch_size, resume=resume,
            progress=progress, checkpoint_every=checkpoint_every, checkpoint_min_seconds=checkpoint_min_seconds,
            rank=rank, world=world, coll_device=coll_device,
        )
        for layer in missing:
            means[layer] = sums[layer].mean().to(dtype)
    return {layer: means[layer].to(module_device(modules[layer])) for layer in layers}


def _check_settings(
    layers: Iterable[int], *, dtype, checkpoint_min_seconds, n_tokens, max_length, batch_size, overflow,
) -> list[int]:
    """The edited layers, sorted and distinct; :class:`HyperparameterError` for none or a bad
    setting of :func:`second_moments`."""
    layers = sorted({int(layer) for layer in layers})
    if not layers:
        raise HyperparameterError("no layers given: pass at least one edited layer")
    if dtype not in _STORED_DTYPES:
        raise HyperparameterError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if not (isinstance(checkpoint_min_seconds, (int, float)) and checkpoint_min_seconds >= 0):
        raise HyperparameterError(f"checkpoint_min_seconds must be a number >= 0, got {checkpoint_min_seconds!r}")
    _check_positive_int("n_tokens", n_tokens)
    _check_positive_int("max_length", max_length)
    _check_positive_int("batch_size", batch_size)
    if overflow not in OVERFLOW:
        raise HyperparameterError(f"overflow must be one of {OVERFLOW}, got {overflow!r}")
    return layers


def _cache_keys(model, tokenizer, corpus, paths: dict[int, str], root: Path, *, n_tokens, max_length, overflow,
                dtype) -> tuple[dict, dict[int, str], Path]:
    """The key fields shared by every layer (format, model, tokenizer, corpus and stream), each
    layer's cache key (a SHA-256 of those fields, the layer and its module path) and the model's
    cache folder under ``root``."""
    t0 = time.perf_counter()
    if isinstance(corpus, (str, os.PathLike)):
        corpus_fp = corpus_fingerprint(corpus)
    else:
        corpus_fp = texts_fingerprint(corpus)
    model_fp = model_fingerprint(model)
    common = {
        "format": FORMAT,
        "model": model_fp,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "corpus": corpus_fp,
        "n_tokens": n_tokens,
        "max_length": max_length,
        "overflow": overflow,
        "dtype": _STORED_DTYPES[dtype],
        # Sequences start with BOS for the families that need it (the key is unchanged for the others).
        **({"bos": True} if needs_bos(model) else {}),
    }
    keys = {}
    for layer, path in paths.items():
        fields = json.dumps(dict(common, layer=layer, module=path), sort_keys=True)
        keys[layer] = hashlib.sha256(fields.encode()).hexdigest()
    folder = root / model_fp.split(":")[1][:16]
    logger.debug("stats keys computed in %.2f s", time.perf_counter() - t0)
    return common, keys, folder


def _cached_means(
    folder: Path, keys: dict[int, str], widths: dict[int, int], paths: dict[int, str], *, dtype, n_tokens, world,
    coll_device,
) -> dict[int, torch.Tensor]:
    """The layers' means found in the cache with the right shape, dtype, count and values (a
    wrong entry is logged and ignored); in distributed runs a layer counts as cached only if
    every rank has it."""
    means: dict[int, torch.Tensor] = {}
    for layer, key in keys.items():
        entry = read_entry(folder / key, key)
        if entry is None:
            continue
        tensors, meta = entry
        mean = tensors.get("mean")
        if (
            mean is not None
            and tuple(mean.shape) == (widths[layer], widths[layer])
            and mean.dtype == dtype
            and meta.get("count") == n_tokens
            and bool(torch.isfinite(mean).all())
        ):
            means[layer] = mean
        else:
            logger.warning("ignoring cache entry %s: wrong shape, dtype, count or values", folder / key)
    if world > 1:
        hits = all_have([layer in means for layer in keys], coll_device)
        means = {layer: means[layer] for layer, hit in zip(keys, hits, strict=True) if hit}
    for layer in keys:
        if layer in means:
            logger.info("key statistics cache hit: layer %d (%s, %s)", layer, paths[layer], folder / keys[layer])
    return means


def _compute_missing(
    model, tokenizer, modules, corpus, *, keys, paths, common, folder, n_tokens, max_length, overflow,
    batch_size, resume, progress, checkpoint_every, checkpoint_min_seconds, rank, world, coll_device,
) -> dict[int, MomentSum]:
    """One pass (sharded over ranks) for the missing layers, with checkpoints; rank 0 writes."""
    started = time.perf_counter()
    texts = load_corpus(corpus) if isinstance(corpus, (str, os.PathLike)) else corpus
    plan = plan_sequences(
        tokenizer, texts, max_tokens=n_tokens, max_length=max_length, overflow=overflow,
        checkpoint_every=checkpoint_every,
    )
    run_key = hashlib.sha256(json.dumps(sorted(keys.items())).encode()).hexdigest()
    ckpt_stem = folder / f"{run_key}-partial"
    prefix = {layer: f"layer{layer}." for layer in modules}
    # Resume from a checkpoint: read by rank 0, its position broadcast.
    start, position = _read_checkpoint(ckpt_stem, run_key, plan, modules, prefix) if resume and rank == 0 else (None, 0)
    if world > 1:
        position = broadcast_int(position, coll_device)
    on_checkpoint = _checkpoint_writer(
        ckpt_stem, run_key, plan, prefix, min_seconds=checkpoint_min_seconds, rank=rank, world=world,
        coll_device=coll_device,
    )
    sums = accumulate(
        model, modules, plan, batch_size=batch_size, dtype=torch.float64, progress=progress,
        start=start, skip_sequences=position, shard=(rank, world), on_checkpoint=on_checkpoint,
    )
    if world > 1:
        sums = all_reduce_sums(sums, coll_device)
    for layer, s in sums.items():
        if s.count != n_tokens:  # a bug guard: the plan holds exactly n_tokens tokens
            raise RuntimeError(f"layer {layer}: summed {s.count} tokens, expected {n_tokens}")
    elapsed = time.perf_counter() - started
    if rank == 0:
        _write_means(sums, keys=keys, paths=paths, common=common, folder=folder, elapsed=elapsed)
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


def _read_checkpoint(ckpt_stem: Path, run_key: str, plan, modules, prefix) -> tuple[dict[int, MomentSum] | None, int]:
    """The partial sums and sequence position of a checkpoint of this run, or ``(None, 0)`` if
    there is none or it does not fit this run's token stream (logged)."""
    entry = read_entry(ckpt_stem, run_key)
    if entry is None:
        return None, 0
    tensors, meta = entry
    try:
        pos = int(meta["position"])
        loaded = {l: MomentSum.from_tensors(tensors, prefix[l]) for l in modules}
        expected = plan.tokens_before(pos)
        if not (0 < pos < len(plan.seqs) and all(s.count == expected for s in loaded.values())):
            raise ValueError("its position and token counts do not match this run's token stream")
        for l, s in loaded.items():
            if s.total.dtype != torch.float64 or s.d_k != input_width(modules[l], l):
                raise ValueError(f"layer {l}: wrong dtype or width")
    except (KeyError, ValueError, ShapeError, HyperparameterError) as exc:
        logger.warning("ignoring checkpoint %s: %s", ckpt_stem, exc)
        return None, 0
    logger.info("resuming key statistics from checkpoint %s at sequence %d/%d", ckpt_stem, pos, len(plan.seqs))
    return loaded, pos


def _checkpoint_writer(ckpt_stem: Path, run_key: str, plan, prefix, *, min_seconds, rank, world, coll_device):
    """The ``on_checkpoint(position, sums)`` of a pass: when ``min_seconds`` have run since the
    last write (rank 0's clock), reduce the sums over ranks and let rank 0 write them."""
    last_write = [time.perf_counter()]

    def on_checkpoint(pos: int, sums: dict[int, MomentSum]) -> None:
        # Every rank takes the same decision (rank 0's clock) before the collective.
        due = time.perf_counter() - last_write[0] >= min_seconds
        if world > 1:
            due = bool(broadcast_int(int(due), coll_device))
        if not due:
            return
        combined = all_reduce_sums(sums, coll_device) if world > 1 else sums
        if rank != 0:
            return
        tensors = {}
        for layer, s in combined.items():
            tensors.update(s.to_tensors(prefix[layer]))
        meta = {"key": run_key, "position": pos, "tokens": plan.tokens_before(pos), "layers": sorted(combined)}
        write_entry(ckpt_stem, tensors, meta)
        last_write[0] = time.perf_counter()  # the interval excludes the write itself
        logger.info("key statistics checkpoint at sequence %d/%d (%s)", pos, len(plan.seqs), ckpt_stem)

    return on_checkpoint


def _write_means(sums: dict[int, MomentSum], *, keys, paths, common, folder: Path, elapsed: float) -> None:
    """Cache each layer's mean (in the stored dtype) with its key fields and provenance."""
    for layer, s in sums.items():
        mean = s.mean().to(getattr(torch, common["dtype"]))
        meta = dict(
            common, key=keys[layer], layer=layer, module=paths[layer], count=s.count,
            seconds=round(elapsed, 3), created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        write_entry(folder / keys[layer], {"mean": mean.detach().cpu().contiguous()}, meta)
