"""POSIX shared-memory segments for big input buffers (engines on the kernel's host).

One concern: the segments that :mod:`parloop.backends.engines.transport` uses to hand a big
out-of-band buffer (a NumPy array's data, a big ``bytes``) to every engine that
can see the kernel's ``/dev/shm``, instead of sending it once per engine over
the sockets.

Kernel side, a :class:`SegmentPool` owns the segments of one
:class:`~parloop.backends.engines.transport.Transport`.  :meth:`SegmentPool.key_for` compares a
buffer byte for byte (libc ``memcmp``, GIL released) with the pool's segments
of the same size -- and the same cheap fingerprint (16 KiB of samples), which
spares comparing buffers that obviously differ -- and returns the key of an
equal one, or copies the buffer into a new segment (one ``pwrite``: no page
faults in this process) and returns its key.  A segment is never written again
after it is filled, so its key names one content for as long as it exists.
Segments are created with :class:`multiprocessing.shared_memory.SharedMemory`,
whose resource tracker unlinks them if the kernel dies;
:meth:`SegmentPool.release` and :meth:`SegmentPool.close` unlink them
otherwise, and so does interpreter exit (only in the process that created
them: not in a forked child).

Engine side, :func:`attach` opens a segment by name, read-only, and maps it
with ``PROT_READ`` (``mmap.ACCESS_READ``): the buffer handed out is a zero-copy
read-only view, and writing into an array built on it raises.  Engines do not
use ``SharedMemory`` to attach: before Python 3.13 it registers the segment
with the *engine's* resource tracker, which would unlink it when that engine
exits, under the other engines and the kernel.

:func:`probe_segment` and :func:`engine_probe` tell whether an engine sees the
kernel's segments at all (same host, same ``/dev/shm``): the kernel writes a
random token into a tiny segment and the engine reads it back by name.
Hostnames are not trusted for this (containers share hostnames, or not).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import mmap
import os
import secrets
import threading
import weakref
import zlib
from typing import Iterable, Iterator

try:
    import _posixshmem
except ImportError:  # pragma: no cover - Windows, some builds
    _posixshmem = None
try:
    from multiprocessing.shared_memory import SharedMemory
except ImportError:  # pragma: no cover
    SharedMemory = None  # type: ignore[assignment,misc]

__all__ = [
    "AVAILABLE",
    "THRESHOLD",
    "PREFIX",
    "SegmentPool",
    "attach",
    "engine_probe",
    "probe_segment",
    "segments_of",
]

#: out-of-band buffers at least this large go through shared memory (smaller ones
#: are not worth a segment: a file, a mapping and an unlink each, per engine too)
THRESHOLD = 1 << 20
#: every segment parloop creates is named ``parloop_<pid>_<tag>_<n>``
PREFIX = "parloop_"
SHM_DIR = "/dev/shm"

#: this platform has POSIX shared memory where the engines can look for it
AVAILABLE = _posixshmem is not None and SharedMemory is not None and os.path.isdir(SHM_DIR)


# ---------------------------------------------------------------------------
# raw memory: addresses of buffers, memcmp
# ---------------------------------------------------------------------------
class _PyBuffer(ctypes.Structure):
    """``Py_buffer`` (stable layout, part of the limited API since 3.11)."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_api: list = []


def _functions():
    """(PyObject_GetBuffer, PyBuffer_Release, memcmp), looked up once."""
    if not _api:
        # own prototypes: the argtypes of ctypes.pythonapi's shared function objects
        # are left as other code in the process may have set them
        get = ctypes.PYFUNCTYPE(
            ctypes.c_int, ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int
        )(("PyObject_GetBuffer", ctypes.pythonapi))
        release = ctypes.PYFUNCTYPE(None, ctypes.POINTER(_PyBuffer))(
            ("PyBuffer_Release", ctypes.pythonapi)
        )
        # CDLL (not PyDLL): the GIL is released for the call
        memcmp = ctypes.CDLL(None).memcmp
        memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        memcmp.restype = ctypes.c_int
        _api[:] = [get, release, memcmp]
    return _api


@contextlib.contextmanager
def _address(buf) -> Iterator[int]:
    """The address of a C-contiguous buffer, read-only ones included (which
    ``ctypes.c_char.from_buffer`` refuses), held for the ``with`` block."""
    get, release, _ = _functions()
    view = _PyBuffer()
    get(buf, ctypes.byref(view), 0)  # PyBUF_SIMPLE; raises BufferError if not contiguous
    try:
        yield view.buf or 0
    finally:
        release(ctypes.byref(view))


