"""The chunk channel: chunks to engines on the kernel's host without a task each.

An ipyparallel task costs an engine 2-5 ms between two chunks (the reply, its
status messages, the next request through the controller) and the kernel a
round trip before the first one starts; on two cores that was the 6-8 % that
kept ``%%parallel`` behind ``multiprocessing.Pool`` on CPU-bound loops.  So a
run on engines that share the kernel's host starts *one* ipyparallel task per
engine (:func:`parloop.backends.engines.worker.serve_chunks`, in the engine's main thread, so
SIGINT and the ``timeout=`` alarm work as for a task), and that task pulls its
chunks from this module's :class:`ChunkChannel` over a zmq socket bound to
127.0.0.1: a chunk costs one message each way (~0.1 ms).

Flow control is by credits: an engine says ``hello`` with two credits and
every result gives one back; a chunk waits in the kernel's queue until some
engine may take it, the idlest first, so the load balances as with a shared
queue.  An engine holds a second chunk, queued behind the running one, so it
never waits on the kernel between chunks (a round trip costs 0.5-1 ms here
when every core is busy) -- except in the run's tail, once the dispatcher has
no chunk left to hand out (:meth:`ChunkChannel.tail`): then a chunk goes only
to an idle engine, and the last chunks never wait behind a running one while
another engine sits idle (W1's 60 ms chunks lost up to 40 ms that way).

Messages are ``[kind, signature, body]``; the signature is an HMAC-SHA256 with a
key made for the run and handed to the engines inside their (authenticated)
ipyparallel task, so nothing else on the host can feed the kernel a pickle.
The engine pings when it hears nothing for a second and gives up when the
kernel stops answering: an engine is never left blocked by a kernel that died.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import zmq

#: chunks an engine holds at once: one running, one waiting on it
CREDITS = 2
#: seconds without a message before an engine pings the kernel
PING_AFTER = 1.0
#: pings without an answer before an engine gives up on the run
MISSED_PINGS = 3

HELLO, CHUNK, RESULT, STOP, PING, PONG = b"hello", b"chunk", b"result", b"stop", b"ping", b"pong"
_SEQ = struct.Struct("<Q")


def sign(key: bytes, kind: bytes, body: bytes | memoryview) -> bytes:
    mac = hmac.new(key, kind, hashlib.sha256)
    mac.update(body)
    return mac.digest()


def send(
    sock: zmq.Socket, key: bytes, kind: bytes, body: bytes = b"", prefix: list | None = None
) -> None:
    sock.send_multipart([*(prefix or []), kind, sign(key, kind, body), body], copy=False)


def verified(key: bytes, frames: list) -> tuple[bytes, memoryview] | None:
    """``(kind, body)`` of a signed message, None for anything else."""
    if len(frames) != 3:
        return None
    kind, sig, body = (f.bytes if i < 2 else f.buffer for i, f in enumerate(frames))
    if not hmac.compare_digest(sig, sign(key, kind, body)):
        return None
    return kind, body


def pack(seq: int, payload: bytes) -> bytes:
    return _SEQ.pack(seq) + payload


def unpack(body: memoryview) -> tuple[int, memoryview]:
    return _SEQ.unpack_from(body)[0], body[_SEQ.size :]


@dataclass
class _Entry:
    seq: int
    start: int
    payload: bytes
    fut: Future
    retries: int
    engine: int | None = None


class ChunkChannel:
    """Kernel side: a queue of chunks, the engines' credits, and the thread
    that owns the socket (zmq sockets are single-threaded; every other thread
    talks to it through the queue and a wake-up pipe).

    One channel serves a client's runs one after the other (its socket and
    thread are made once: ~5 ms).  A run's serve tasks say hello under an
    identity that carries the run's number, so a task of an earlier run that
    is late is told to stop and never gets a chunk of this one.

    ``on_result(future, chunk start, engine, payload)`` turns a result into
    what the future holds (in this class's thread); ``on_retry(start)`` hears
    of a chunk sent again because its engine died.  Which engines are lost,
    and why, the backend decides: this class moves bytes and keeps count.
    """

    def __init__(self) -> None:
        self.key = os.urandom(32)
        ctx: Any = zmq.Context.instance()
        self._sock = ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        port = self._sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"tcp://127.0.0.1:{port}"
        self._lock = threading.Lock()
        self._run = 0
        self._active = False
        self._on_result: Callable[[Future, int, int, memoryview], None] | None = None
        self._on_retry: Callable[[int], None] | None = None
        self._queue: deque[_Entry] = deque()
        self._assigned: dict[int, _Entry] = {}  # seq -> entry on an engine
        self._credits: dict[int, int] = {}  # engine -> chunks it can take now
        self._cap: dict[int, int] = {}  # engine -> credits it said hello with
        self._engines: set[int] = set()  # engines of the run
        self._gone: set[int] = set()  # ... that left it
        self._to_stop: list[bytes] = []  # engines of ended runs, to be told
        self._seq = 0
        self._tail = False
        self._closing = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._loop, name="parloop-channel", daemon=True)
        self._thread.start()

    # -- called from the kernel's threads --------------------------------------
    def begin(
        self,
        engines: list[int],
        on_result: Callable[[Future, int, int, memoryview], None],
        on_retry: Callable[[int], None],
    ) -> int:
        """A new run on ``engines``; returns its number (for :meth:`ident`)."""
        with self._lock:
            self._run += 1
            self._active = True
            self._on_result, self._on_retry = on_result, on_retry
            self._queue.clear()
            self._assigned.clear()
            self._credits.clear()
            self._cap.clear()
            self._tail = False
            self._engines = set(engines)
            self._gone = set()
            return self._run

    def end(self) -> None:
        """The run is over: its engines are told to end their serve tasks.

        Who to tell is settled here, not in the socket's thread: the next run's
        :meth:`begin` may come first, and an engine left waiting would hold up
        that run's task on it until its ping (a second)."""
        with self._lock:
            self._active = False
            self._queue.clear()
            self._to_stop += [self.ident(self._run, e).encode() for e in self._credits]
        self._wake()

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._active = False
        self._wake()

    @staticmethod
    def ident(run: int, engine: int) -> str:
        return f"parloop-{run}-{engine}"

    def submit(self, start: int, payload: bytes, retries: int) -> Future:
        fut: Future = Future()
        with self._lock:
            self._seq += 1
            self._queue.append(_Entry(self._seq, start, payload, fut, retries))
        self._wake()
        return fut

    def tail(self) -> None:
        """No chunk will follow those submitted: from now on only idle engines get one."""
        with self._lock:
            self._tail = True
        self._wake()

    def in_flight(self) -> dict[int, tuple[int | None, int]]:
        """seq -> (engine, chunk start) of the chunks on engines now."""
        with self._lock:
            return {e.seq: (e.engine, e.start) for e in self._assigned.values()}

    def cancel_after(self, index: int, make_error: Callable[[int], BaseException]) -> None:
        """Queued chunks that start after ``index`` fail with ``make_error(start)``;
        those already on an engine run to their end (their results are ignored)."""
        with self._lock:
            doomed = [e for e in self._queue if e.start > index]
            self._queue = deque(e for e in self._queue if e.start <= index)
        for e in doomed:
            e.fut.set_exception(make_error(e.start))

    def engine_gone(
        self, run: int, engine: int, retry: bool, make_error: Callable[[int], BaseException]
    ) -> None:
        """The engine left run ``run``: its serve task ended, or its process died.

        With ``retry`` (a lost engine) its chunks go back to the front of the
        queue while their retries last; the others fail with
        ``make_error(start)``, and so does the queue once no engine is left."""
        with self._lock:
            if run != self._run or engine in self._gone or engine not in self._engines:
                return
            self._gone.add(engine)
            self._credits.pop(engine, None)
            mine = sorted(
                (e for e in self._assigned.values() if e.engine == engine),
                key=lambda e: e.start,
                reverse=True,
            )
            requeue, fail = [], []
            for e in mine:
                del self._assigned[e.seq]
                if retry and e.retries > 0:
                    e.retries -= 1
                    e.engine = None
                    requeue.append(e)
                    self._queue.appendleft(e)
                else:
                    fail.append(e)
            if self._engines <= self._gone:
                fail += list(self._queue)
                self._queue.clear()
                requeue = []
            on_retry = self._on_retry
        for e in requeue:
            if on_retry is not None:
                on_retry(e.start)
        for e in fail:
            e.fut.set_exception(make_error(e.start))
        self._wake()

    # -- the socket's thread ----------------------------------------------------
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending (or the pipe is closed)

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while True:
                events = dict(poller.poll(1000))
                if self._wake_r in events:
                    os.read(self._wake_r, 4096)
                if self._sock in events:
                    while True:
                        try:
                            frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(frames)
                with self._lock:
                    if self._closing:
                        return
                    to_stop, self._to_stop = self._to_stop, []
                for ident in to_stop:
                    self._send(ident, STOP)
                self._assign()
        finally:
            self._sock.close(0)
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _handle(self, frames: list) -> None:
        ident = frames[0].bytes
        msg = verified(self.key, frames[1:])
        if msg is None:
            return  # not from one of our engines: ignored
        kind, body = msg
        run, engine = _run_and_engine(ident)
        with self._lock:
            current = (
                run == self._run
                and self._active
                and engine in self._engines
                and engine not in self._gone
            )
            on_result = self._on_result
        if not current:
            if kind in (HELLO, PING):
                self._send(ident, STOP)  # an engine of an ended run (or a late one)
            return
        if kind == HELLO:
            with self._lock:
                self._cap[engine] = self._credits[engine] = int(bytes(body) or CREDITS)
        elif kind == PING:
            self._send(ident, PONG)
        elif kind == RESULT:
            seq, payload = unpack(body)
            with self._lock:
                entry = self._assigned.pop(seq, None)
                if engine in self._credits:
                    self._credits[engine] += 1
            self._assign()  # the engine's next chunk first, then the decoding
            if entry is not None and not entry.fut.done() and on_result is not None:
                on_result(entry.fut, entry.start, engine, payload)

    def _assign(self) -> None:
        while True:
            with self._lock:
                if not self._queue or not self._active:
                    return
                depth = 1 if self._tail else CREDITS
                ready = [
                    (c, -e) for e, c in self._credits.items() if c > 0 and self._cap[e] - c < depth
                ]
                if not ready:
                    return
                engine = -max(ready)[1]  # the idlest engine (most credits), lowest id first
                entry = self._queue.popleft()
                entry.engine = engine
                self._credits[engine] -= 1
                self._assigned[entry.seq] = entry
                ident = self.ident(self._run, engine).encode()
            if not self._send(ident, CHUNK, pack(entry.seq, entry.payload)):
                with self._lock:
                    self._assigned.pop(entry.seq, None)
                    entry.engine = None
                    self._queue.appendleft(entry)
                    self._credits.pop(engine, None)  # unreachable: its task will tell us why

    def _send(self, ident: bytes, kind: bytes, body: bytes = b"") -> bool:
        try:
            send(self._sock, self.key, kind, body, prefix=[ident])
            return True
        except zmq.ZMQError:
            return False  # the engine's socket is gone (EHOSTUNREACH)


def _run_and_engine(ident: bytes) -> tuple[int, int]:
    try:
        _, run, engine = ident.decode().split("-")
        return int(run), int(engine)
    except ValueError:
        return -1, -1
