"""A Python environment without parloop, for workers that lack it (issue 15).

A venv made by this interpreter whose site-packages holds a ``.pth`` line
pointing at this venv's libraries (a plain path entry: the ``.pth`` files
there, the editable install of parloop among them, are not read), and a
finder, loaded at start-up, that refuses the packages a Dask or Ray image
need not have: IPython, pyzmq, ipyparallel, traitlets, ipywidgets, tqdm --
and parloop itself, wherever this environment could find it.  A parloop
that a kernel sent (a zip, or a directory Ray unpacked) imports."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

#: what the bare environment cannot import
ABSENT = (
    "parloop",
    "IPython",
    "zmq",
    "ipyparallel",
    "traitlets",
    "ipywidgets",
    "ipykernel",
    "jupyter_client",
    "tqdm",
)


def _finder(installed: list[str]) -> str:
    return textwrap.dedent(
        f'''
        """Refuses {ABSENT!r}; parloop only where a kernel sent it."""
        import importlib.abc
        import sys
        from importlib.machinery import PathFinder

        ABSENT = {ABSENT!r}
        INSTALLED = {installed!r}

        class Absent(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                top = name.partition(".")[0]
                if top not in ABSENT:
                    return None
                if top == "parloop":
                    spec = PathFinder.find_spec(name, path)
                    origin = (spec.origin or "") if spec is not None else ""
                    if spec is not None and not any(origin.startswith(p) for p in INSTALLED):
                        return spec
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

        sys.meta_path.insert(0, Absent())
        '''
    )


#: (setup, cell, checks) run plainly and on workers of the bare environment:
#: a notebook class and function with numpy (by value), a reduction, print
#: order, and a loop whose iterations depend on each other
CELLS = [
    (
        "import numpy as np\n"
        "class Scaler:\n    def __init__(self, k):\n        self.k = k\n"
        "    def __call__(self, v):\n        return v * self.k\n"
        "def shape(v):\n    return float(np.sin(v))\n"
        "s = Scaler(3)\nout = {}\ntotal = 0",
        "for i in range(40):\n    out[i] = s(shape(i))\n    total += i\n"
        "    if i % 10 == 0:\n        print('at', i)\n",
        ["out", "total", "i"],
    ),
    ("x = [1.0] + [0.0] * 12", "for i in range(12):\n    x[i + 1] = x[i] * 1.5 + i\n", ["x"]),
]


def run_cells(ip, magic: str, backend: str, note: str) -> None:
    """Each of :data:`CELLS` plainly and under ``magic`` (the same answer and
    output); the first run, which found the workers without parloop, says so
    in a note containing ``note``."""
    import parloop
    from helpers import differential

    for n, (setup, cell, checks) in enumerate(CELLS):
        differential(ip, setup, cell, magic, checks)
        assert parloop.last_run.backend == backend
        if n == 0:
            assert any(note in m for m in parloop.last_run.notes), parloop.last_run.notes


def make_bare_python(root: Path) -> str:
    """Create the environment under ``root``; return its python."""
    import parloop

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = str(root / "bin" / "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    libraries = sysconfig.get_paths()["purelib"]
    installed = [libraries, str(Path(parloop.__file__).resolve().parent.parent)]
    Path(site, "libraries.pth").write_text(libraries + "\n")
    Path(site, "_absent.py").write_text(_finder(installed))
    Path(site, "zz_absent.pth").write_text("import _absent\n")
    probe = subprocess.run(
        [python, "-c", "import distributed, cloudpickle\nimport parloop"],
        capture_output=True,
        text=True,
        env=bare_env(),
    )
    assert "No module named 'parloop'" in probe.stderr, probe.stderr[-2000:]
    return python


def bare_env() -> dict[str, str]:
    """The environment variables for its processes (no PYTHONPATH of ours)."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def where_parloop_comes_from() -> dict:
    """Runs on a worker: where its parloop was imported from, and which of
    the packages it must not need got imported there."""
    import sys

    mod = sys.modules.get("parloop")
    return {
        "parloop": getattr(mod, "__file__", None),
        "imported": sorted(
            {m.partition(".")[0] for m in sys.modules}
            & {"IPython", "zmq", "ipyparallel", "traitlets", "tqdm"}
        ),
    }


# travels by value (the workers cannot import this module)
where_parloop_comes_from.__module__ = "__main__"