# ---------------------------------------------------------------------------
# kernel side
# ---------------------------------------------------------------------------
def _pwrite_all(fd: int, data: memoryview) -> None:
    off, n = 0, data.nbytes
    while off < n:  # Linux writes at most 2 GiB per call
        off += os.pwrite(fd, data[off:], off)


#: whether the multiprocessing resource tracker was started for parloop's segments
_TRACKER_OURS: list[bool] = []


def _tracker() -> object | None:
    try:
        from multiprocessing import resource_tracker

        return resource_tracker._resource_tracker  # private, but stable 3.8-3.13
    except (ImportError, AttributeError):  # pragma: no cover
        return None


def _note_tracker() -> None:
    """Before a segment is made: is the resource tracker running already?"""
    if not _TRACKER_OURS:
        tracker = _tracker()
        _TRACKER_OURS.append(tracker is not None and getattr(tracker, "_fd", 0) is None)


def _stop_tracker_if_ours() -> None:
    """Only once no pool holds a segment: the tracker, when it stops, unlinks
    whatever is still registered with it (another transport's live inputs)."""
    if any(len(pool) for pool in _POOLS):
        return
    if _TRACKER_OURS and _TRACKER_OURS[0] and os.getpid() == _OWNER:
        tracker = _tracker()
        try:
            tracker._stop()  # type: ignore[attr-defined]  # restarted on demand by anyone
        except Exception:  # noqa: BLE001 - not running, or already stopped
            pass
        _TRACKER_OURS.clear()


_OWNER = os.getpid()
#: the live pools of this process (one per transport)
_POOLS: "weakref.WeakSet[SegmentPool]" = weakref.WeakSet()


def _create(name: str, raw: memoryview) -> SharedMemory:
    """A new segment holding a copy of ``raw``; OSError if there is no room."""
    _note_tracker()
    shm = SharedMemory(name=name, create=True, size=raw.nbytes)
    try:
        # write(2) into the tmpfs file: no page faults in this process (twice as fast
        # as copying into the fresh mapping), and a full /dev/shm is an ENOSPC error
        # here instead of a SIGBUS while copying into the mapping
        fd = getattr(shm, "_fd", -1)
        if fd >= 0:
            _pwrite_all(fd, raw)
        else:  # pragma: no cover - a SharedMemory without its descriptor
            shm.buf[: raw.nbytes] = raw  # type: ignore[index]
    except BaseException:
        _destroy(shm)
        raise
    return shm


def _destroy(shm: SharedMemory) -> None:
    try:
        shm.close()
    finally:
        _unlink(shm)


def _unlink(shm: SharedMemory) -> None:
    try:
        shm.unlink()
    except FileNotFoundError:  # removed by someone else: keep the resource tracker quiet
        from multiprocessing import resource_tracker

        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]


def _close_all(segments: list[SharedMemory]) -> None:
    for shm in segments:
        try:
            shm.close()
        except Exception:  # noqa: BLE001 - in a background thread: nothing to tell
            pass


class SegmentPool:
    """The segments of one transport (kernel side): key -> read-only content.

    A segment's key is ``"s" + name``; its content never changes while it
    exists, so engines may keep what they mapped under that key.
    """

    def __init__(self, tag: str):
        self.pid = os.getpid()
        self.prefix = f"{PREFIX}{self.pid}_{tag}_"
        self._count = itertools.count()
        self._segments: dict[str, SharedMemory] = {}  # key -> segment (oldest first)
        self._prints: dict[str, tuple[int, int]] = {}  # key -> (size, fingerprint)
        # at interpreter exit (or when the pool is collected): unlink what is left
        weakref.finalize(self, _unlink_all, self._segments, self.pid)
        _POOLS.add(self)

    def __len__(self) -> int:
        return len(self._segments)

    def key_for(self, raw: memoryview, memo: dict | None = None) -> tuple[str | None, int]:
        """``(key, bytes copied)`` of a segment equal to ``raw``: an existing one
        (compared byte for byte) or a new one; ``(None, 0)`` if there is no room
        in ``/dev/shm``.  ``memo`` (one per broadcast) remembers the buffers already
        seen by address, for a buffer that several inputs share."""
        n = raw.nbytes
        with _address(raw) as src:
            if memo is not None and (src, n) in memo:
                return memo[(src, n)], 0
            memcmp = _functions()[2]
            key, copied = None, 0
            # only the segments with the same size and fingerprint can be equal (the
            # fingerprint only spares comparisons: equality is memcmp's answer)
            printed = (n, _fingerprint(raw))
            for k in reversed(self._prints):  # the newest are likeliest
                if self._prints[k] == printed:
                    with _address(self._segments[k].buf) as dst:
                        if memcmp(src, dst, n) == 0:
                            key = k
                            break
        if key is None:
            try:
                st = os.statvfs(SHM_DIR)
                if st.f_bavail * st.f_frsize < n:
                    return None, 0
                name = f"{self.prefix}{next(self._count)}"
                self._segments["s" + name] = _create(name, raw)
            except OSError:
                return None, 0
            key, copied = "s" + name, n
            self._prints[key] = printed
        if memo is not None:
            memo[(src, n)] = key
        return key, copied

    def release(self, keep: Iterable[str]) -> int:
        """Unlink the segments whose key is not in ``keep``; return how many.

        The names are gone from ``/dev/shm`` at once; this process's maps are
        closed by a background thread, as freeing the pages of the last map
        takes a while (~60 ms for 200 MB).  Engines that still map a segment
        keep their (read-only) pages until they let go of them."""
        keep = set(keep)
        gone = [self._segments.pop(k) for k in [k for k in self._segments if k not in keep]]
        for k in [k for k in self._prints if k not in self._segments]:
            del self._prints[k]
        for seg in gone:
            _unlink(seg)
        if gone:
            threading.Thread(
                target=_close_all, args=(gone,), name="parloop-shm-close", daemon=True
            ).start()
        return len(gone)

    def close(self) -> None:
        """Unlink every segment (idempotent); stop the resource tracker if
        parloop's segments are what started it (``%parallel_stop`` and
        ``%unload_ext`` leave no process behind)."""
        self._prints.clear()
        _unlink_all(self._segments, self.pid)
        _stop_tracker_if_ours()


