"""The commit side of the run-time dependence test: which locations of the
shared objects the committed iterations of this run wrote, and whether an
iteration's recorded reads meet one of them.

An iteration's reads were made against the snapshot its worker saw (engines:
the inputs as broadcast when the run began; threads: the kernel's objects,
which commits change meanwhile).  Either way, when no earlier iteration of
this run wrote a location it read, the value it read is the value serial
execution would have shown it; when one did, it is re-executed in the kernel
on the committed state (conservative under threads, where the write may
already have been visible: a needless re-run, never a wrong answer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from .locations import ATTR, ITEM, LENGTH, WHOLE


@dataclass
class Conflict:
    """Iteration ``index`` read ``name`` at ``location``, which iteration
    ``writer`` (earlier, same run) wrote."""

    index: int
    name: str
    location: tuple
    writer: int

    def describe(self) -> str:
        return (
            f"iteration {self.index} reads {describe_location(self.name, self.location)}, "
            f"written by iteration {self.writer}"
        )


def describe_location(name: str, loc: tuple) -> str:
    if loc is WHOLE or loc == WHOLE:
        return f"`{name}` as a whole"
    if loc == LENGTH:
        return f"`len({name})`"
    if loc[0] == ITEM:
        return f"`{name}[{loc[1]!r}]`"
    if loc[0] == ATTR:
        return f"`{name}.{loc[1]}`"
    return f"`{name}`"


class WriteSet:
    """name -> {location: the last iteration that wrote it}, for the
    committed iterations of one run."""

    def __init__(self) -> None:
        self.locations: dict[str, dict[tuple, int]] = {}
        #: name -> the last iteration that wrote the object as a whole
        self.whole: dict[str, int] = {}
        #: names that share state with others: name -> (group, whole only)
        self.canon: dict[str, tuple[str, bool]] = {}

    def _key(self, name: str, loc: tuple) -> tuple[str, tuple]:
        c = self.canon.get(name)
        if c is None:
            return name, loc
        return c[0], (WHOLE if c[1] else loc)

    def add(self, name: str, locs: Iterable[tuple], writer: int) -> None:
        if self.canon and name in self.canon:
            name, whole = self.canon[name]
            if whole:
                locs = (WHOLE,)
        for loc in locs:
            if loc == WHOLE:
                self.whole[name] = writer
            else:
                self.locations.setdefault(name, {})[loc] = writer

    def conflict(self, index: int, reads: Iterable[tuple[str, tuple]]) -> Conflict | None:
        """The first read of ``reads`` that meets an earlier write, if any."""
        whole, locations = self.whole, self.locations
        if not whole and not locations:
            return None
        canon = self.canon
        for name, loc in reads:
            if canon and name in canon:
                name, loc = self._key(name, loc)
            w = whole.get(name)
            if w is not None:
                return Conflict(index, name, loc, w)
            written = locations.get(name)
            if not written:
                continue
            if loc == WHOLE:
                return Conflict(index, name, loc, max(written.values()))
            w = written.get(loc)
            if w is not None:
                return Conflict(index, name, loc, w)
        return None
