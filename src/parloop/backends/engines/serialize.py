"""How values become bytes for the engines and come back (docs/design.md §4).

Everything goes through cloudpickle (protocol 5): functions and classes defined
in the notebook travel by value, modules by reference.  parloop's pickler
(:class:`_Pickler`) refuses open files, sends ``sys.stdout`` and friends as the
engine's own streams, and sends ``functools.lru_cache`` wrappers of notebook
functions by value.

Buffers of at least :data:`OOB_THRESHOLD` bytes (NumPy arrays, pandas blocks,
``bytearray``, a ``bytes`` input) are kept out of the pickle stream, so that
they can travel zero-copy as separate message frames or through shared memory
-- which one, and whether at all, is :mod:`.transport`'s business.

Results travel back as :func:`dumps` on the engine and :func:`loads` in the
kernel, whose unpickler leaves the kernel's own notebook classes alone -- the
one place that relies on cloudpickle internals (:class:`_KernelClassGuard`,
tested in ``tests/test_serialize.py`` against the pinned range).

Before anything runs, :func:`check_picklable` tries every input and names the
innermost part of one that does not pickle (a global lock a function reads...).
"""

from __future__ import annotations

import functools
import io
import pickle
import sys
import types
from typing import Any, Mapping

import cloudpickle

from ...errors import LoopAnalysisError

__all__ = [
    "KERNEL_NS",
    "OOB_THRESHOLD",
    "check_picklable",
    "dumps",
    "loads",
]

#: buffers at least this large travel out of band (zero-copy, hashed and cached on their own)
OOB_THRESHOLD = 64 * 1024


# ---------------------------------------------------------------------------
# kernel to engines
# ---------------------------------------------------------------------------
class _Pickler(cloudpickle.Pickler):
    """cloudpickle, except that open files are refused.

    cloudpickle pickles a file opened for reading as a StringIO of its contents;
    a loop that reads from a shared file handle would then see the same lines on
    every engine, so parloop reports it instead (docs/design.md §4).
    """

    _STREAMS = ("stdout", "stderr", "stdin", "__stdout__", "__stderr__", "__stdin__")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._streams = {
            id(getattr(sys, s)): s.strip("_")
            for s in self._STREAMS
            if getattr(sys, s, None) is not None
        }

    def reducer_override(self, obj):
        stream = self._streams.get(id(obj))
        if stream is not None:
            return getattr, (sys, stream)  # the engine's own stream (parloop captures it there)
        if isinstance(obj, io.IOBase) and not isinstance(obj, (io.BytesIO, io.StringIO)):
            name = getattr(obj, "name", None)
            raise TypeError(f"cannot pickle an open file{f' ({name!r})' if name else ''}")
        if isinstance(obj, functools._lru_cache_wrapper) and _by_value(obj.__wrapped__):
            # pickle would look the wrapper up by name in the engine's __main__
            # (docs/design.md §4: functools wrappers of cell functions travel by value)
            return _rebuild_lru_cache, (obj.__wrapped__, obj.cache_parameters())
        return super().reducer_override(obj)


def _by_value(fn: Any) -> bool:
    """A function that cloudpickle sends by value (defined in a notebook cell
    or a module registered for it)."""
    module = getattr(fn, "__module__", None)
    return module == "__main__" or module in cloudpickle.list_registry_pickle_by_value()


def _rebuild_lru_cache(fn: Any, params: dict) -> Any:
    """On the engine: the same cache wrapper around the function (empty)."""
    return functools.lru_cache(maxsize=params.get("maxsize"), typed=params.get("typed", False))(fn)


def _cloudpickle(value: Any, buffer_callback) -> bytes:
    f = io.BytesIO()
    _Pickler(f, protocol=5, buffer_callback=buffer_callback).dump(value)
    return f.getvalue()


def _dumps_oob(value: Any, buffers: list) -> bytes:
    """cloudpickle ``value``; buffers of at least OOB_THRESHOLD bytes go into ``buffers``."""

    def callback(pb: pickle.PickleBuffer) -> bool:
        try:
            raw = pb.raw()  # flat unsigned-byte view; BufferError if not contiguous
        except BufferError:
            return True
        if raw.nbytes < OOB_THRESHOLD:
            return True  # in band
        buffers.append(raw)
        return False

    return _cloudpickle(value, callback)


def _serialize(name: str, value: Any) -> tuple[str, bytes | None, list[memoryview]]:
    """``(kind, pickle stream, out-of-band buffers)``; LoopAnalysisError if it cannot be pickled."""
    if type(value) is bytes and len(value) >= OOB_THRESHOLD:
        # pickle keeps bytes in band (a copy); send the object's own buffer instead
        return "bytes", None, [memoryview(value)]
    raws: list[memoryview] = []
    try:
        data = _dumps_oob(value, raws)
    except Exception as e:
        raise _unpicklable(name, value, e) from e
    return "pickle", data, raws


