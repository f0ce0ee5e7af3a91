"""Fixtures shared by every test folder."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def stats_dir(tmp_path_factory) -> str:
    """A key-statistics cache folder shared by the tests of one module."""
    return str(tmp_path_factory.mktemp("stats"))
