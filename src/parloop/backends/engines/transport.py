"""Broadcasting the loop's inputs to engines: once per engine, never stale (docs/design.md §4).

What a value becomes on the way (cloudpickle, out-of-band buffers) is
:mod:`.serialize`'s business; :class:`Transport` decides what each engine must
be sent, keeps track of what each engine holds, and picks frames or shared
memory for the big buffers.

Keys name contents, so a value is re-sent exactly when what it pickles to has
changed -- including, for a function, the globals it reads.  A value's key is
the SHA-1 of its pickle stream and of its buffers' keys; a buffer's key is the
SHA-1 of its bytes, or the name of a shared-memory segment that holds the same
bytes.  An unchanged buffer is not sent again even when the value around it
changed (a function that closes over a big array and a new threshold only sends
the small pickle), and a buffer shared by several inputs travels once.  An
engine drops a value that the last :data:`KEEP` broadcasts did not use.

Shared memory (:mod:`parloop.backends.engines.shm`).  For engines that can map the kernel's
``/dev/shm``, every out-of-band buffer of at least :data:`SHM_THRESHOLD` bytes is
copied once into a ``parloop_*`` POSIX shared-memory segment, and all of them map
that one segment instead of receiving the buffer over their sockets
(``TransportStats.shm_bytes``, not ``bytes``).

* The probe: each engine is asked once (by uuid) whether it can open, by name,
  a tiny segment holding a random token and read the token back -- true on the
  kernel's host and in its container, whatever the hostnames say.  Engines that
  cannot (another host, another container), and platforms without ``/dev/shm``,
  get frames: with SHA-1 keys, or with the segment's key when other engines of
  the same broadcast map it.
* No hashing of big buffers: the key of a big buffer is that of an *equal*
  segment, found by comparing the buffer byte for byte (libc ``memcmp``, GIL
  released) with the kernel's segments of the same size (and fingerprint: a CRC
  of 16 KiB of samples, which spares most comparisons with different buffers);
  else a new segment is made.  Exact like a hash, so a global changed in place
  between cells is seen by the next cell, and cheaper: ``memcmp`` reads the two
  copies at memory speed (~15 ms for 200 MB where SHA-1 takes ~110 ms), and stops
  at the first difference.  A segment is never written after it is filled: its
  name keeps naming one content.
* Read-only maps: engines map segments with ``PROT_READ``, so an input array is
  a zero-copy view that cannot be written into, as with frames -- and no engine
  can change what the other engines and the kernel's comparisons see.
* No leaks: a segment is unlinked once no engine holds its key any more (the
  same KEEP eviction as frames), by :meth:`Transport.close`, at interpreter
  exit, and by the kernel's ``multiprocessing`` resource tracker if the kernel
  dies.

Engine side (:mod:`.worker`), the payloads live in its :data:`_STORE`.  A value is
unpickled once per engine per broadcast (per cell): every cell starts from the
kernel's snapshot, and a mutation an engine made to its copy in one cell is not
seen in the next.  Within a cell, the tasks that run on one engine share the
objects.  Out-of-band buffers are handed out *read-only* (zero-copy views of the
received frames or of the mapped segments): writing into an input array on an
engine raises ``ValueError: assignment destination is read-only`` instead of
silently diverging from the kernel's array (joblib's memmapped inputs behave the
same).

:func:`dumps`, :func:`loads`, :func:`check_picklable` and :data:`KERNEL_NS` are
re-exported from :mod:`.serialize`, where they live.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass, fields
from typing import Any, Iterable

from . import shm as _shm
from .serialize import KERNEL_NS, OOB_THRESHOLD, _serialize, check_picklable, dumps, loads
from .worker import TransportError, _engine_store

__all__ = [
    "KERNEL_NS",
    "OOB_THRESHOLD",
    "SHM_THRESHOLD",
    "Transport",
    "TransportError",
    "TransportStats",
    "check_picklable",
    "dumps",
    "loads",
]

#: out-of-band buffers at least this large go through shared memory to the engines that can map it
SHM_THRESHOLD = _shm.THRESHOLD
#: an engine drops a value that the last KEEP broadcasts did not use
KEEP = 3


# ---------------------------------------------------------------------------
# content keys
# ---------------------------------------------------------------------------
def _hash(*parts) -> str:
    h = hashlib.sha1(usedforsecurity=False)  # fast (SHA-NI), 160 bits: not adversarial input
    for p in parts:
        h.update(p)
    return h.hexdigest()


@dataclass
class _Packed:
    key: str  # content key
    kind: str  # "pickle" or "bytes"
    data: bytes | None  # the pickle stream
    buffers: list[tuple[str, memoryview]]  # out-of-band buffers: (content key, bytes view)


def _hash_key(raw: memoryview) -> str:
    return "b" + _hash(raw)


def _pack(kind: str, data: bytes | None, raws: list[memoryview], buffer_key=_hash_key) -> _Packed:
    """Key the buffers (``buffer_key``: SHA-1, or a shared-memory segment's key)
    and the value (SHA-1 of its pickle stream and of its buffers' keys)."""
    buffers = [(buffer_key(raw), raw) for raw in raws]
    if kind == "bytes":
        return _Packed("v" + _hash(b"bytes:", buffers[0][0].encode()), kind, None, buffers)
    return _Packed("v" + _hash(data, *(k.encode() for k, _ in buffers)), kind, data, buffers)


@dataclass
class TransportStats:
    """Counters of what :meth:`Transport.broadcast` sent (``Transport.stats``: since creation;
    ``Transport.last``: the last broadcast).  Per engine: sending one value to two
    engines counts 2 in ``values_sent`` and twice its size in ``bytes``.  A buffer
    that went through shared memory counts in ``shm_bytes`` once, however many
    engines map it, and not in ``bytes``."""

    broadcasts: int = 0
    messages: int = 0  # store messages (at most one per engine per broadcast, but for a retry)
    bytes: int = 0  # payload bytes sent over the sockets, summed over engines
    values_sent: int = 0  # (value, engine) pairs sent
    values_cached: int = 0  # (value, engine) pairs already there
    buffers_sent: int = 0  # (out-of-band buffer, engine) pairs sent, as frames or segments
    shm_buffers: int = 0  # of buffers_sent: the pairs that the engine mapped from shared memory
    shm_bytes: int = 0  # bytes copied into new shared-memory segments (once for all engines)
    evicted: int = 0  # keys engines were told to drop
    seconds: float = 0.0  # wall time in broadcast()

    def add(self, other: TransportStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


class Transport:
    """Broadcasts a cell's inputs to engines and keeps track of what each engine holds.

    One per ``ipyparallel.Client``; bookkeeping is per engine *uuid*, so an
    engine that is replaced (even under a reused id) starts empty.

    ``shm=False`` sends every buffer over the sockets, as to engines on other
    hosts; by default each engine is probed once, and those that can map the
    kernel's shared memory get big buffers that way.  :meth:`close` unlinks
    the segments (so does interpreter exit).
    """

    def __init__(self, client, *, keep: int = KEEP, shm: bool = True):
        self.client = client
        self.keep = keep
        self.shm = bool(shm) and _shm.AVAILABLE
        self._uid = uuid.uuid4().hex[:12]
        self._gen = 0
        # engine uuid -> {content key -> generation that last used it}
        self._have: dict[object, dict[str, int]] = {}
        # engine uuid -> whether it maps the kernel's shared memory (the probe's answer)
        self._shm_ok: dict[object, bool] = {}
        self._segments: _shm.SegmentPool | None = None
        self.stats = TransportStats()
        self.last = TransportStats()

    def broadcast(
        self, values: dict[str, object], targets: Iterable[int], *, timeout: float | None = None
    ) -> dict[str, str]:
        """Make every value available on every target engine; return name -> key.

        A value (or out-of-band buffer) already present on an engine is not sent
        again.  Blocks until every engine has stored and loaded what it was sent.
        Pass the keys to :func:`engine_resolve` in the task that runs on the engine.

        Raises :class:`~parloop.errors.LoopAnalysisError` (naming the variable) for
        a value that cannot be pickled, :class:`TransportError` for one that an
        engine cannot load, and ipyparallel's errors if an engine dies meanwhile.
        """
        t0 = time.perf_counter()
        stats = TransportStats(broadcasts=1)
        pickled = {name: _serialize(name, value) for name, value in values.items()}
        idents = {eid: self._ident(eid) for eid in dict.fromkeys(targets)}
        self._prune()
        big = any(raw.nbytes >= SHM_THRESHOLD for _, _, raws in pickled.values() for raw in raws)
        # the targets that map shared memory (asked only once there is something big to share)
        mapping = self._probe(idents, timeout) if big else set()
        buffer_key = self._segment_key(stats) if mapping else _hash_key
        packed = {name: _pack(*p, buffer_key) for name, p in pickled.items()}
        self._gen += 1
        gen, epoch = self._gen, f"{self._uid}.{self._gen}"
        used = {p.key for p in packed.values()} | {
            bk for p in packed.values() for bk, _ in p.buffers
        }
        pending: list[Any] = []
        for eid, ident in idents.items():
            have = self._have.setdefault(ident, {})
            index, blobs = self._index(packed, have, eid in mapping, epoch, stats)
            index["drop"] = [k for k, g in have.items() if k not in used and g <= gen - self.keep]
            self._send(eid, index, blobs, stats, pending, have, used, gen)
        error = None
        while pending:
            retry = []
            for eid, index, ar in pending:
                reply = ar.get(timeout=timeout)
                have = self._have[idents[eid]]
                for k in index["drop"]:
                    have.pop(k, None)
                for k in used:
                    have[k] = gen
                unmapped = set(reply.get("unmapped", ()))
                redo = set()
                if unmapped:
                    # the probe said yes, yet a segment could not be mapped (/dev/shm
                    # cleaned, the map limit...): frames for this engine from now on
                    self._shm_ok[idents[eid]] = False
                    redo = {
                        name
                        for name, p in packed.items()
                        if any(bk in unmapped for bk, _ in p.buffers)
                    }
                    for k in unmapped | {packed[name].key for name in redo}:
                        have.pop(k, None)
                    retry.append(eid)
                for name, err in reply["errors"].items():
                    have.pop(packed[name].key, None)  # not usable there: check it again next time
                    if error is None and name not in redo:
                        error = TransportError(
                            f"parloop: engine {eid} cannot load the input {name!r}: {err}. "
                            "Modules are imported on the engines by name, so they must be "
                            "installed there too; or create the value inside the loop.",
                            name=name,
                        )
            pending = []
            for eid in retry:
                have = self._have[idents[eid]]
                cached = stats.values_cached
                index, blobs = self._index(packed, have, False, epoch, stats)
                stats.values_cached = cached
                self._send(eid, index, blobs, stats, pending, have, used, gen)
        self._release_segments()
        if error is not None:
            raise error
        stats.seconds = time.perf_counter() - t0
        self.last = stats
        self.stats.add(stats)
        return {name: f"{p.key}@{epoch}" for name, p in packed.items()}

    @staticmethod
    def _index(
        packed: dict[str, _Packed],
        have: dict[str, int],
        mapping: bool,
        epoch: str,
        stats: TransportStats,
    ) -> tuple[dict[str, Any], list]:
        """The store message for one engine: what it lacks, as frames or segments."""
        index: dict[str, Any] = {
            "drop": [],
            "values": {},
            "buffers": {},
            "segments": {},
            "load": {},
            "epoch": epoch,
        }
        blobs: list = []
        for name, p in packed.items():
            if p.key in have or p.key in index["values"]:
                stats.values_cached += p.key in have
                continue
            for bkey, raw in p.buffers:
                if bkey in have or bkey in index["buffers"] or bkey in index["segments"]:
                    continue
                stats.buffers_sent += 1
                if mapping and bkey.startswith("s"):
                    index["segments"][bkey] = raw.nbytes
                    stats.shm_buffers += 1
                else:  # a frame: to an engine that cannot map the segment, the same key
                    index["buffers"][bkey] = len(blobs)
                    blobs.append(raw)
                    stats.bytes += raw.nbytes
            if p.data is not None:
                index["values"][p.key] = ("pickle", len(blobs), [k for k, _ in p.buffers])
                blobs.append(memoryview(p.data))
                stats.bytes += len(p.data)
            else:
                index["values"][p.key] = (p.kind, None, [k for k, _ in p.buffers])
            index["load"][name] = p.key
            stats.values_sent += 1
        # values with the same content under two names: load both names
        for name, p in packed.items():
            if p.key in index["values"]:
                index["load"].setdefault(name, p.key)
        return index, blobs

    def _send(self, eid, index, blobs, stats, pending, have, used, gen) -> None:
        if index["values"] or index["buffers"] or index["segments"]:
            ar = self.client[eid].apply_async(_engine_store, index, *blobs)
            stats.messages += 1
            stats.evicted += len(index["drop"])
            pending.append((eid, index, ar))
        else:
            # nothing new for this engine: what it may drop waits for the next
            # message that must go anyway (a message only to drop cost the run
            # a round trip to the engines before its first chunk: 3-7 ms)
            for k in used:
                have[k] = gen

    # -- shared memory ---------------------------------------------------------
    def _probe(self, idents: dict[int, object], timeout: float | None) -> set[int]:
        """The engines among ``idents`` that map the kernel's shared memory; each
        engine is asked once: can it read a random token from a tiny segment?"""
        unknown = {eid: ident for eid, ident in idents.items() if ident not in self._shm_ok}
        if unknown and not self.shm:
            self._shm_ok.update(dict.fromkeys(unknown.values(), False))
        elif unknown:
            from ipyparallel.error import RemoteError

            try:
                with _shm.probe_segment(self._uid) as (name, token):
                    asked = [
                        (ident, self.client[eid].apply_async(_shm.engine_probe, name, len(token)))
                        for eid, ident in unknown.items()
                    ]
                    for ident, ar in asked:
                        try:
                            self._shm_ok[ident] = ar.get(timeout=timeout) == token
                        except RemoteError:  # e.g. an engine with an older parloop
                            self._shm_ok[ident] = False
                        except Exception:  # noqa: BLE001 - a lost engine: the store will say so
                            pass  # not cached: asked again next time
            except OSError:  # no room for even the probe in /dev/shm: ask next time
                pass
        return {eid for eid, ident in idents.items() if self._shm_ok.get(ident)}

    def _segment_key(self, stats: TransportStats):
        """The buffer key function of a broadcast to engines that map shared memory:
        a big buffer's key is an equal segment's (compared byte for byte, or made
        now); a smaller buffer, or one /dev/shm has no room for, is hashed."""
        if self._segments is None:
            self._segments = _shm.SegmentPool(self._uid)  # unlinks what is left at exit
        pool = self._segments
        memo: dict[int, Any] = {}

        def key(raw: memoryview) -> str:
            if raw.nbytes >= SHM_THRESHOLD:
                k, copied = pool.key_for(raw, memo)
                if k is not None:
                    stats.shm_bytes += copied
                    return k
            return _hash_key(raw)

        return key

    def _release_segments(self) -> None:
        """Unlink the segments that no engine holds any more (dropped, evicted, forgotten)."""
        if self._segments is not None and len(self._segments):
            self._segments.release(set().union(*self._have.values()))

    def _prune(self) -> None:
        """Forget engines that are gone from the client, so that their segments can go."""
        engines = getattr(self.client, "_engines", None)
        if not isinstance(engines, dict) or not engines:
            return
        current = set(engines.values())
        for table in (self._have, self._shm_ok):
            for ident in [i for i in table if i not in current and not isinstance(i, int)]:
                del table[ident]

    def forget(self) -> None:
        """Drop the kernel-side bookkeeping: the next broadcast sends everything again."""
        self._have.clear()
        self._shm_ok.clear()

    def close(self) -> None:
        """Unlink this transport's shared-memory segments and forget what engines hold.

        Engines keep the pages they mapped until they drop them or exit; a later
        broadcast works, and sends everything again."""
        if self._segments is not None:
            self._segments.close()
        self.forget()

    def _ident(self, eid: int) -> object:
        engines = getattr(self.client, "_engines", None) or {}
        return engines.get(eid, eid)  # the engine's uuid, where the client knows it
