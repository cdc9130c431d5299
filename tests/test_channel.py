"""The chunk channel (parloop.backends.engines.channel) on its own: the kernel side against the
real engine side (EngineLink) in threads of this process -- flow control,
signatures, runs that follow each other, lost engines, a kernel that vanishes.
The whole path through engines is tested in test_parallel.py."""

from __future__ import annotations

import threading
import time
from concurrent.futures import wait

import pytest
import zmq

from parloop.backends.engines import channel as ch
from parloop.backends.engines.channel import ChunkChannel
from parloop.backends.engines.worker import EngineLink


class Engines:
    """Engine links served by threads: each echoes ``payload`` back after
    ``delay`` seconds, and records what it got."""

    def __init__(self, chan: ChunkChannel, run: int, ids: list[int], delay: float = 0.0):
        self.got: dict[int, list[int]] = {i: [] for i in ids}
        self.held: dict[int, int] = {i: 0 for i in ids}
        self.threads = [
            threading.Thread(target=self._serve, args=(chan, run, i, delay), daemon=True)
            for i in ids
        ]
        self.ended: dict[int, str] = {}
        for t in self.threads:
            t.start()

    def _serve(self, chan: ChunkChannel, run: int, eid: int, delay: float) -> None:
        link = EngineLink(chan.address, chan.key, chan.ident(run, eid))
        try:
            while True:
                got = link.next_chunk()
                if got is None:
                    self.ended[eid] = "stopped"
                    return
                seq, payload = got
                self.got[eid].append(int(bytes(payload)))
                time.sleep(delay)
                link.result(seq, bytes(payload))
        finally:
            link.close()

    def join(self, timeout: float = 10.0) -> None:
        for t in self.threads:
            t.join(timeout)


def collector():
    results: dict[int, tuple[int, bytes]] = {}

    def on_result(fut, start, engine, payload):
        results[start] = (engine, bytes(payload))
        fut.set_result(bytes(payload))

    return results, on_result


@pytest.fixture
def chan():
    c = ChunkChannel()
    yield c
    c.close()


@pytest.mark.timeout(30)
def test_chunks_round_trip_and_balance(chan):
    results, on_result = collector()
    run = chan.begin([0, 1], on_result, lambda s: None)
    engines = Engines(chan, run, [0, 1], delay=0.01)
    futs = [chan.submit(i, str(i).encode(), retries=1) for i in range(40)]
    done, _ = wait(futs, timeout=10)
    assert len(done) == 40
    assert [f.result() for f in futs] == [str(i).encode() for i in range(40)]
    # both engines worked, neither took everything
    assert len(engines.got[0]) >= 10 and len(engines.got[1]) >= 10
    chan.end()
    engines.join()
    assert engines.ended == {0: "stopped", 1: "stopped"}


@pytest.mark.timeout(30)
def test_an_engine_holds_at_most_two_chunks(chan):
    """Credits: with one slow engine, the queue waits in the kernel (so a
    lost engine loses at most two chunks, and a free engine takes the rest)."""
    results, on_result = collector()
    run = chan.begin([0], on_result, lambda s: None)
    futs = [chan.submit(i, str(i).encode(), retries=1) for i in range(6)]
    link = EngineLink(chan.address, chan.key, chan.ident(run, 0))
    try:
        first = link.next_chunk()
        second = link.next_chunk()
        assert first is not None and second is not None
        link.sock.setsockopt(zmq.RCVTIMEO, 300)
        assert link.sock.poll(300) == 0, "a third chunk came before a result went back"
        assert len(chan.in_flight()) == 2
        link.result(first[0], bytes(first[1]))
        third = link.next_chunk()
        assert third is not None and int(bytes(third[1])) == 2
        assert futs[0].result(timeout=5) == b"0"
    finally:
        chan.end()
        link.close()


@pytest.mark.timeout(30)
def test_unsigned_messages_are_ignored(chan):
    results, on_result = collector()
    run = chan.begin([0], on_result, lambda s: None)
    fut = chan.submit(0, b"0", retries=0)
    link = EngineLink(chan.address, chan.key, chan.ident(run, 0))
    try:
        seq, _ = link.next_chunk()
        forged = ch.pack(seq, b"forged")
        link.sock.send_multipart([ch.RESULT, b"x" * 32, forged])  # bad signature
        ch.send(link.sock, b"k" * 32, ch.RESULT, forged)  # another key
        time.sleep(0.3)
        assert not fut.done()
        link.result(seq, b"genuine")
        assert fut.result(timeout=5) == b"genuine"
    finally:
        chan.end()
        link.close()


@pytest.mark.timeout(30)
def test_a_late_engine_of_an_earlier_run_is_told_to_stop(chan):
    results, on_result = collector()
    old = chan.begin([0], on_result, lambda s: None)
    chan.end()
    new = chan.begin([0], on_result, lambda s: None)
    fut = chan.submit(0, b"7", retries=0)
    late = EngineLink(chan.address, chan.key, chan.ident(old, 0))
    try:
        assert late.next_chunk() is None  # told to stop, got no chunk of the new run
    finally:
        late.close()
    assert not fut.done()
    engines = Engines(chan, new, [0])
    assert fut.result(timeout=5) == b"7"
    chan.end()
    engines.join()


