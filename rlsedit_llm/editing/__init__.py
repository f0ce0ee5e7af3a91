"""The editors and their saved state: :class:`Editor` (layer-solver methods), fine-tuning, file I/O."""

from rlsedit_llm.editing import finetune  # noqa: F401  (registers the editor-level method "ft")
