"""File-system plumbing shared by every layer: the shipped data folder, the user cache root,
durable atomic writes."""

from __future__ import annotations

from pathlib import Path

#: ``rlsedit_llm/data``: the shipped corpus and evaluation files (licences in its README.md).
DATA_DIR = Path(__file__).resolve().parent / "data"
