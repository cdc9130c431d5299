"""The cost of hidden-state detection (docs/design.md §3): an object the body hands
to code is fingerprinted around each engine chunk, and after each thread chunk
(parloop.fingerprint).

Measured here, per chunk: the fingerprint of a 10 MB object graph (a dict of
lists of floats), of a 100 MB NumPy array hashed in place, and what parloop
does for arrays instead (makes the engine's copy read-only: a write raises
and is taken for hidden state, at no cost per chunk); and a whole cell that
hands a 10 MB dict to a notebook function in every iteration, against the
same loop that only reads it (nothing watched)."""

from __future__ import annotations

import time

from .harness import Result, Variant, measure, run_cell


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def fingerprint_cost(ip, rounds: int) -> Result:
    import numpy as np

    from parloop.fingerprint import fingerprint

    graph = {k: [float(j) for j in range(125)] for k in range(10_000)}  # ~10 MB
    array = np.random.default_rng(0).random(100 * 2**20 // 8)  # 100 MB
    readonly = array.view()

    def make_readonly() -> None:
        readonly.flags.writeable = False

    run_cell(
        ip,
        "import numpy as np\n"
        "GRAPH = {k: [float(j) for j in range(125)] for k in range(10_000)}\n"
        "def lookup(g, i):\n    return g[i % 10_000][0]\n"
        "out = {}",
    )
    run_cell(ip, "%%parallel processes=2 progress=off\nfor i in range(2):\n    out[i] = i")
    passed = "for i in range(64):\n    out[i] = lookup(GRAPH, i)\n"
    read = "for i in range(64):\n    out[i] = GRAPH[i % 10_000][0]\n"
    variants = [
        Variant("serial", lambda: run_cell(ip, passed)),
        Variant(
            "fingerprint, 10 MB dict of lists", lambda: _timed(lambda: fingerprint(graph)), True
        ),
        Variant(
            "fingerprint, 100 MB array (hashed in place)",
            lambda: _timed(lambda: fingerprint(array)),
            True,
        ),
        Variant(
            "read-only flag, 100 MB array (what engines do)", lambda: _timed(make_readonly), True
        ),
        Variant(
            "%%parallel, 10 MB dict handed to a function (watched)",
            lambda: run_cell(ip, "%%parallel processes=2 chunksize=8 progress=off\n" + passed),
            True,
        ),
        Variant(
            "%%parallel, 10 MB dict only read (not watched)",
            lambda: run_cell(ip, "%%parallel processes=2 chunksize=8 progress=off\n" + read),
            True,
        ),
        Variant(
            "%%threaded, 10 MB dict handed to a function (watched)",
            lambda: run_cell(ip, "%%threaded threads=2 chunksize=8 progress=off\n" + passed),
            True,
        ),
        Variant(
            "%%threaded, 10 MB dict only read (not watched)",
            lambda: run_cell(ip, "%%threaded threads=2 chunksize=8 progress=off\n" + read),
            True,
        ),
    ]
    res = measure(
        "Hidden-state detection: fingerprint costs, 8 chunks of 8 iterations", variants, rounds
    )
    res.extra.append(
        "The fingerprint rows are one call each (in the kernel); a watched input costs two "
        "per chunk on each engine (one baseline per run, one after every chunk). The two "
        "%%parallel rows differ by that, and both include sending GRAPH once. Under "
        "%%threaded a watched input is fingerprinted and pickled once around the first "
        "iteration (the baseline, kept to put the object back) and fingerprinted after "
        "every chunk."
    )
    return res
