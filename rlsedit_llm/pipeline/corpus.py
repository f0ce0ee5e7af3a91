"""Text corpora for the key statistics E[k kᵀ].

One entry point, :func:`load_corpus`, turns a *source* into a :class:`datasets.Dataset` with a
``"text"`` column (one row per document), and :func:`corpus_fingerprint` gives the string that
versions that source inside cache keys.

A source is one of:

* ``"enwiki_sample"``: the Wikipedia sample shipped in ``rlsedit_llm/data/`` (97 articles, one
  row per article, CC BY-SA 3.0, see ``rlsedit_llm/data/README.md``);
* a local file or directory: ``.txt``, ``.json``, ``.jsonl``, ``.parquet`` (a directory holds
  files of one of those kinds, read in sorted order);
* any other string: a Hugging Face Hub dataset name (needs network access, or a dataset already in
  the local Hugging Face cache; offline it raises :class:`CorpusError`).

How a ``.txt`` file is cut into documents (the first rule that applies):

1. lines of the form ``= Title =`` (a single ``=`` on each side, as in the shipped sample and in
   WikiText) start a new article; the title line itself is not part of the text;
2. otherwise, blank lines separate documents (paragraphs);
3. otherwise, every non-empty line is a document.

Empty and whitespace-only ``.txt`` documents are dropped. Rows of json/parquet/hub corpora are
kept as they are (an empty text simply contributes no tokens to the statistics).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
from collections.abc import Iterable
from pathlib import Path

import datasets

from rlsedit_llm.errors import CorpusError
from rlsedit_llm.files import DATA_DIR as _DATA_DIR

__all__ = [
    "SHIPPED_CORPORA", "load_corpus", "corpus_fingerprint", "split_txt_documents", "iter_texts", "texts_fingerprint",
]

logger = logging.getLogger(__name__)

#: Names of the corpora shipped with the package -> file under ``rlsedit_llm/data/``.
SHIPPED_CORPORA = {"enwiki_sample": "enwiki_sample.txt"}

_BUILDER_BY_SUFFIX = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}

# "= Title =" with a single "=" on each side ("= = Section = =" and "== Section ==" do not match).
_TITLE_RE = re.compile(r"^= ([^=\s]|[^=\s].*[^=\s]) =$")
_FINGERPRINT_VERSION = "rlsedit-corpus-v1"


# --------------------------------------------------------------------------------------------
# Plain-text documents
# --------------------------------------------------------------------------------------------
def split_txt_documents(text: str) -> list[tuple[str, str]]:
    """Cut the contents of a ``.txt`` file into ``(title, text)`` documents.

    See the module docstring for the three rules. ``title`` is ``""`` when the file has no
    ``= Title =`` lines. Whitespace-only documents are dropped; the order is the file's order.
    """
    lines = text.splitlines()
    titles = [i for i, line in enumerate(lines) if _TITLE_RE.match(line.strip())]
    docs: list[tuple[str, str]] = []
    if titles:
        bounds = titles + [len(lines)]
        for start, stop in itertools.pairwise(bounds):
            title = lines[start].strip()[1:-1].strip()
            body = "\n".join(lines[start + 1 : stop]).strip()
            docs.append((title, body))
    elif any(not line.strip() for line in lines):
        docs = [("", block.strip()) for block in re.split(r"\n\s*\n", text)]
    else:
        docs = [("", line.strip()) for line in lines]
    return [(t, d) for t, d in docs if d]


def _txt_dataset(files: list[Path]) -> datasets.Dataset:
    titles: list[str] = []
    texts: list[str] = []
    for path in files:
        try:
            content = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CorpusError(f"cannot read corpus file {path}: {exc}") from exc
        for title, body in split_txt_documents(content):
            titles.append(title)
            texts.append(body)
    return datasets.Dataset.from_dict({"title": titles, "text": texts})


# --------------------------------------------------------------------------------------------
# Resolving a source
# --------------------------------------------------------------------------------------------
def _looks_like_path(source: str) -> bool:
    return (
        Path(source).suffix.lower() in _BUILDER_BY_SUFFIX
        or source.startswith(("/", "./", "../", "~"))
        or os.sep in source and Path(source).expanduser().exists()
    )


def _resolve(source: str | os.PathLike) -> tuple[str, list[Path], str]:
    """``(kind, files, name)``: ``("shipped", [Path], name) | ("local", [Path, ...], source) |
    ("hub", [], name)``."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source:
        raise CorpusError(f"a corpus source must be a non-empty string or path, got {source!r}")
    if source in SHIPPED_CORPORA:
        return "shipped", [_DATA_DIR / SHIPPED_CORPORA[source]], source
    path = Path(source).expanduser()
    if path.exists():
        if path.is_dir():
            files = sorted(
                p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _BUILDER_BY_SUFFIX
            )
            if not files:
                raise CorpusError(
                    f"corpus directory {path} holds no .txt/.json/.jsonl/.parquet file"
                )
            kinds = {_BUILDER_BY_SUFFIX[p.suffix.lower()] for p in files}
            if len(kinds) > 1:
                raise CorpusError(
                    f"corpus directory {path} mixes file kinds {sorted(kinds)}; keep one kind"
                )
            return "local", files, source
        if path.suffix.lower() not in _BUILDER_BY_SUFFIX:
            raise CorpusError(
                f"unsupported corpus file {path}: use .txt, .json, .jsonl or .parquet"
            )
        return "local", [path], source
    if _looks_like_path(source):
        raise CorpusError(f"corpus file or directory {source!r} does not exist")
    return "hub", [], source


