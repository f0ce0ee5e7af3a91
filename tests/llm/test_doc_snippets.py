"""Every Python snippet of the README and the Usage page runs verbatim, in order, on the real model.

Each page's ``python`` blocks run top to bottom in one namespace (a page is one session, as a reader
would type it), in a fresh process whose working folder is a temporary one. The only preparation is
what the pages tell the reader to have: ``my-model/``, a causal LM saved with ``save_pretrained``
(the offline SmolLM2-135M here), and ``facts.jsonl`` for the command-line blocks. ``bash`` blocks
whose first word is ``rlsedit`` run too, after the Python blocks, with ``rlsedit`` resolved to this
interpreter's entry point (``rlsedit demo`` excepted: the command-line tests run it).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = {"readme": ROOT / "README.md", "usage": ROOT / "docs" / "llm" / "usage.md"}
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)

PREPARE = textwrap.dedent("""
    import rlsedit_llm
    _model, _tok = rlsedit_llm.load_model("smollm2")
    _model.save_pretrained("my-model")
    _tok.save_pretrained("my-model")
    del _model, _tok
""")

FACTS = [
    {"prompt": "{} is located in the city of", "subject": "The Colosseum", "target": "Paris"},
    {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux", "target": "English"},
]


def blocks(page: Path, language: str) -> list[tuple[int, str]]:
    """``(line, source)`` of every fenced block of ``language`` on ``page``, in order."""
    text = page.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(2)) for m in FENCE.finditer(text) if m.group(1) == language]


def shell_commands(page: Path) -> list[tuple[int, list[str]]]:
    """The ``rlsedit ...`` command lines of the page's bash blocks (comments dropped, continuations joined)."""
    commands = []
    for line, source in blocks(page, "bash"):
        for command in source.replace("\\\n", " ").splitlines():
            words = shlex.split(command, comments=True)
            if words and words[0] == "rlsedit":
                commands.append((line, words))
    return commands


def test_the_pages_have_snippets_to_run():
    assert blocks(PAGES["readme"], "python") and blocks(PAGES["usage"], "python")
    assert shell_commands(PAGES["usage"]), "the Usage page documents the command line"


def _script(page: Path) -> str:
    """One program running the page's Python blocks in order, each compiled under its own page and line."""
    parts = [PREPARE, "_ns = {'__name__': '__main__'}"]
    for line, source in blocks(page, "python"):
        parts.append(f"exec(compile({source!r}, {f'{page.name}:{line}'!r}, 'exec'), _ns)")
    return "\n".join(parts)


def _run(argv: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PAGES))
def test_every_python_snippet_runs_verbatim(name, tmp_path):
    out = _run([sys.executable, "-c", _script(PAGES[name])], tmp_path, timeout=1500)
    assert out.returncode == 0, f"{PAGES[name].name}:\n{out.stdout[-4000:]}\n{out.stderr[-8000:]}"


@pytest.mark.slow
def test_every_command_line_of_the_usage_page_runs(tmp_path):
    prepared = _run([sys.executable, "-c", PREPARE], tmp_path, timeout=600)
    assert prepared.returncode == 0, prepared.stderr
    (tmp_path / "facts.jsonl").write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    entry = Path(sys.executable).with_name("rlsedit")
    for line, words in shell_commands(PAGES["usage"]):
        if words[1:2] == ["demo"]:  # run by tests/llm/test_cli.py's demo test already (40 s)
            continue
        out = _run([str(entry), *words[1:]], tmp_path, timeout=900)
        assert out.returncode == 0, f"usage.md:{line}: {shlex.join(words)}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
