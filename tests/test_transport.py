"""Inputs by value: broadcast once per engine, cached, never stale (parloop.backends.engines.transport)."""

from __future__ import annotations

import hashlib
import io
import socket
import sys
import threading
import time
import types

import pytest

ipp = pytest.importorskip("ipyparallel")
np = pytest.importorskip("numpy")

from helpers import engine_call as call  # noqa: E402
from parloop.backends.engines.cluster import MANAGER  # noqa: E402
from parloop.backends.engines.transport import (  # noqa: E402
    Transport,
    TransportError,
    check_picklable,
    dumps,
    loads,
)
from parloop.errors import LoopAnalysisError  # noqa: E402


# -- helpers -------------------------------------------------------------------
def notebook(source: str) -> types.ModuleType:
    """A stand-in for the kernel's namespace: what cells define lives in a module named __main__."""
    mod = types.ModuleType("__main__")
    exec(compile(source, "<cell>", "exec"), mod.__dict__)
    return mod


# Functions run on engines travel by value (engines cannot import this test module).
@ipp.interactive
def describe(keys, name):
    import hashlib

    from parloop.backends.engines import worker

    v = worker.engine_resolve(keys)[name]
    return (
        type(v).__name__,
        v.shape,
        str(v.dtype),
        bool(v.flags.writeable),
        hashlib.sha1(memoryview(v).cast("B")).hexdigest(),
    )


@ipp.interactive
def get(keys, name):
    from parloop.backends.engines import transport, worker

    return transport.dumps(worker.engine_resolve(keys)[name])


@ipp.interactive
def append_to(keys, name, item):
    from parloop.backends.engines import worker

    v = worker.engine_resolve(keys)[name]
    v.append(item)
    return len(v)


@ipp.interactive
def stored_keys():
    from parloop.backends.engines import worker

    return sorted(worker._STORE)


@pytest.fixture(scope="module")
def client():
    c = MANAGER.client(processes=2)
    yield c
    MANAGER.stop()


@pytest.fixture
def tr(client):
    t = Transport(client)
    yield t
    t.close()