# ---------------------------------------------------------------------------
# results and other payloads in either direction
# ---------------------------------------------------------------------------
def dumps(obj: Any) -> list:
    """``[pickle stream, *out-of-band buffers]`` for ``obj`` (cloudpickle, protocol 5).

    Return this from an engine task, and :func:`loads` it in the kernel: big
    buffers in the result travel zero-copy, and instances of notebook classes
    come back as the kernel's own classes (cloudpickle tracks classes it sent by
    value).  It also keeps results independent of ipyparallel's serializer
    settings (``use_cloudpickle`` or not).
    """
    raws: list[memoryview] = []
    data = _dumps_oob(obj, raws)
    return [data, *raws]


def loads(frames: list | bytes | bytearray | memoryview) -> Any:
    """Inverse of :func:`dumps` (or of any cloudpickle stream), for the kernel:
    unlike ``pickle.loads`` it leaves the kernel's own classes alone.

    When a stream holds a notebook class that the kernel already has (cloudpickle
    finds it by its tracker id), plain ``pickle.loads`` returns the kernel's
    class -- but then *overwrites its attributes* with the copies from the
    stream: the methods would become copies whose globals are the snapshot the
    engine got, and a global changed later in the notebook would not be seen by
    them.  This unpickler skips that step for classes that existed before
    (:class:`_KernelClassGuard`).
    """
    if isinstance(frames, (bytes, bytearray, memoryview)):
        frames = [frames]  # a plain (cloud)pickle stream
    return _KernelUnpickler(io.BytesIO(frames[0]), buffers=frames[1:]).load()


def _quiet_figure(figure_cls: type) -> type:
    """A Figure coming back from an engine must not register itself with the
    kernel's pyplot (matplotlib re-registers unpickled pyplot figures: an
    extra figure per result)."""
    quiet = getattr(figure_cls, "___parloop_quiet", None)
    if quiet is None:

        class QuietFigure(figure_cls):  # type: ignore[valid-type, misc]
            def __setstate__(self, state: dict) -> None:
                state.pop("_restore_to_pylab", None)
                figure_cls.__setstate__(self, state)  # type: ignore[attr-defined]
                self.__class__ = figure_cls

        quiet = QuietFigure
        figure_cls.___parloop_quiet = quiet  # type: ignore[attr-defined]
    return quiet


#: the namespace whose objects engines' results refer to (set by the engines
#: backend for its run; see parloop.backends.engines.worker._InputPickler)
KERNEL_NS: list[Mapping[str, Any]] = [{}]


class _KernelUnpickler(pickle.Unpickler):
    def __init__(self, file, *, buffers=()):
        super().__init__(file, buffers=buffers)
        self._classes = _KernelClassGuard()

    def persistent_load(self, pid: Any) -> Any:
        """A reference to one of the kernel's own objects (an input, or an
        element of one), sent back by an engine in place of its copy."""
        tag, name, path = pid
        if tag != "parloop-input":
            raise pickle.UnpicklingError(f"unknown persistent id {tag!r}")
        obj = KERNEL_NS[0][name]
        for k in path:
            obj = obj[k]
        return obj

    def find_class(self, module: str, name: str):
        obj = super().find_class(module, name)
        if module == "matplotlib.figure" and name == "Figure":
            return _quiet_figure(obj)
        return self._classes.wrap(module, name, obj)


# ---------------------------------------------------------------------------
# THE ONE PLACE THAT RELIES ON CLOUDPICKLE INTERNALS
# ---------------------------------------------------------------------------
class _KernelClassGuard:
    """Keeps one unpickling from overwriting the kernel's own notebook classes.

    It relies on three private names of ``cloudpickle.cloudpickle``, as they
    are in cloudpickle 3.0.0 to 3.1.3 (``tests/test_serialize.py`` checks them
    against the installed cloudpickle and the pin in pyproject.toml):

    * A class that cloudpickle sends by value is rebuilt by the stream calling
      ``_make_skeleton_class(type_constructor, name, bases, type_kwargs,
      class_tracker_id, extra)`` -- for an Enum ``_make_skeleton_enum(bases,
      name, qualname, members, module, class_tracker_id, extra)`` -- and then
      filled in by ``_class_setstate(cls, state)``, which sets every attribute
      from the stream on the class.
    * ``class_tracker_id`` names the class across processes: when
      ``_DYNAMIC_CLASS_TRACKER_BY_ID`` already maps it to a class -- in the
      kernel, the notebook's own class, registered when the kernel sent it --
      the skeleton function returns that class, and ``_class_setstate`` then
      overwrites *it*.

    So the skeleton functions are wrapped to note which classes existed before
    (their tracker id was known before the call), and ``_class_setstate`` to
    leave those alone.  Should cloudpickle rename or reshape these, nothing
    here fails: classes are overwritten again, as by plain ``pickle.loads``.
    """

    #: the streams name these functions in ``cloudpickle.cloudpickle``; any module
    #: of the package is taken (the ``cloudpickle.cloudpickle_fast`` shim re-exports them)
    MODULE_PREFIX = "cloudpickle"
    #: skeleton function -> index of ``class_tracker_id`` among its arguments
    TRACKER_ID_ARG = {"_make_skeleton_class": 4, "_make_skeleton_enum": 5}
    SETSTATE = "_class_setstate"

    def __init__(self) -> None:
        self._existing: set[int] = set()  # id() of the classes to keep as they are

    @staticmethod
    def tracker() -> Mapping[str, type]:
        """cloudpickle's class tracker: tracker id -> class ({} if it is gone)."""
        return getattr(
            getattr(cloudpickle, "cloudpickle", None), "_DYNAMIC_CLASS_TRACKER_BY_ID", {}
        )

    def wrap(self, module: str, name: str, obj: Any) -> Any:
        """``obj``, found by the unpickler as ``module.name``; wrapped if it is one of the above."""
        if not module.startswith(self.MODULE_PREFIX):
            return obj
        if name in self.TRACKER_ID_ARG:
            return self._tracking(obj, self.TRACKER_ID_ARG[name])
        if name == self.SETSTATE:
            return self._setstate(obj)
        return obj

    def _tracking(self, make, position: int):
        tracker = self.tracker()

        def make_skeleton(*args):
            tracker_id = args[position] if len(args) > position else None
            known = tracker_id is not None and tracker.get(tracker_id) is not None
            cls = make(*args)
            if known:
                self._existing.add(id(cls))
            return cls

        return make_skeleton

    def _setstate(self, setstate):
        def class_setstate(obj, state):
            if id(obj) in self._existing:
                return obj  # the kernel's own class: keep its attributes
            return setstate(obj, state)

        return class_setstate