@pytest.mark.timeout(30)
def test_lost_engine_chunks_are_retried_then_fail(chan):
    results, on_result = collector()
    retried: list[int] = []
    run = chan.begin([0, 1], on_result, retried.append)
    futs = [chan.submit(i, str(i).encode(), retries=1) for i in range(2)]
    doomed = EngineLink(chan.address, chan.key, chan.ident(run, 0))
    try:
        got = [doomed.next_chunk(), doomed.next_chunk()]  # engine 0 takes both
        assert all(g is not None for g in got)
        chan.engine_gone(run, 0, retry=True, make_error=lambda s: RuntimeError(f"lost {s}"))
        assert sorted(retried) == [0, 1]
        engines = Engines(chan, run, [1])  # engine 1 runs them again
        assert [f.result(timeout=5) for f in futs] == [b"0", b"1"]
        assert sorted(engines.got[1]) == [0, 1]
        # the last engine lost too: what is queued fails, nothing hangs
        more = chan.submit(2, b"2", retries=1)
        chan.engine_gone(run, 1, retry=True, make_error=lambda s: RuntimeError(f"lost {s}"))
        with pytest.raises(RuntimeError, match="lost 2"):
            more.result(timeout=5)
    finally:
        doomed.close()
        chan.end()


@pytest.mark.timeout(30)
def test_engine_gives_up_when_the_kernel_is_gone(monkeypatch):
    monkeypatch.setattr(ch, "PING_AFTER", 0.1)  # both ends read it there
    chan = ChunkChannel()
    run = chan.begin([0], lambda *a: None, lambda s: None)
    link = EngineLink(chan.address, chan.key, chan.ident(run, 0))
    chan.close()
    t0 = time.monotonic()
    try:
        assert link.next_chunk() is None
    finally:
        link.close()
    assert time.monotonic() - t0 < 2.0


@pytest.mark.timeout(30)
def test_cancel_after_fails_queued_chunks_only(chan):
    results, on_result = collector()
    run = chan.begin([0], on_result, lambda s: None)
    futs = [chan.submit(i, str(i).encode(), retries=0) for i in range(5)]
    link = EngineLink(chan.address, chan.key, chan.ident(run, 0))
    try:
        seq, _ = link.next_chunk()
        chan.cancel_after(2, lambda s: RuntimeError(f"cancelled {s}"))
        for i in (3, 4):
            with pytest.raises(RuntimeError, match=f"cancelled {i}"):
                futs[i].result(timeout=5)
        link.result(seq, b"0")
        assert futs[0].result(timeout=5) == b"0"
    finally:
        chan.end()
        link.close()


@pytest.mark.timeout(30)
def test_in_the_tail_only_idle_engines_get_a_chunk(chan):
    """Once the dispatcher has nothing more to hand out, an engine holds one
    chunk at a time: the last chunks never wait behind a running one while
    another engine is idle."""
    results, on_result = collector()
    run = chan.begin([0], on_result, lambda s: None)
    futs = [chan.submit(i, str(i).encode(), retries=0) for i in range(4)]
    link = EngineLink(chan.address, chan.key, chan.ident(run, 0))
    try:
        a, b = link.next_chunk(), link.next_chunk()  # in the bulk: two at a time
        chan.tail()
        link.result(a[0], bytes(a[1]))
        link.result(b[0], bytes(b[1]))
        c = link.next_chunk()
        assert c is not None
        assert link.sock.poll(300) == 0, "a chunk was queued behind the running one in the tail"
        link.result(c[0], bytes(c[1]))
        d = link.next_chunk()
        assert d is not None and int(bytes(d[1])) == 3
        link.result(d[0], bytes(d[1]))
        assert [f.result(timeout=5) for f in futs] == [b"0", b"1", b"2", b"3"]
    finally:
        chan.end()
        link.close()


@pytest.mark.timeout(30)
def test_engines_of_an_ended_run_stop_at_once_when_the_next_begins(chan):
    """end() then begin() at once (cells back to back): the first run's
    engines are told to stop right away, not after a ping a second later."""
    results, on_result = collector()
    run = chan.begin([0, 1], on_result, lambda s: None)
    engines = Engines(chan, run, [0, 1])
    futs = [chan.submit(i, str(i).encode(), retries=0) for i in range(4)]
    assert [f.result(timeout=5) for f in futs] == [b"0", b"1", b"2", b"3"]
    for _ in range(50):
        t0 = time.monotonic()
        chan.end()
        run = chan.begin([0, 1], on_result, lambda s: None)
        engines.join(timeout=0.5)
        assert engines.ended == {0: "stopped", 1: "stopped"}, engines.ended
        assert time.monotonic() - t0 < 0.5
        engines = Engines(chan, run, [0, 1])
        fut = chan.submit(0, b"9", retries=0)
        assert fut.result(timeout=5) == b"9"
    chan.end()
    engines.join()
