"""Fixtures shared by every test folder."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory) -> str:
    """A key-statistics cache folder shared by the tests of one module."""
    return str(tmp_path_factory.mktemp("stats"))


@pytest.fixture(autouse=True)
def _library_logging_untouched():
    """A test (or a benchmark's ``main`` run in-process) must leave the library's loggers as it found
    them: a level raised and not restored silently hides the warnings later tests assert on."""
    import logging

    names = ("rlsedit_llm", "rlsedit_theory")
    before = {n: (logging.getLogger(n).level, logging.getLogger(n).propagate, logging.getLogger(n).disabled)
              for n in names}
    disabled = logging.root.manager.disable
    yield
    after = {n: (logging.getLogger(n).level, logging.getLogger(n).propagate, logging.getLogger(n).disabled)
             for n in names}
    assert after == before and logging.root.manager.disable == disabled, (
        f"logging configuration changed by this test: {before} -> {after}")
