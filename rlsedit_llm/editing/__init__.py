"""The editors and their saved state: :class:`Editor` (layer-solver methods), fine-tuning, UltraEdit, file I/O."""

from rlsedit_llm.editing import finetune  # noqa: F401  (registers the editor-level method "ft")
from rlsedit_llm.editing import ultraedit  # noqa: F401  (registers the editor-level method "ultraedit")
