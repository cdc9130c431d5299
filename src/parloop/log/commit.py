"""Committing finished chunks into the notebook namespace, in iteration order:
replay the logs, write the output, keep the last values, bind the loop
variable to the kernel's own item, record errors (docs/design.md §3).

For loops whose iterations may depend on each other (shared objects, checked
privates) each iteration is committed on its own: one whose reads meet a
location an earlier iteration wrote (parloop.log.conflicts), or that its
worker could not run serially, is re-executed in the kernel on the committed
state instead; when conflicts dominate, the rest of the loop runs there."""

from __future__ import annotations

import ast
import bisect
import reprlib
from dataclasses import dataclass, field
from typing import Any, Callable

from ..analysis import LoopPlan
from ..record import ChunkRecord, IterationError, LastRun
from ..runtime import ChunkResult, LoopShape, run_chunk, write_parts
from ..tracking import DELETED, ApplyingLog
from .conflicts import Conflict, WriteSet
from .entries import CALL, PATH, SET_ATTR, SET_ITEM
from .locations import LENGTH, write_locations
from .replay import EntryFailed, replay, target_substitutions

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


#: below this many checked iterations the conflict rate says nothing yet
MIN_CHECKED = 4
#: conflict rate above which the rest of the loop runs serially in the kernel
SERIAL_RATE = 0.5


@dataclass
class Speculation:
    """What the commit of a loop with possible dependences needs: the shared
    objects, the write set of this run, and the chunk function compiled in
    the kernel (globals: the notebook namespace) to re-execute iterations."""

    shape: LoopShape
    kernel_fn: Callable
    on_error: str
    seed: int | None
    lock: Any
    originals: dict[str, Any]
    #: shared objects written through method calls (``model.fit(x)``): a copy
    #: per iteration (``private=``) would make such a loop parallel
    suggest: frozenset[str] = frozenset()
    #: outside names that share state (see analysis.namespace.alias_groups): name -> (group,
    #: every access whole)
    canon: dict[str, tuple[str, bool]] = field(default_factory=dict)
    writes: WriteSet = field(default_factory=WriteSet)

    def __post_init__(self) -> None:
        self.writes.canon = self.canon


