"""Loop bodies that await: each iteration an asyncio task under %%threaded.

Differential (the serial cell uses IPython's top-level await), a real HTTP
server on 127.0.0.1 fetched 500 times, interrupt, and the %%parallel refusal.
"""

from __future__ import annotations

import _thread
import http.server
import threading
import time

import pytest

from helpers import differential, reset, run_cell, run_cell_result

MAGICS = [
    "%%threaded progress=off",
    "%%threaded tasks=7 progress=off",
    "%%threaded tasks=3 chunksize=2 progress=off",
    "%%threaded serial progress=off",
]

CASES = [
    (
        "sleep_dict",
        "import asyncio\nout = {}",
        """
for i in range(30):
    await asyncio.sleep(((i * 37) % 11) / 4000)
    out[i] = i * i
""",
        "out i",
    ),
    (
        "append_reduce_print",
        "import asyncio\nlog = []\ntotal = 0\ns = ''",
        """
for i in range(25):
    await asyncio.sleep(((i * 7) % 5) / 2000)
    log.append(i)
    total += i
    s += str(i)
    print("it", i)
""",
        "log total s i",
    ),
    (
        "async_generator_iterable",
        """
import asyncio
async def agen(n):
    for k in range(n):
        await asyncio.sleep(0)
        yield k * 3
res = {}
""",
        """
async for v in agen(20):
    await asyncio.sleep(((v * 37) % 11) / 4000)
    res[v] = v + 1
""",
        "res v",
    ),
    (
        "async_with_and_inner_async_for",
        """
import asyncio, contextlib
@contextlib.asynccontextmanager
async def opened(k):
    await asyncio.sleep(0)
    yield k * 2
async def agen(n):
    for k in range(n):
        yield k
res = {}
""",
        """
for i in range(12):
    async with opened(i) as v:
        acc = 0
        async for k in agen(i):
            acc += k
        res[i] = (v, acc)
""",
        "res i v acc",
    ),
    (
        "continue_and_private_names",
        "import asyncio\nres = {}",
        """
for i in range(20):
    await asyncio.sleep(0)
    if i % 3 == 0:
        continue
    y = i * 10
    res[i] = y
""",
        "res i y",
    ),
]


@pytest.mark.parametrize("magic", MAGICS)
@pytest.mark.parametrize("name, setup, cell, checks", CASES, ids=[c[0] for c in CASES])
def test_async_differential(ip, name, setup, cell, checks, magic):
    differential(ip, setup, cell, magic, checks.split())


def test_async_exception_state_as_serial(ip):
    setup = "import asyncio\nres = {}\nclass Bad(Exception):\n    pass"
    cell = """
for i in range(30):
    await asyncio.sleep(((i * 37) % 11) / 4000)
    if i == 13:
        raise Bad(i)
    res[i] = i
"""
    reset(ip)
    run_cell(ip, setup)
    out, err = run_cell(ip, "%%threaded tasks=8 progress=off\n" + cell)
    assert type(err).__name__ == "Bad"
    assert any("iteration 13" in n for n in err.__notes__)
    assert ip.user_ns["res"] == {k: k for k in range(13)}
    assert ip.user_ns["i"] == 13


def test_parallel_rejects_awaiting_loops(ip):
    reset(ip)
    run_cell(ip, "import asyncio\nres = {}")
    out, err = run_cell(
        ip,
        "%%parallel progress=off\npre = 1\nfor i in range(3):\n"
        "    await asyncio.sleep(0)\n    res[i] = i\n",
    )
    import parloop

    assert isinstance(err, parloop.LoopAnalysisError)
    assert "%%threaded" in str(err)
    assert "pre" not in ip.user_ns and ip.user_ns["res"] == {}


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the stdlib's name
        n = int(self.path.strip("/"))
        body = f"page {n} squared {n * n}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


FETCH = """
import asyncio
async def fetch(port, n):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /{n} HTTP/1.0\\r\\nHost: 127.0.0.1\\r\\n\\r\\n".encode())
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return data.split(b"\\r\\n\\r\\n", 1)[1].decode()
pages = {}
order = []
"""


@pytest.mark.timeout(120)
def test_500_fetches_from_a_local_http_server(ip, http_server):
    reset(ip)
    run_cell(ip, FETCH + f"PORT = {http_server}")
    out, err = run_cell(
        ip,
        "%%threaded tasks=50 progress=off\nfor n in range(500):\n"
        "    pages[n] = await fetch(PORT, n)\n    order.append(n)\n",
    )
    assert err is None
    assert ip.user_ns["pages"] == {n: f"page {n} squared {n * n}" for n in range(500)}
    assert list(ip.user_ns["pages"]) == list(range(500))
    assert ip.user_ns["order"] == list(range(500))
    import parloop

    assert parloop.last_run.threads["peak_in_flight"] > 1


@pytest.mark.timeout(60)
def test_interrupt_cancels_pending_tasks(ip, capfd):
    reset(ip)
    run_cell(ip, "import asyncio\nres = {}")
    timer = threading.Timer(0.5, _thread.interrupt_main)
    timer.start()
    t0 = time.perf_counter()
    _, res = run_cell_result(
        ip,
        "%%threaded tasks=4 progress=off\nfor i in range(400):\n"
        "    await asyncio.sleep(0.05)\n    res[i] = i\n",
    )
    elapsed = time.perf_counter() - t0
    timer.cancel()
    assert isinstance(res.error_in_exec, KeyboardInterrupt)
    assert elapsed < 0.5 + 1.5
    got = ip.user_ns["res"]
    assert 0 < len(got) < 400 and sorted(got) == list(range(len(got)))
    assert ip.user_ns["i"] == len(got) - 1
    time.sleep(0.2)
    assert "Task was destroyed" not in capfd.readouterr().err
    out, err = run_cell(
        ip,
        "%%threaded progress=off\nfor i in range(10):\n"
        "    await asyncio.sleep(0)\n    res[i] = -i\n",
    )
    assert err is None and ip.user_ns["res"][9] == -9
