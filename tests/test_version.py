"""One version: the package's ``__version__`` is the source (pyproject reads it
through hatch), and the lab extension's package.json must say the same."""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import parloop

ROOT = Path(__file__).resolve().parents[1]


def test_one_version():
    package_json = json.loads((ROOT / "labextension" / "package.json").read_text())
    assert package_json["version"] == parloop.__version__
    assert version("parloop") == parloop.__version__
