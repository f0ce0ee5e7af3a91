"""The editors and their saved state: :class:`Editor` (layer-solver methods), fine-tuning, UltraEdit, file I/O.

Importing this package registers the built-in methods (:mod:`rlsedit_llm.editing.catalog`).
"""

from __future__ import annotations

from rlsedit_llm.editing.catalog import register_builtins

register_builtins()
