"""The lab extension's option table (labextension/src/magicOptions.json) against
parloop's own (``parloop.options.SPECS``).

The "Parallelize loop" commands switch a cell between ``%%parallel`` and
``%%threaded`` and drop the options the new magic does not take; they learn
which those are from the JSON table, which is kept by hand.  An option added to
SPECS and not there would survive a switch to a magic that then rejects it, so
these tests fail naming the option whose entry differs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from parloop.options import SPECS, OptionSpec

LAB_OPTIONS_JSON = (
    Path(__file__).resolve().parents[1] / "labextension" / "src" / "magicOptions.json"
)


def _lab_magics_by_option() -> dict[str, list[str]]:
    """The table as the extension reads it: option name -> the magics that take it."""
    return json.loads(LAB_OPTIONS_JSON.read_text())["options"]


@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: spec.key)
def test_the_lab_table_gives_each_option_the_magics_of_specs(spec: OptionSpec) -> None:
    """One test per option, so that the failure names it."""
    lab = _lab_magics_by_option()
    assert spec.key in lab, (
        f"option {spec.key!r} is in parloop.options.SPECS but not in {LAB_OPTIONS_JSON.name}: "
        f'add "{spec.key}": {json.dumps(list(spec.magics))}'
    )
    assert sorted(lab[spec.key]) == sorted(spec.magics), (
        f"option {spec.key!r}: {LAB_OPTIONS_JSON.name} says it is taken by {lab[spec.key]}, "
        f"parloop.options.SPECS by {list(spec.magics)}"
    )


def test_the_lab_table_has_no_option_that_specs_lacks() -> None:
    """A removed or renamed option must go from the extension's table too."""
    extra = sorted(set(_lab_magics_by_option()) - {spec.key for spec in SPECS})
    assert extra == [], (
        f"{LAB_OPTIONS_JSON.name} has options that parloop.options.SPECS does not: {extra}"
    )
