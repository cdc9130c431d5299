"""Shared fixtures: one in-process IPython shell with parloop loaded."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ip():
    """``InteractiveShell.instance()`` (history in memory) with ``%load_ext parloop``."""
    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    from helpers import run_cell

    cfg = Config()
    cfg.HistoryManager.hist_file = ":memory:"
    shell = InteractiveShell.instance(config=cfg)
    _, err = run_cell(shell, "%load_ext parloop")
    assert err is None, err
    yield shell
