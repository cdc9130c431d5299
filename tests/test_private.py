"""``private=NAME``: every iteration works on its own copy of the object *as
it was before the loop*, and what the copy's methods print is printed once.

Two bugs this pins down: under threads the copies were made from the
notebook's object while the commits replayed earlier iterations into it (so
iteration 2 saw iteration 0's fit, depending on timing), and the replay of a
copy's writes into the notebook's object printed a second time."""

from __future__ import annotations

import pytest

from helpers import reset, run_cell

SETUP = """
class Model:
    def __init__(self):
        self.n = 0
    def fit(self, i):
        print("fit", i)
        self.n += 1
        return self
model = Model()
seen = {}
"""
CELL = "for i in range(6):\n    model.fit(i)\n    seen[i] = model.n\n"


def _check(ip, magic_line: str) -> None:
    reset(ip)
    run_cell(ip, SETUP)
    out, err = run_cell(ip, f"{magic_line} private=model\n{CELL}")
    assert err is None, repr(err)
    assert out == "".join(f"fit {i}\n" for i in range(6))
    # each iteration's copy started from the model before the loop
    assert ip.user_ns["seen"] == {i: 1 for i in range(6)}


def test_private_copies_under_threads(ip):
    _check(ip, "%%threaded threads=3 progress=off chunksize=1")


@pytest.mark.cluster
def test_private_copies_on_engines(ip, cluster):
    _check(ip, "%%parallel processes=2 progress=off chunksize=1")