class Committer:
    """Commits chunk results in iteration order: replays logs, writes output,
    keeps last values, and records errors."""

    def __init__(
        self,
        ns: dict[str, Any],
        targets: TargetBinder,
        record: LastRun,
        on_error: str,
        t0: float,
        synced: bool,
        spec: Speculation | None = None,
        quiet: frozenset[str] = frozenset(),
    ):
        self.spec = spec
        #: ``private=`` copies: the worker made their writes on its own copy
        #: and captured what they printed; replayed silently (log.replay)
        self.quiet = quiet
        #: the body's break ran in a committed iteration: nothing after it commits
        self.broke = False
        #: conflicts dominate: the rest of the loop runs serially in the kernel
        self.serial = False
        self.checked = 0
        #: called with a chunk's first iteration before that chunk and the rest
        #: run serially after hidden state (threads: stop them, put the
        #: watched objects back; see parloop.run._put_back)
        self.before_serial: Callable[[int], None] | None = None
        #: threads with watched objects: the parloop.fingerprint.Baseline a
        #: chunk waits for before it is committed (set by run._hidden_probe;
        #: see schedule.Dispatcher.vouched)
        self.baseline: Any = None
        self.synced = synced  # the log holds TARGET entries
        self.ns = ns
        self.targets = targets
        self.record = record
        self.on_error = on_error
        self.next = 0
        self.last_item: tuple[Any] | None = None
        self.snapshot: dict[str, Any] = {}
        self.t0 = t0

    @property
    def stopped(self) -> bool:
        return self.broke or self.serial

    def commit(self, chunk: Chunk, res: ChunkResult) -> None:
        """Apply one chunk (or its completed prefix); raises the iteration's
        exception when replaying an entry fails as it would have in serial."""
        if res.hidden and self.spec is not None:
            # hidden state: nothing of this chunk is trusted; it and the rest of
            # the loop run serially in the kernel, on the kernel's own objects
            if self.before_serial is not None:
                self.before_serial(chunk.start)
            self.serial = True
            rec = self.record
            rec.serial_from = chunk.start
            rec.hidden = res.hidden
            rec.reruns.extend(range(chunk.start, chunk.start + len(chunk.items)))
            self.run_direct(chunk.items, chunk.start)
            return
        if res.iters is not None and self.spec is not None:
            self._commit_iterations(chunk, res)
            return
        target_env = self._target_env(chunk)
        parts = _PartsWriter(res.parts)
        pos = 0
        while True:
            try:
                replay(
                    self.ns,
                    res.log,
                    target_env if self.synced else None,
                    pos,
                    flush=parts.upto,
                    quiet=self.quiet,
                )
                break
            except EntryFailed as failed:
                # an entry raised in the kernel (``out[k] = v`` on a list too
                # short): serial would have raised in that iteration
                n = max(bisect.bisect_right(res.marks, failed.pos) - 1, 0)
                err = self._settled(IterationError(chunk.start + n, failed.exc), chunk.items[n])
                if self.on_error == "raise":
                    parts.upto(len(res.parts))
                    self._finish_chunk(chunk, res, n + 1)
                    raise IterationFailed(err) from None
                self.record.errors.append(err)
                pos = res.marks[n + 1] if n + 1 < len(res.marks) else len(res.log)
        parts.upto(len(res.parts))
        self._finish_chunk(chunk, res, res.done)
        for err in res.errors:
            self.record.errors.append(self._settled(err, chunk.items[err.index - chunk.start]))
        if res.broke is not None:
            self._broke(chunk.start + res.broke)

    def _broke(self, index: int) -> None:
        self.broke = True
        self.record.broke_at = index

    # -- loops whose iterations may depend on each other ------------------------
    def _target_env(self, chunk: Chunk) -> Callable[[int], dict[str, Any]]:
        cache: dict[int, dict[str, Any]] = {}

        def env(n: int) -> dict[str, Any]:
            e = cache.get(n)
            if e is None:
                e = cache[n] = self.targets.bind(chunk.items[n])
            return e

        return env

    def _commit_iterations(self, chunk: Chunk, res: ChunkResult) -> None:
        spec = self.spec
        assert spec is not None and res.iters is not None
        it = res.iters
        shared = spec.shape.shared
        env = self._target_env(chunk) if self.synced else None
        subst = target_substitutions(res.log, env) if env is not None else {}
        parts = _PartsWriter(res.parts)
        nreads = len(it.reads)
        self.record.reads += nreads
        for n in range(res.done):
            index = chunk.start + n
            if self.serial:
                self.run_direct(chunk.items[n:], index)
                return
            self.checked += 1
            conflict: Conflict | str | None = None
            if n in it.needs_kernel:
                conflict = it.needs_kernel[n]
            elif it.rmarks:
                r0 = it.rmarks[n]
                r1 = it.rmarks[n + 1] if n + 1 < len(it.rmarks) else nreads
                if r1 > r0:
                    conflict = spec.writes.conflict(index, it.reads[r0:r1])
            m0 = res.marks[n]
            m1 = res.marks[n + 1] if n + 1 < len(res.marks) else len(res.log)
            err = it.failed.get(n)
            if conflict is None and spec.shape.same_key:
                conflict = self._same_key_conflict(index, res.log[m0:m1], err)
            if conflict is not None:
                self._conflict(index, conflict)
                self.run_direct([chunk.items[n]], index)
                if self.broke:
                    return
                if res.broke == n:
                    # the worker's run broke here, the kernel's did not: the
                    # rest of the chunk never ran on the worker
                    self.run_direct(chunk.items[n + 1 :], index + 1)
                    return
                continue
            if err is None or self.on_error != "skip":
                for e in res.log[m0:m1]:
                    if e[1] in shared and e[0] in (SET_ITEM, SET_ATTR, CALL, PATH):
                        spec.writes.add(e[1], write_locations(self.ns[e[1]], e), index)
                parts.done = it.pmarks[n]
                try:
                    with spec.lock:
                        replay(
                            self.ns, res.log, env, m0, m1, subst, flush=parts.upto, quiet=self.quiet
                        )
                except EntryFailed as failed:
                    err = IterationError(index, failed.exc)
            parts.done = max(parts.done, it.pmarks[n])
            parts.upto(it.pmarks[n + 1] if n + 1 < len(it.pmarks) else len(res.parts))
            self._private_values(it.privates[n] if n < len(it.privates) else {})
            self.last_item = (chunk.items[n],)
            self.next = index + 1
            self.record.done = self.next
            if err is not None:
                self._failed(err, chunk.items[n])
            if res.broke == n:
                self._broke(index)
                break
        self.record.chunks.append(
            ChunkRecord(
                chunk.start,
                res.done,
                res.worker,
                res.t_start - self.t0,
                res.t_end - self.t0,
                res.cpu,
                sorted(chunk.start + k for k in it.failed),
            )
        )
        if res.halted and self.next < chunk.start + len(chunk.items) and not self.broke:
            raise KeyboardInterrupt

    def _same_key_conflict(self, index: int, entries: list, err: Any) -> Conflict | str | None:
        """Same-key objects record no reads: the key an iteration writes is
        the one it read, so it conflicts when an earlier iteration wrote that
        key.  One that raised may have read before it could write: the kernel
        runs it again (the error, if real, comes back there)."""
        spec = self.spec
        assert spec is not None
        same = spec.shape.same_key
        if err is not None:
            return "raised, and may have read a key an earlier iteration wrote"
        for e in entries:
            if e[1] in same and e[0] in (SET_ITEM, PATH):
                reads = [(e[1], loc) for loc in write_locations(self.ns[e[1]], e) if loc != LENGTH]
                found = spec.writes.conflict(index, reads)
                if found is not None:
                    return found
        return None

    def _settled(self, err: IterationError, item: Any) -> IterationError:
        """The failure as the kernel knows it: with the iteration's values."""
        return err.settle(self.targets.describe(item))

    def _failed(self, err: IterationError, item: Any) -> None:
        err = self._settled(err, item)
        if self.on_error == "raise":
            raise IterationFailed(err)
        self.record.errors.append(err)

    def _private_values(self, values: dict[str, Any]) -> None:
        self.snapshot.update(values)

    def _conflict(self, index: int, conflict: Conflict | str) -> None:
        rec = self.record
        rec.reruns.append(index)
        text = (
            conflict.describe()
            if isinstance(conflict, Conflict)
            else f"iteration {index} {conflict}"
        )
        rec.conflicts.append(text)
        if not rec.hint and self.spec is not None:
            for name in sorted(self.spec.suggest):
                if f"`{name}" in text:
                    rec.hint = (
                        f"`private={name}` would give each iteration its own copy "
                        f"of `{name}` and let the loop run in parallel"
                    )
        conflicts = len(rec.reruns)
        if (
            self.checked >= MIN_CHECKED
            and conflicts > SERIAL_RATE * self.checked
            and not self.serial
        ):
            self.serial = True
            rec.serial_from = index + 1

    def private_init(self) -> dict[str, Any]:
        """The checked privates' values as serial execution has them now."""
        assert self.spec is not None
        out: dict[str, Any] = {}
        for name in self.spec.shape.checked:
            v = self.snapshot.get(name, self.ns.get(name, DELETED))
            if v is not DELETED:
                out[name] = v
        return out

    def run_direct(self, items: list, start: int) -> None:
        """Execute iterations ``start...`` in the kernel on the committed
        state, as serial execution would (writes applied at once, the
        locations of shared objects they write recorded for the iterations
        after them)."""
        spec = self.spec
        if spec is None or not items:
            return
        log = ApplyingLog(self.ns, spec.shape.shared, spec.writes, spec.lock)
        log.index = start
        res = run_chunk(
            spec.kernel_fn,
            list(items),
            start,
            spec.on_error,
            spec.shape.private,
            spec.seed,
            worker="kernel",
            shape=spec.shape,
            direct=log,
            init=self.private_init(),
            originals=spec.originals,
        )
        write_parts(res.parts)
        if res.iters is not None:
            for values in res.iters.privates[: res.done]:
                self._private_values(values)
        elif res.done:
            self._private_values(res.snapshot)
        if res.done:
            self.last_item = (items[res.done - 1],)
        self.next = start + res.done
        self.record.done = self.next
        self.record.chunks.append(
            ChunkRecord(
                start,
                res.done,
                "kernel",
                res.t_start - self.t0,
                res.t_end - self.t0,
                res.cpu,
                [e.index for e in res.errors] + ([res.raised.index] if res.raised else []),
            )
        )
        for e in res.errors:
            self.record.errors.append(self._settled(e, items[e.index - start]))
        if res.raised is not None:
            if res.raised.snapshot:
                self._private_values(res.raised.snapshot)
            raise IterationFailed(self._settled(res.raised, items[res.raised.index - start]))
        if res.broke is not None:
            self._broke(start + res.broke)
        elif res.halted:
            raise KeyboardInterrupt

    def _finish_chunk(self, chunk: Chunk, res: ChunkResult, done: int) -> None:
        self.snapshot.update(res.snapshot)
        if done > 0:
            self.last_item = (chunk.items[done - 1],)
        self.next = chunk.start + done
        self.record.done = self.next
        self.record.chunks.append(
            ChunkRecord(
                chunk.start,
                done,
                res.worker,
                res.t_start - self.t0,
                res.t_end - self.t0,
                res.cpu,
                [e.index for e in res.errors] + ([res.raised.index] if res.raised else []),
            )
        )

    def finish(self) -> None:
        """Bind the loop variables and the private names' last values (a
        private whose last word was ``del`` ends unbound, as in serial)."""
        if self.last_item is not None:
            self.ns.update(self.targets.bind(self.last_item[0]))
        for name, value in self.snapshot.items():
            if value is DELETED:
                self.ns.pop(name, None)
            else:
                self.ns[name] = value


class Interrupted(KeyboardInterrupt):
    """A run stopped by the kernel interrupt; says how far it got.  A
    KeyboardInterrupt, so nothing that catches those is surprised."""

    def _render_traceback_(self) -> list[str]:
        return [f"KeyboardInterrupt: {self}"]


class IterationFailed(Exception):
    """An iteration failed under on_error=raise: the run ends with it."""

    def __init__(self, error: IterationError):
        self.error = error


class _PartsWriter:
    """Writes a chunk's captured output in order, up to a given part, so
    that a FLUSH entry puts the output of a call replayed in the kernel
    (``plt.show()``) after what the iteration printed before it."""

    __slots__ = ("parts", "done")

    def __init__(self, parts: list[str]) -> None:
        self.parts = parts
        self.done = 0

    def upto(self, k: int) -> None:
        if k > self.done:
            write_parts(self.parts[self.done : k])
            self.done = k
