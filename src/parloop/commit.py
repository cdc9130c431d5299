"""Committing finished chunks into the notebook namespace, in iteration order:
replay the logs, write the output, keep the last values, bind the loop
variable to the kernel's own item, record errors (DESIGN §3)."""
from __future__ import annotations

import ast
import bisect
import reprlib
from dataclasses import dataclass
from typing import Any

from .analysis import LoopPlan
from .record import ChunkRecord, ErrorRecord, LastRun
from .replay import replay
from .runtime import ChunkResult, write_parts

_short = reprlib.Repr()
_short.maxstring = 40
_short.maxother = 40
_short.maxlist = 4
_short.maxdict = 4


class TargetBinder:
    """Binds the loop target in the kernel, from the kernel's own items, so the
    loop variable after the loop *is* the kernel's last item."""

    def __init__(self, plan: LoopPlan, filename: str, ns: dict[str, Any]):
        assign = ast.Assign(targets=[plan.loop.target], value=ast.Name("___item", ast.Load()))
        ast.copy_location(assign, plan.loop)
        ast.fix_missing_locations(assign)
        self.code = compile(ast.Module(body=[assign], type_ignores=[]), filename, "exec")
        self.ns = ns
        self.loop = plan.loop
        self.names = plan.targets

    def bind(self, item: Any) -> dict[str, Any]:
        env: dict[str, Any] = {"___item": item}
        exec(self.code, self.ns, env)
        del env["___item"]
        return env

    def describe(self, item: Any) -> str:
        try:
            env = self.bind(item)
        except Exception:  # noqa: BLE001 - a description must not fail
            return f"item={_short.repr(item)}"
        return ", ".join(f"{k}={_short.repr(env[k])}" for k in self.names if k in env)


@dataclass
class Chunk:
    start: int
    items: list


class Committer:
    """Commits chunk results in iteration order: replays logs, writes output,
    keeps last values, and records errors."""

    def __init__(self, ns: dict[str, Any], targets: TargetBinder, record: LastRun,
                 on_error: str, t0: float, synced: bool):
        self.synced = synced  # the log holds TARGET entries
        self.ns = ns
        self.targets = targets
        self.record = record
        self.on_error = on_error
        self.next = 0
        self.last_item: tuple[Any] | None = None
        self.snapshot: dict[str, Any] = {}
        self.t0 = t0

    def commit(self, chunk: Chunk, res: ChunkResult) -> None:
        """Apply one chunk (or its completed prefix); raises the iteration's
        exception when replaying an entry fails as it would have in serial."""
        env_cache: dict[int, dict[str, Any]] = {}

        def target_env(n: int) -> dict[str, Any]:
            env = env_cache.get(n)
            if env is None:
                env = env_cache[n] = self.targets.bind(chunk.items[n])
            return env

        pos = 0
        while True:
            try:
                replay(self.ns, res.log, target_env if self.synced else None, pos)
                break
            except Exception as exc:
                # an entry raised in the kernel (``out[k] = v`` on a list too
                # short): serial would have raised in that iteration
                at = getattr(exc, "parloop_log_pos", pos)
                n = max(bisect.bisect_right(res.marks, at) - 1, 0)
                if self.on_error == "raise":
                    write_parts(res.parts)
                    self._finish_chunk(chunk, res, n + 1)
                    raise IterationFailed(chunk.start + n, exc, chunk.items[n]) from None
                self.record.errors.append(ErrorRecord(
                    chunk.start + n, self.targets.describe(chunk.items[n]), exc))
                pos = res.marks[n + 1] if n + 1 < len(res.marks) else len(res.log)
        write_parts(res.parts)
        self._finish_chunk(chunk, res, res.done)
        for err in res.errors:
            item = chunk.items[err.index - chunk.start]
            self.record.errors.append(ErrorRecord(err.index, self.targets.describe(item),
                                                  err.exc))

    def _finish_chunk(self, chunk: Chunk, res: ChunkResult, done: int) -> None:
        self.snapshot.update(res.snapshot)
        if done > 0:
            self.last_item = (chunk.items[done - 1],)
        self.next = chunk.start + done
        self.record.done = self.next
        self.record.chunks.append(ChunkRecord(
            chunk.start, done, res.worker, res.t_start - self.t0, res.t_end - self.t0, res.cpu,
            [e.index for e in res.errors] + ([res.raised.index] if res.raised else [])))

    def finish(self) -> None:
        """Bind the loop variables and the private names' last values."""
        if self.last_item is not None:
            self.ns.update(self.targets.bind(self.last_item[0]))
        self.ns.update(self.snapshot)


class Interrupted(KeyboardInterrupt):
    """A run stopped by the kernel interrupt; says how far it got.  A
    KeyboardInterrupt, so nothing that catches those is surprised."""

    def _render_traceback_(self) -> list[str]:
        return [f"KeyboardInterrupt: {self}"]


class IterationFailed(Exception):
    def __init__(self, index: int, exc: BaseException, item: Any):
        self.index, self.exc, self.item = index, exc, item
