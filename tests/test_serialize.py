"""parloop.backends.engines.serialize without engines, and the cloudpickle internals it relies on.

The kernel's unpickler (``loads``) keeps notebook classes from being overwritten
by the copies in engines' results, through private names of cloudpickle
(``_KernelClassGuard``).  These tests check each of them against the installed
cloudpickle, and that it lies in the range pinned in pyproject.toml -- verified
for cloudpickle 3.0.0, 3.1.0, 3.1.1 and 3.1.3.  A cloudpickle that moves them
fails here instead of silently giving notebook classes stale methods.
"""

from __future__ import annotations

import inspect
import io
import pickle
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Mapping
from pathlib import Path

import cloudpickle
import pytest
from packaging.specifiers import SpecifierSet

from parloop.backends.engines.serialize import _KernelClassGuard, dumps, loads

#: the cloudpickle versions the guard is known to work with (pyproject.toml says the same)
PINNED = ">=3.0,<4"

CELL = """
import enum
SCALE = 2

class Point:
    def __init__(self, x):
        self.x = x

    def scaled(self):
        return SCALE * self.x

class Color(enum.Enum):
    RED = 1

    def describe(self):
        return f"{self.name} x{SCALE}"
"""

# (class in the cell, an instance, a method the stream carries a copy of)
KINDS = {
    "class": ("Point", lambda cls: cls(3), "scaled"),
    "enum": ("Color", lambda cls: cls.RED, "describe"),
}


def notebook() -> dict:
    """A fresh cell namespace: its classes belong to __main__, so cloudpickle sends them by value."""
    ns = {"__name__": "__main__"}
    exec(compile(CELL, "<cell>", "exec"), ns)
    return ns


def names_in(stream: bytes) -> list[tuple[str, str]]:
    """The (module, name) globals a pickle stream looks up, in order."""
    seen = []

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.append((module, name))
            return super().find_class(module, name)

    Recorder(io.BytesIO(stream)).load()
    return seen


def test_installed_cloudpickle_is_in_the_pinned_range():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    pins = [d for d in pyproject["project"]["dependencies"] if d.startswith("cloudpickle")]
    assert pins == [f"cloudpickle{PINNED}"]
    assert cloudpickle.__version__ in SpecifierSet(PINNED)


def test_the_private_names_exist_with_the_tracker_id_where_the_guard_reads_it():
    internals = cloudpickle.cloudpickle
    for name, position in _KernelClassGuard.TRACKER_ID_ARG.items():
        params = list(inspect.signature(getattr(internals, name)).parameters)
        assert params[position] == "class_tracker_id", (name, params)
    assert list(inspect.signature(getattr(internals, _KernelClassGuard.SETSTATE)).parameters) == [
        "obj",
        "state",
    ]
    tracker = _KernelClassGuard.tracker()
    assert tracker is internals._DYNAMIC_CLASS_TRACKER_BY_ID
    assert isinstance(tracker, Mapping)


@pytest.mark.parametrize("kind", KINDS)
def test_streams_rebuild_notebook_classes_with_them(kind):
    cls_name, make, _ = KINDS[kind]
    seen = names_in(cloudpickle.dumps(make(notebook()[cls_name])))
    ours = [name for module, name in seen if module.startswith(_KernelClassGuard.MODULE_PREFIX)]
    skeleton = "_make_skeleton_enum" if kind == "enum" else "_make_skeleton_class"
    assert skeleton in ours and _KernelClassGuard.SETSTATE in ours
    assert ours.index(skeleton) < ours.index(_KernelClassGuard.SETSTATE)


@pytest.mark.parametrize("kind", KINDS)
def test_loads_keeps_the_kernels_own_class(kind):
    cls_name, make, method = KINDS[kind]
    cls = notebook()[cls_name]
    stream = cloudpickle.dumps(make(cls))  # what an engine sends back: same tracker id
    kept = cls.__dict__[method]
    obj = loads(stream)
    assert type(obj) is cls and cls.__dict__[method] is kept
    # Why the guard is there: cloudpickle itself finds the kernel's class by its
    # tracker id and then overwrites its attributes with the stream's copies.
    assert type(pickle.loads(stream)) is cls
    assert cls.__dict__[method] is not kept


@pytest.mark.parametrize("kind", KINDS)
def test_loads_fills_in_a_class_the_kernel_does_not_have(kind):
    cls_name, make, method = KINDS[kind]
    # pickled in another process: a tracker id this one has never seen
    script = textwrap.dedent(
        f"""
        import sys, cloudpickle
        ns = {{"__name__": "__main__"}}
        exec({CELL!r}, ns)
        make = {{"class": lambda cls: cls(3), "enum": lambda cls: cls.RED}}[{kind!r}]
        sys.stdout.buffer.write(cloudpickle.dumps(make(ns[{cls_name!r}])))
        """
    )
    stream = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, check=True, timeout=60
    ).stdout
    obj = loads(stream)
    assert type(obj).__name__ == cls_name and method in type(obj).__dict__
    assert getattr(obj, method)() in (6, "RED x2")


def test_dumps_keeps_big_buffers_out_of_the_stream():
    np = pytest.importorskip("numpy")
    value = {"big": np.arange(50_000, dtype=np.float64), "small": np.arange(10)}
    frames = dumps(value)
    assert len(frames) == 2 and frames[1].nbytes == 400_000
    back = loads(frames)
    assert all(np.array_equal(back[k], value[k]) for k in value)
