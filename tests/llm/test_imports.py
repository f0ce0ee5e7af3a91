"""Import hygiene: ``import rlsedit_llm`` and the command line's parser load no heavy library, the
theory layer needs only NumPy and SciPy, every exported name still resolves, and a missing
optional dependency is an ImportError that names its extra. Nothing here is timed
(``benchmarks/import_time.py`` measures)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import rlsedit_llm

HEAVY = ("torch", "transformers", "datasets", "matplotlib", "pandas", "pyarrow", "gguf", "sympy")


def _modules_after(code: str) -> list[str]:
    """The heavy modules a fresh interpreter holds after running ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={"OMP_NUM_THREADS": "1", "PATH": ""})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_and_the_cli_parser_load_no_heavy_library():
    code = ("import rlsedit_llm, rlsedit_llm.cli\n"
            "parser = rlsedit_llm.cli.build_parser()\n"
            "parser.format_help()\n"  # what `rlsedit --help` prints
            "parser.parse_args(['query', '--prompt', 'x', '--device', 'cuda:0', '--dtype', 'bfloat16'])\n")
    assert _modules_after(code) == []


def test_the_theory_layer_needs_only_numpy_and_scipy():
    assert _modules_after("import rlsedit_theory") == []


def test_every_exported_name_resolves_and_is_listed():
    for name in rlsedit_llm.__all__:
        assert getattr(rlsedit_llm, name) is not None, name
    assert set(rlsedit_llm.__all__) <= set(dir(rlsedit_llm))
    assert rlsedit_llm.method_names()[0] == "rlsedit"  # the built-in methods are registered on first use
    assert rlsedit_llm.editing.__name__ == "rlsedit_llm.editing"  # sub-packages, imported on access
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        rlsedit_llm.no_such_name  # noqa: B018


def test_a_missing_gguf_names_its_extra(monkeypatch, tmp_path):
    from rlsedit_llm.adapters import loading

    monkeypatch.setitem(sys.modules, "gguf", None)  # find_spec("gguf") is None: not installed
    with pytest.raises(ImportError, match=r"pip install 'rlsedit\[gguf\]'"):
        loading._from_gguf(tmp_path, "model.gguf", "SmolLM2")


def test_a_missing_matplotlib_names_its_extra(monkeypatch):
    from rlsedit_llm.evaluation import plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'rlsedit\[bench\]'"):
        plots._pyplot()