def _select_text(ds: datasets.Dataset, text_field: str, where: str) -> datasets.Dataset:
    if text_field not in ds.column_names:
        raise CorpusError(
            f"{where} has no column {text_field!r} (columns: {ds.column_names}); "
            "pass text_field= naming the column that holds the text"
        )
    ds = ds.select_columns([text_field])
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    return ds


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
def load_corpus(
    source: str | os.PathLike = "enwiki_sample",
    *,
    split: str = "train",
    text_field: str = "text",
    config: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.Dataset:
    """Load a text corpus as a :class:`datasets.Dataset` with a ``"text"`` column.

    Parameters
    ----------
    source : str or path
        ``"enwiki_sample"`` (shipped), a local ``.txt``/``.json``/``.jsonl``/``.parquet`` file or a
        directory of such files, or a Hugging Face Hub dataset name.
    split : str
        Split to read. Local and shipped corpora have the single split ``"train"``; json/parquet
        files and hub datasets accept ``datasets`` slicing such as ``"train[:1000]"``.
    text_field : str
        Column holding the text (json/jsonl/parquet/hub). Renamed to ``"text"``.
    config, revision : str or None
        Hub dataset configuration name and revision (a commit hash pins the data).
    cache_dir : path or None
        ``datasets`` cache directory for json/parquet/hub loads (default: the ``datasets``
        default). ``.txt`` corpora are parsed in memory and write nothing.

    Returns
    -------
    datasets.Dataset
        One row per document, documents in source order; ``.txt`` corpora also have a
        ``"title"`` column (empty ``.txt`` documents are dropped).

    Raises
    ------
    CorpusError
        Missing or unreadable file, unsupported file kind, missing or non-string text column, no
        document, or a hub dataset that cannot be reached (offline).
    """
    kind, files, where = _resolve(source)
    cache = None if cache_dir is None else os.fspath(cache_dir)
    if kind in ("shipped", "local") and (
        kind == "shipped" or _BUILDER_BY_SUFFIX[files[0].suffix.lower()] == "text"
    ):
        if split != "train":
            raise CorpusError(f"corpus {source!r} has the single split 'train', not {split!r}")
        ds = _txt_dataset(files)
    elif kind == "local":
        builder = _BUILDER_BY_SUFFIX[files[0].suffix.lower()]
        try:
            ds = datasets.load_dataset(
                builder, data_files=[os.fspath(p) for p in files], split=split, cache_dir=cache
            )
        except Exception as exc:  # datasets raises many kinds for malformed files
            raise CorpusError(f"cannot load corpus {source!r} with datasets: {exc}") from exc
        ds = _select_text(ds, text_field, f"corpus {source!r}")
    else:
        try:
            ds = datasets.load_dataset(
                where, config, split=split, revision=revision, cache_dir=cache
            )
        except Exception as exc:  # ConnectionError offline, DatasetNotFoundError, ...
            raise CorpusError(
                f"cannot load the Hugging Face Hub dataset {where!r} (config={config!r}, "
                f"split={split!r}): {type(exc).__name__}: {exc}. Without network access use a "
                "local .txt/.json/.jsonl/.parquet file or directory, or the shipped "
                "'enwiki_sample'"
            ) from exc
        if not isinstance(ds, datasets.Dataset):
            raise CorpusError(f"hub dataset {where!r} split {split!r} is not a single Dataset")
        ds = _select_text(ds, text_field, f"hub dataset {where!r}")
    if "text" in ds.column_names and len(ds) > 0 and not isinstance(ds[0]["text"], str):
        raise CorpusError(f"column {text_field!r} of corpus {source!r} does not hold strings")
    if len(ds) == 0:
        raise CorpusError(f"corpus {source!r} holds no document")
    logger.info("loaded corpus %r: %d documents", os.fspath(source), len(ds))
    return ds


def corpus_fingerprint(
    source: str | os.PathLike = "enwiki_sample",
    *,
    split: str = "train",
    text_field: str = "text",
    config: str | None = None,
    revision: str | None = None,
) -> str:
    """A string that changes whenever the documents :func:`load_corpus` would return change.

    Local and shipped corpora: SHA-256 over the bytes of every file (with its name, for
    directories), the split and the text field. Hub datasets: SHA-256 of the dataset name,
    config, split, text field and ``revision``; without a revision the data is not pinned (a
    warning is logged) and a later upstream change would not change the fingerprint.

    Returns ``"sha256:<64 hex digits>"``. Raises :class:`CorpusError` for a missing file.
    """
    kind, files, where = _resolve(source)
    h = hashlib.sha256()
    head: dict[str, object] = {"v": _FINGERPRINT_VERSION, "kind": kind, "split": split, "text_field": text_field}
    if kind == "hub":
        if revision is None:
            logger.warning(
                "hub dataset %r has no pinned revision: its fingerprint names it only; pass "
                "revision=<commit> so cached statistics are versioned",
                where,
            )
        head.update(name=where, config=config, revision=revision or "unpinned")
        h.update(json.dumps(head, sort_keys=True).encode())
        return "sha256:" + h.hexdigest()
    h.update(json.dumps(head, sort_keys=True).encode())
    for path in files:
        h.update(b"\0file\0" + path.name.encode() + b"\0")
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except OSError as exc:
            raise CorpusError(f"cannot read corpus file {path}: {exc}") from exc
    return "sha256:" + h.hexdigest()


# --------------------------------------------------------------------------------------------
# In-memory corpora: documents passed directly instead of a source
# --------------------------------------------------------------------------------------------
def iter_texts(texts: datasets.Dataset | Iterable[str]) -> Iterable[str]:
    """Yield the documents of a Dataset (its "text" column, read in chunks) or of an iterable."""
    if isinstance(texts, str):
        raise CorpusError("texts must be a collection of documents, not a single string")
    if isinstance(texts, datasets.Dataset):
        if "text" not in texts.column_names:
            raise CorpusError(f"the corpus Dataset has no 'text' column (columns: {texts.column_names})")
        for start in range(0, len(texts), 256):
            yield from texts[start : start + 256]["text"]
        return
    yield from texts


def texts_fingerprint(texts: datasets.Dataset | Iterable[str]) -> str:
    """SHA-256 over every document of an in-memory corpus (length-prefixed, in order)."""
    h = hashlib.sha256(b"rlsedit-texts-v1")
    for text in iter_texts(texts):
        b = text.encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
    return "sha256:" + h.hexdigest()