# ---------------------------------------------------------------------------
# the check before anything runs
# ---------------------------------------------------------------------------
def check_picklable(
    values: Mapping[str, object], *, linenos: Mapping[str, int] | None = None
) -> None:
    """Raise :class:`LoopAnalysisError` naming the first variable that cannot be sent to engines.

    Cheap for large NumPy arrays and other protocol-5 buffers: they are not
    copied (an out-of-band callback discards them), only the objects around them
    are pickled.
    """
    for name, value in values.items():
        if type(value) in (bytes, str, int, float, bool, type(None)):
            continue
        try:
            _cloudpickle(value, _discard)
        except Exception as e:
            raise _unpicklable(name, value, e, linenos) from e


def _discard(_buffer) -> bool:
    return False  # out of band: not copied into the stream


def _probe(value: Any) -> Exception | None:
    try:
        _cloudpickle(value, _discard)
    except Exception as e:  # noqa: BLE001 - whatever does not pickle is reported by name
        return e
    return None


def _culprit(value: Any, depth: int = 3) -> tuple[list[str], Any, Exception] | None:
    """The innermost part of ``value`` that does not pickle: (path, part, exception).

    E.g. a function reading a global lock gives (["global tally_lock"], <lock>, TypeError(...)).
    """
    if depth == 0:
        return None
    parts: list[tuple[str, Any]] = []
    if isinstance(value, types.FunctionType):
        from ...analysis.scopes import code_names

        parts += [
            (f"global {n}", value.__globals__[n])
            for n in sorted(code_names(value.__code__))
            if n in value.__globals__
        ]
        for var, cell in zip(value.__code__.co_freevars, value.__closure__ or ()):
            try:
                parts.append((f"closure variable {var}", cell.cell_contents))
            except ValueError:  # empty cell
                pass
        parts += [(f"a default of {value.__name__}()", d) for d in value.__defaults__ or ()]
    elif isinstance(value, dict):
        parts += [(f"[{k!r}]", v) for k, v in list(value.items())[:1000]]
    elif isinstance(value, (list, tuple, set, frozenset)):
        parts += [(f"[{i}]", v) for i, v in enumerate(list(value)[:1000])]
    elif hasattr(value, "__dict__") and not isinstance(value, (type, types.ModuleType)):
        parts += [(f".{k}", v) for k, v in list(vars(value).items())[:1000]]
    for label, part in parts:
        if isinstance(part, types.ModuleType):
            continue
        exc = _probe(part)
        if exc is not None:
            inner = _culprit(part, depth - 1)
            if inner is not None:
                return [label, *inner[0]], inner[1], inner[2]
            return [label], part, exc
    return None


def _unpicklable(
    name: str, value: Any, exc: Exception, linenos: Mapping[str, int] | None = None
) -> LoopAnalysisError:
    found = _culprit(value)
    if found is None:
        detail = f"{name!r} ({type(value).__name__}): {exc}"
    else:
        path, part, exc = found
        where = "".join(p if p.startswith(("[", ".")) else f" {p}" for p in path).strip()
        detail = f"{name!r}: it refers to {where} ({type(part).__name__}): {exc}"
    message = (
        f"%%parallel cannot send {detail}. Engines are separate processes and get "
        f"copies of what the loop reads: use %%threaded (threads share the kernel's "
        f"objects), or create {name!r} inside the loop."
    )
    return LoopAnalysisError(message, lineno=(linenos or {}).get(name), name=name)
