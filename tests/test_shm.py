"""Big inputs through POSIX shared memory to the engines on the kernel's host
(parloop.backends.engines.shm, parloop.backends.engines.transport): one copy, read-only maps, never stale, no leaks."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import types

import pytest

ipp = pytest.importorskip("ipyparallel")
np = pytest.importorskip("numpy")

from helpers import engine_call as call  # noqa: E402
from parloop.backends.engines import shm  # noqa: E402
from parloop.backends.engines.cluster import MANAGER  # noqa: E402
from parloop.backends.engines.transport import SHM_THRESHOLD, Transport, loads  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not shm.AVAILABLE, reason="no POSIX shared memory in /dev/shm"),
    pytest.mark.cluster,
]

MB = 1_000_000


def mine(owner) -> list[str]:
    """The segments in /dev/shm of one Transport or SegmentPool of this process
    (other test modules' transports may hold some of their own)."""
    tag = owner._uid if isinstance(owner, Transport) else owner
    prefix = f"{shm.PREFIX}{os.getpid()}_{tag}_"
    return [n for n in shm.segments_of(os.getpid()) if n.startswith(prefix)]


def sha1(a) -> str:
    return hashlib.sha1(memoryview(a).cast("B")).hexdigest()


# Functions run on engines travel by value (engines cannot import this test module).
@ipp.interactive
def inspect_input(keys, name):
    """On an engine: (sha1, writeable, how a write fails, the mapping the data lies in)."""
    import hashlib

    from parloop.backends.engines import worker

    v = worker.engine_resolve(keys)[name]
    writes = []
    try:
        v[0] = 1
        writes.append("wrote")
    except (ValueError, TypeError) as e:
        writes.append(str(e))
    try:
        v.flags.writeable = True
        writes.append("made writeable")
    except ValueError as e:
        writes.append(str(e))
    addr = v.__array_interface__["data"][0]
    where = None
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= addr < hi:
                where = (parts[1], parts[-1] if len(parts) > 5 else "")
                break
    return (
        hashlib.sha1(memoryview(v).cast("B")).hexdigest(),
        bool(v.flags.writeable),
        writes,
        where,
    )


@ipp.interactive
def get(keys, name):
    from parloop.backends.engines import transport, worker

    return transport.dumps(worker.engine_resolve(keys)[name])


@ipp.interactive
def stored_keys():
    from parloop.backends.engines import worker

    return sorted(worker._STORE)


@pytest.fixture(scope="module")
def client():
    before = set(shm.segments_of(os.getpid()))
    c = MANAGER.client(processes=2)
    yield c
    MANAGER.stop()
    assert set(shm.segments_of(os.getpid())) <= before  # this module left none behind


@pytest.fixture
def tr(client):
    t = Transport(client)
    yield t
    t.close()
    assert mine(t) == []  # close() leaves nothing behind in /dev/shm


def check_on_engines(client, keys, name, arr, *, mapped=True):
    for eid in client.ids:
        digest, writeable, writes, where = client[eid].apply_sync(inspect_input, keys, name)
        assert digest == sha1(arr)
        assert writeable is False
        assert writes == [
            "assignment destination is read-only",
            "cannot set WRITEABLE flag to True of this array",
        ]
        if mapped:  # a zero-copy view of the kernel's segment, mapped read-only and shared
            perms, path = where
            assert perms == "r--s" and path.startswith("/dev/shm/" + shm.PREFIX), where
        else:
            assert shm.PREFIX not in (where or ("", ""))[1]


# -- tests -----------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_big_array_arrives_through_one_segment_read_only(client, tr):
    big = np.random.default_rng(0).random(50 * MB // 8)
    t0 = time.perf_counter()
    keys = tr.broadcast({"big": big}, client.ids)
    first = time.perf_counter() - t0
    s = tr.last
    assert s.shm_bytes == big.nbytes  # copied once, for both engines
    assert s.buffers_sent == 2 and s.shm_buffers == 2
    assert s.bytes < 10_000 and s.messages == 2  # only the small pickles over the sockets
    assert len(mine(tr)) == 1
    assert all(tr._shm_ok[tr._ident(eid)] for eid in client.ids)  # the probe's answer
    check_on_engines(client, keys, "big", big)

    # the next cell, unchanged: nothing sent, nothing copied
    t0 = time.perf_counter()
    keys = tr.broadcast({"big": big}, client.ids)
    second = time.perf_counter() - t0
    s = tr.last
    assert (s.messages, s.bytes, s.shm_bytes, s.buffers_sent, s.values_cached) == (0, 0, 0, 0, 2)
    assert len(mine(tr)) == 1
    print(
        f"\n50 MB to 2 engines through shared memory: first broadcast {first:.3f} s, "
        f"unchanged again {second:.3f} s"
    )
    check_on_engines(client, keys, "big", big)


@pytest.mark.timeout(180)
def test_big_array_changed_in_place_is_seen(client, tr):
    big = np.random.default_rng(1).random(20 * MB // 8)
    original = big.copy()
    tr.broadcast({"big": big}, client.ids)

    big[123_456] = -1.0  # one element, in place: same object, same size, same address
    keys = tr.broadcast({"big": big}, client.ids)
    assert tr.last.shm_bytes == big.nbytes and tr.last.shm_buffers == 2
    check_on_engines(client, keys, "big", big)

    big[-1] = 7.0  # the very last byte range: memcmp reads all of it
    keys = tr.broadcast({"big": big}, client.ids)
    assert tr.last.shm_bytes == big.nbytes
    check_on_engines(client, keys, "big", big)

    # back to an earlier content: that segment is still held (KEEP): no copy, nothing sent
    big[:] = original
    keys = tr.broadcast({"big": big}, client.ids)
    assert (tr.last.shm_bytes, tr.last.messages) == (0, 0)
    check_on_engines(client, keys, "big", original)


@pytest.mark.timeout(180)
def test_big_array_shuffled_in_place_is_seen(client, tr):
    big = np.arange(4 * MB, dtype=np.float64)
    tr.broadcast({"big": big}, client.ids)
    before = sha1(big)
    np.random.default_rng(2).shuffle(big)  # same bytes, other order
    assert sha1(big) != before
    keys = tr.broadcast({"big": big}, client.ids)
    assert tr.last.shm_bytes == big.nbytes
    check_on_engines(client, keys, "big", big)
    back = loads(client[client.ids[1]].apply_sync(get, keys, "big"))
    assert np.array_equal(back, big)


@pytest.mark.timeout(180)
def test_function_over_a_big_array_resends_only_the_pickle(client, tr):
    nb = types.ModuleType("__main__")
    exec(
        "import numpy as np\ntable = np.arange(1_000_000, dtype=np.int64)\nOFFSET = 1\n"
        "def lookup(i):\n    return int(table[i]) + OFFSET\n",
        nb.__dict__,
    )
    keys = tr.broadcast({"lookup": nb.lookup, "table": nb.table}, client.ids)
    assert tr.last.shm_bytes == 8 * MB and tr.last.shm_buffers == 2  # one segment, two values
    assert loads(client[client.ids[0]].apply_sync(call, keys, "lookup", 10)) == 11
    nb.OFFSET = 100
    keys = tr.broadcast({"lookup": nb.lookup, "table": nb.table}, client.ids)
    assert tr.last.values_sent == 2 and tr.last.buffers_sent == 0 and tr.last.shm_bytes == 0
    assert loads(client[client.ids[1]].apply_sync(call, keys, "lookup", 10)) == 110


@pytest.mark.timeout(180)
def test_small_buffers_and_bytes(client, tr):
    small = np.arange(SHM_THRESHOLD // 8 - 1, dtype=np.float64)  # just under: a frame
    blob = bytes(range(256)) * (SHM_THRESHOLD // 256)  # exactly the threshold: a segment
    keys = tr.broadcast({"small": small, "blob": blob}, client.ids)
    assert tr.last.shm_bytes == len(blob) and tr.last.shm_buffers == 2
    assert tr.last.bytes >= 2 * small.nbytes
    back = loads(client[client.ids[0]].apply_sync(get, keys, "blob"))
    assert type(back) is bytes and back == blob
    check_on_engines(client, keys, "small", small, mapped=False)


@pytest.mark.timeout(180)
def test_engine_that_cannot_map_gets_frames(client, tr):
    """Mixed: engine 0 maps the segment, engine 1 is taken for one on another host."""
    e0, e1 = client.ids[:2]
    tr._shm_ok[tr._ident(e1)] = False  # as if its probe had failed
    big = np.random.default_rng(3).random(8 * MB // 8)
    keys = tr.broadcast({"big": big}, client.ids)
    s = tr.last
    assert s.shm_bytes == big.nbytes and s.shm_buffers == 1 and s.buffers_sent == 2
    assert big.nbytes <= s.bytes < big.nbytes + 10_000  # one engine's frame
    digest, writeable, _, where = client[e0].apply_sync(inspect_input, keys, "big")
    assert digest == sha1(big) and not writeable and where[1].startswith("/dev/shm/")
    digest, writeable, _, where = client[e1].apply_sync(inspect_input, keys, "big")
    assert digest == sha1(big) and not writeable and not where[1].startswith("/dev/shm/")
    tr.broadcast({"big": big}, client.ids)
    assert (tr.last.messages, tr.last.bytes, tr.last.shm_bytes) == (0, 0, 0)


@pytest.mark.timeout(180)
def test_shm_off_sends_frames_and_makes_no_segment(client):
    tr = Transport(client, shm=False)
    big = np.random.default_rng(4).random(4 * MB // 8)
    keys = tr.broadcast({"big": big}, client.ids)
    assert tr.last.shm_bytes == 0 and tr.last.shm_buffers == 0
    assert tr.last.bytes >= 2 * big.nbytes and mine(tr) == []
    check_on_engines(client, keys, "big", big, mapped=False)
    assert not any(tr._shm_ok.values())


@pytest.mark.timeout(180)
def test_probe_of_a_missing_segment_says_no(client):
    missing = shm.PREFIX + "no_such_segment"
    assert client[client.ids[0]].apply_sync(shm.engine_probe, missing, 16) is None
    with shm.probe_segment("t") as (name, token):
        assert client[client.ids[0]].apply_sync(shm.engine_probe, name, len(token)) == token
    assert mine("t") == []


@pytest.mark.timeout(180)
def test_segment_gone_before_an_engine_maps_it_is_sent_as_a_frame(client, tr):
    e0, e1 = client.ids[:2]
    big = np.random.default_rng(5).random(4 * MB // 8)
    tr.broadcast({"big": big}, [e0])
    assert tr.last.shm_bytes == big.nbytes
    [name] = mine(tr)
    os.unlink(os.path.join(shm.SHM_DIR, name))  # e.g. someone cleaned /dev/shm
    keys = tr.broadcast({"big": big}, [e0, e1])  # e1 is told to map it, and cannot
    s = tr.last
    assert s.shm_bytes == 0 and s.messages == 2 and s.bytes >= big.nbytes
    assert tr._shm_ok[tr._ident(e1)] is False and tr._shm_ok[tr._ident(e0)] is True
    assert client[e1].apply_sync(inspect_input, keys, "big")[0] == sha1(big)


@pytest.mark.timeout(180)
def test_evicted_segments_are_unlinked(client):
    tr = Transport(client, keep=2)
    try:
        big = np.random.default_rng(6).random(2 * MB // 8)
        keys = tr.broadcast({"big": big}, client.ids)
        key = keys["big"].split("@")[0]
        assert len(mine(tr)) == 1
        for i in range(3):
            tr.broadcast({"other": i}, client.ids)
        assert mine(tr) == []  # no engine holds it any more: unlinked
        assert key not in client[client.ids[0]].apply_sync(stored_keys)
        keys = tr.broadcast({"big": big}, client.ids)  # and back: a new segment
        assert tr.last.shm_bytes == big.nbytes and len(mine(tr)) == 1
        check_on_engines(client, keys, "big", big)
    finally:
        tr.close()
    assert mine(tr) == []


@pytest.mark.timeout(180)
def test_broadcast_after_close_sends_again(client, tr):
    big = np.random.default_rng(7).random(2 * MB // 8)
    tr.broadcast({"big": big}, client.ids)
    tr.close()
    assert mine(tr) == []
    keys = tr.broadcast({"big": big}, client.ids)
    assert tr.last.shm_bytes == big.nbytes and tr.last.shm_buffers == 2
    check_on_engines(client, keys, "big", big)


def test_segments_are_unlinked_at_interpreter_exit():
    code = (
        "import os\n"
        "from parloop.backends.engines import shm\n"
        "pool = shm.SegmentPool('exit')\n"
        "key, copied = pool.key_for(memoryview(bytes(2 << 20)))\n"
        "assert copied == 2 << 20 and shm.segments_of(os.getpid()) == [key[1:]]\n"
        "print(key[1:])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    name = out.stdout.strip()
    assert name.startswith(shm.PREFIX) and not os.path.exists(os.path.join(shm.SHM_DIR, name))
    assert "leaked" not in out.stderr  # not left for the resource tracker to clean


def test_pool_compares_bytes_not_identity():
    pool = shm.SegmentPool("cmp")
    try:
        a = bytearray(os.urandom(SHM_THRESHOLD))
        k1, c1 = pool.key_for(memoryview(a))
        k2, c2 = pool.key_for(memoryview(bytes(a)))  # another object, same bytes
        assert (k2, c2) == (k1, 0) and c1 == len(a)
        a[-1] ^= 1
        k3, c3 = pool.key_for(memoryview(a))  # same object, one bit changed
        assert k3 != k1 and c3 == len(a)
        before = shm._fingerprint(memoryview(a))
        a[5000] ^= 1  # where the fingerprint does not look: memcmp tells
        assert shm._fingerprint(memoryview(a)) == before
        k4, c4 = pool.key_for(memoryview(a))
        assert k4 not in (k1, k3) and c4 == len(a)
        a[5000] ^= 1
        assert pool.key_for(memoryview(a)) == (k3, 0)
        assert pool.release({k3}) == 2 and len(pool) == 1
    finally:
        pool.close()
    assert mine("cmp") == []


def test_forked_child_leaves_the_parents_segments_alone():
    code = (
        "import os, sys\n"
        "from parloop.backends.engines import shm\n"
        "pool = shm.SegmentPool('fork')\n"
        "key, _ = pool.key_for(memoryview(bytes(2 << 20)))\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    sys.exit(0)\n"  # the child runs the exit hooks it inherited
        "os.waitpid(pid, 0)\n"
        "print(shm.segments_of(os.getpid()) == [key[1:]])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True"] and "leaked" not in out.stderr


def test_segments_of_a_killed_kernel_are_unlinked_by_the_resource_tracker():
    code = (
        "import os, signal\n"
        "from parloop.backends.engines import shm\n"
        "pool = shm.SegmentPool('kill')\n"
        "key, _ = pool.key_for(memoryview(bytes(2 << 20)))\n"
        "print(key[1:], flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    name = out.stdout.strip()
    assert name.startswith(shm.PREFIX), out.stderr
    deadline = time.monotonic() + 10
    while os.path.exists(os.path.join(shm.SHM_DIR, name)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(os.path.join(shm.SHM_DIR, name))


_NO_PROCESS_LEFT = r"""
import os, time, psutil
from IPython.core.interactiveshell import InteractiveShell
ip = InteractiveShell.instance()
ip.run_cell("%load_ext parloop")
ip.run_cell("import numpy as np\nbig = np.ones(1_000_000)")
res = ip.run_cell("%%parallel processes=2 progress=off\nout = {}\n"
                  "for i in range(4):\n    out[i] = float(big[i])")
assert res.success and ip.user_ns["out"] == {i: 1.0 for i in range(4)}
kids = [" ".join(c.cmdline()) for c in psutil.Process().children()]
print("during:", any("resource_tracker" in k for k in kids))
ip.run_cell("%unload_ext parloop")
time.sleep(0.5)
print("left:", [" ".join(c.cmdline())[:80] for c in psutil.Process().children(recursive=True)])
print("segments:", [n for n in os.listdir("/dev/shm") if n.startswith(f"parloop_{os.getpid()}_")])
"""


@pytest.mark.timeout(120)
def test_unload_leaves_no_process_and_no_segment():
    """The resource tracker that guards the segments against a kernel crash is
    a process of its own: started for them, it goes with %unload_ext (as the
    cluster does), and the probe alone never starts it."""
    out = subprocess.run(
        [sys.executable, "-c", _NO_PROCESS_LEFT], capture_output=True, text=True, timeout=110
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "during: True" in out.stdout, out.stdout
    assert "left: []" in out.stdout, out.stdout
    assert "segments: []" in out.stdout, out.stdout


@pytest.mark.timeout(60)
def test_small_inputs_do_not_probe(client):
    t = Transport(client)
    try:
        t.broadcast({"x": list(range(1000))}, client.ids)
        assert t._shm_ok == {}  # nothing big: no probe, no segment, no tracker
    finally:
        t.close()


_TWO_POOLS = r"""
import os, time
from parloop.backends.engines import shm
a, b = shm.SegmentPool("a"), shm.SegmentPool("b")
ka, _ = a.key_for(memoryview(b"x" * (2 << 20)))
kb, _ = b.key_for(memoryview(b"y" * (2 << 20)))
a.close()          # b still holds a segment: the tracker must stay
time.sleep(1.0)
print("b kept:", os.path.exists("/dev/shm/" + kb[1:]))
b.close()
print("b gone:", not os.path.exists("/dev/shm/" + kb[1:]))
"""


@pytest.mark.timeout(60)
def test_closing_one_pool_keeps_anothers_segments():
    """The resource tracker parloop started stops only when no pool holds a
    segment: stopping it unlinks every segment still registered with it."""
    out = subprocess.run(
        [sys.executable, "-c", _TWO_POOLS], capture_output=True, text=True, timeout=50
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "b kept: True" in out.stdout and "b gone: True" in out.stdout, out.stdout