# -- tests -----------------------------------------------------------------------
@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_broadcast_sends_once(client, tr):
    nb = notebook("def f(x):\n    return x * 3\ndata = list(range(100))\n")
    values = {"f": nb.f, "data": nb.data}
    keys = tr.broadcast(values, client.ids)
    assert set(keys) == {"f", "data"}
    assert tr.last.messages == 2 and tr.last.values_sent == 4 and tr.last.bytes > 0

    keys2 = tr.broadcast(values, client.ids)
    assert tr.last.messages == 0 and tr.last.bytes == 0 and tr.last.values_sent == 0
    assert tr.last.values_cached == 4
    assert [k.split("@")[0] for k in keys2.values()] == [k.split("@")[0] for k in keys.values()]
    assert loads(client[client.ids[1]].apply_sync(call, keys2, "f", 14)) == 42
    assert tr.stats.broadcasts == 2 and tr.stats.messages == 2


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_changed_global_is_seen(client, tr):
    nb = notebook(
        "THRESHOLD = 10\ndef classify(x):\n    return 'big' if x > THRESHOLD else 'small'\n"
    )
    keys = tr.broadcast({"classify": nb.classify}, client.ids)
    assert loads(client[client.ids[0]].apply_sync(call, keys, "classify", 15)) == "big"
    nb.THRESHOLD = 25  # a later cell rebinds the global the function reads
    keys = tr.broadcast({"classify": nb.classify}, client.ids)
    assert tr.last.values_sent == 2
    assert loads(client[client.ids[0]].apply_sync(call, keys, "classify", 15)) == "small"
    # a function that is redefined, and data mutated in place, are re-sent too
    exec("def classify(x):\n    return 'other'\n", nb.__dict__)
    data = [1, 2]
    keys = tr.broadcast({"classify": nb.classify, "data": data}, client.ids)
    data.append(3)
    keys = tr.broadcast({"classify": nb.classify, "data": data}, client.ids)
    assert tr.last.values_sent == 2 and tr.last.values_cached == 2
    assert loads(client[client.ids[1]].apply_sync(get, keys, "data")) == [1, 2, 3]
    assert loads(client[client.ids[1]].apply_sync(call, keys, "classify", 15)) == "other"


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_large_array_arrives_intact_zero_copy_and_cached(client):
    # over the sockets, as to engines on other hosts (tests/test_shm.py: shared memory)
    tr = Transport(client, shm=False)
    big = np.random.default_rng(0).random(50_000_000 // 8)  # 50 MB
    digest = hashlib.sha1(memoryview(big).cast("B")).hexdigest()
    t0 = time.perf_counter()
    keys = tr.broadcast({"big": big}, client.ids)
    first = time.perf_counter() - t0
    assert tr.last.buffers_sent == 2 and tr.last.bytes >= 2 * big.nbytes
    assert tr.last.shm_buffers == 0 and tr.last.shm_bytes == 0
    for eid in client.ids:
        kind, shape, dtype, writeable, d = client[eid].apply_sync(describe, keys, "big")
        assert (kind, shape, dtype, d) == ("ndarray", big.shape, "float64", digest)
        assert writeable is False  # a read-only view of the received frame
    t0 = time.perf_counter()
    keys = tr.broadcast({"big": big}, client.ids)
    second = time.perf_counter() - t0
    assert tr.last.bytes == 0 and tr.last.messages == 0
    print(f"\n50 MB to 2 engines: first broadcast {first:.3f} s, unchanged again {second:.3f} s")

    # a changed element is a new value: never stale
    big[12345] = -1.0
    keys = tr.broadcast({"big": big}, client.ids)
    assert tr.last.buffers_sent == 2
    assert (
        client[client.ids[0]].apply_sync(describe, keys, "big")[4]
        == hashlib.sha1(memoryview(big).cast("B")).hexdigest()
    )


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_big_buffer_inside_a_function_is_not_resent(client, tr):
    nb = notebook(
        "import numpy as np\n"
        "table = np.arange(1_000_000, dtype=np.int64)\n"
        "OFFSET = 1\n"
        "def lookup(i):\n"
        "    return int(table[i]) + OFFSET\n"
    )
    keys = tr.broadcast({"lookup": nb.lookup, "table": nb.table}, client.ids)
    assert tr.last.buffers_sent == 2  # one 8 MB buffer per engine, though two values hold it
    assert loads(client[client.ids[0]].apply_sync(call, keys, "lookup", 10)) == 11
    nb.OFFSET = 100
    keys = tr.broadcast({"lookup": nb.lookup, "table": nb.table}, client.ids)
    assert tr.last.values_sent == 2 and tr.last.buffers_sent == 0
    assert tr.last.bytes < 10_000
    assert loads(client[client.ids[0]].apply_sync(call, keys, "lookup", 10)) == 110


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_bytes_travel_out_of_band_and_stay_bytes(client, tr):
    blob = bytes(range(256)) * 4096  # 1 MB
    keys = tr.broadcast({"blob": blob}, client.ids)
    assert tr.last.buffers_sent == 2
    back = loads(client[client.ids[0]].apply_sync(get, keys, "blob"))
    assert type(back) is bytes and back == blob


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_cell_classes_round_trip_as_the_kernel_classes(client, tr):
    nb = notebook(
        "from dataclasses import dataclass\n"
        "SCALE = 2\n"
        "@dataclass\n"
        "class Point:\n"
        "    x: int\n"
        "    y: int\n"
        "    def scaled(self):\n"
        "        return self.x * SCALE\n"
        "class Tag:\n"
        "    def __init__(self, text):\n"
        "        self.text = text\n"
        "class CellError(Exception):\n"
        "    pass\n"
        "def make(i):\n"
        "    return [Point(i, i * i), Tag(str(i)), CellError(i)]\n"
    )
    scaled = nb.Point.scaled
    keys = tr.broadcast({"make": nb.make}, client.ids)
    point, tag, err = loads(client[client.ids[1]].apply_sync(call, keys, "make", 3))
    assert type(point) is nb.Point and point == nb.Point(3, 9)
    assert type(tag) is nb.Tag and tag.text == "3"
    assert type(err) is nb.CellError and isinstance(err, Exception)
    # the kernel's class itself is untouched (its methods still read the notebook's globals)
    assert nb.Point.scaled is scaled
    nb.SCALE = 10
    assert point.scaled() == 30


def test_loads_leaves_kernel_classes_alone_where_pickle_loads_does_not():
    import pickle

    import cloudpickle

    nb = notebook("SCALE = 2\nclass C:\n    def f(self):\n        return SCALE\n")
    stream = cloudpickle.dumps(nb.C())  # e.g. what an engine sends back
    f = nb.C.f
    assert type(loads(stream)) is nb.C and nb.C.f is f
    assert type(pickle.loads(stream)) is nb.C
    assert nb.C.f is not f  # cloudpickle overwrote the kernel's method with a copy ...
    nb.SCALE = 3
    assert nb.C().f() == 2  # ... that no longer sees the notebook's globals


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_each_cell_starts_from_the_kernel_values(client, tr):
    items = [1, 2]
    eid = client.ids[0]
    keys = tr.broadcast({"items": items}, [eid])
    assert client[eid].apply_sync(append_to, keys, "items", 3) == 3
    assert client[eid].apply_sync(append_to, keys, "items", 4) == 4  # shared within a cell
    keys = tr.broadcast({"items": items}, [eid])  # the next cell: nothing re-sent ...
    assert tr.last.bytes == 0
    assert client[eid].apply_sync(append_to, keys, "items", 3) == 3  # ... but a fresh copy
    assert items == [1, 2]


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_unused_values_are_evicted(client):
    tr = Transport(client, keep=2)
    eid = client.ids[1]
    old = {"payload": "x" * 100_000}
    keys = tr.broadcast(old, [eid])
    key = keys["payload"].split("@")[0]
    assert key in client[eid].apply_sync(stored_keys)
    for i in range(3):
        tr.broadcast({"other": i}, [eid])
    assert key not in client[eid].apply_sync(stored_keys)
    assert tr.stats.evicted >= 1
    # coming back after eviction sends it again
    keys = tr.broadcast(old, [eid])
    assert tr.last.values_sent == 1
    assert loads(client[eid].apply_sync(get, keys, "payload")) == old["payload"]


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_forget_resends(client, tr):
    tr.broadcast({"v": 1}, client.ids)
    tr.forget()
    tr.broadcast({"v": 1}, client.ids)
    assert tr.last.values_sent == 2


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_value_an_engine_cannot_load_is_named(client, tr, tmp_path, monkeypatch):
    # a module only the kernel can import (its directory is on the kernel's sys.path only)
    (tmp_path / "kernel_only_mod.py").write_text("class Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import kernel_only_mod

    with pytest.raises(TransportError, match="thing") as info:
        tr.broadcast({"thing": kernel_only_mod.Thing()}, client.ids)
    assert info.value.name == "thing" and "kernel_only_mod" in str(info.value)
    with pytest.raises(TransportError, match="thing"):  # not taken for present next time
        tr.broadcast({"thing": kernel_only_mod.Thing()}, client.ids)


def _unpicklable_values():
    lock = threading.Lock()
    nb = notebook("def work(i):\n    with tally_lock:\n        return i\n")
    nb.tally_lock = lock
    fh = open(__file__)
    sock = socket.socket()
    return {
        "tally_lock": (lock, "tally_lock"),
        "work": (nb.work, "tally_lock"),
        "gen": ((i for i in range(3)), "generator"),
        "fh": (fh, "open file"),
        "sock": (sock, "socket"),
        "nested": ({"a": [1, lock]}, "lock"),
    }


@pytest.mark.parametrize("name", ["tally_lock", "work", "gen", "fh", "sock", "nested"])
def test_unpicklable_value_is_named(name):
    values = _unpicklable_values()
    value, mention = values[name]
    with pytest.raises(LoopAnalysisError) as info:
        check_picklable({"ok": 1, name: value, "later": threading.Lock()})
    err = info.value
    assert isinstance(err, ValueError) and err.name == name
    msg = str(err)
    assert repr(name) in msg and mention in msg and "%%threaded" in msg and "inside the loop" in msg
    for v, _ in values.values():
        if hasattr(v, "close"):
            v.close()


def test_check_picklable_lineno_and_harmless_values():
    with pytest.raises(LoopAnalysisError, match="^line 7: "):
        check_picklable({"lk": threading.Lock()}, linenos={"lk": 7})
    check_picklable({"out": sys.stdout, "buf": io.BytesIO(b"x"), "f": len, "m": np, "n": None})


def test_check_picklable_is_cheap_for_large_arrays():
    big = np.zeros(25_000_000)  # 200 MB
    t0 = time.perf_counter()
    check_picklable({"big": big, "also": {"inner": big}, "t": (big, big)})
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.cluster
@pytest.mark.timeout(180)
def test_broadcast_rejects_unpicklable_before_sending(client, tr):
    with pytest.raises(LoopAnalysisError) as info:
        tr.broadcast({"fine": 1, "tally_lock": threading.Lock()}, client.ids)
    assert info.value.name == "tally_lock"
    assert tr.stats.messages == 0


def test_dumps_loads_roundtrip_big_buffers():
    arr = np.arange(100_000, dtype=np.float32)
    frames = dumps({"a": arr, "n": 1})
    assert len(frames) == 2  # the array's buffer is a frame of its own
    back = loads(frames)
    assert back["n"] == 1 and np.array_equal(back["a"], arr)