def _fingerprint(raw: memoryview) -> int:
    """CRC-32 of the first and last 4 KiB and of 256 cache lines spread between:
    ~16 KiB read, whatever the size (a buffer changed in a few places only
    may keep its fingerprint; memcmp still tells)."""
    n = raw.nbytes
    crc = zlib.crc32(raw[n - 4096 :], zlib.crc32(raw[:4096]))
    step = n // 257
    for off in range(step, 257 * step, step):
        crc = zlib.crc32(raw[off : off + 64], crc)
    return crc


def _unlink_all(segments: dict[str, SharedMemory], pid: int) -> None:
    """Unlink and forget ``segments``.  In a forked child that inherited them
    (and runs this at its exit), only forget them: they are the parent's."""
    while segments:
        _, shm = segments.popitem()
        if os.getpid() == pid:
            try:
                _destroy(shm)
            except Exception:  # noqa: BLE001 - at exit: unlink the others anyway
                pass


_probes = itertools.count()


@contextlib.contextmanager
def probe_segment(tag: str) -> Iterator[tuple[str, bytes]]:
    """A tiny segment holding a random token, for :func:`engine_probe`:
    yields ``(name, token)``; unlinked after the block."""
    token = secrets.token_bytes(16)
    name = f"{PREFIX}{os.getpid()}_{tag}_probe{next(_probes)}"
    # not SharedMemory: its resource tracker (a process of its own, which outlives
    # %unload_ext) is only worth starting for the segments that hold inputs
    fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        try:
            os.write(fd, token)
        finally:
            os.close(fd)
        yield name, token
    finally:
        _posixshmem.shm_unlink("/" + name)


def segments_of(pid: int | None = None) -> list[str]:
    """The parloop segments in ``/dev/shm`` (of one process, if ``pid`` is given)."""
    prefix = PREFIX if pid is None else f"{PREFIX}{pid}_"
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix))
    except OSError:
        return []


# ---------------------------------------------------------------------------
# engine side
# ---------------------------------------------------------------------------
def attach(name: str, size: int) -> memoryview:
    """Runs ON THE ENGINE: a read-only, zero-copy view of the kernel's segment.

    Not ``SharedMemory(name)``: before Python 3.13 that registers the segment
    with this process's resource tracker, which unlinks it when the engine exits.
    """
    if _posixshmem is not None:
        fd = _posixshmem.shm_open("/" + name, os.O_RDONLY, 0)
    else:  # pragma: no cover
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY)
    try:
        # PROT_READ: writing through any view of it raises (and could not corrupt
        # the kernel's copy or the other engines' inputs anyway)
        mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    return memoryview(mm)


def engine_probe(name: str, size: int) -> bytes | None:
    """Runs ON THE ENGINE: the content of the kernel's probe segment, or None if
    this engine cannot open it (another host, another container's /dev/shm)."""
    if not AVAILABLE:
        return None
    try:
        view = attach(name, size)
    except (OSError, ValueError):
        return None
    with view:
        return bytes(view)
