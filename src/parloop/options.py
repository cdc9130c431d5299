"""The magics' options (docs/design.md §1): one table that parses, validates, and writes
the manual, so the three can never disagree.

Options are ``key=value`` words; bare words are flags.  Anything unknown or
malformed is a ``UsageError`` naming the word and listing the valid options,
raised before anything runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from IPython.core.error import UsageError

PROGRESS_ENV = "PARLOOP_PROGRESS"  # e.g. PARLOOP_PROGRESS=text in CI and docs builds


def _positive_int(v: str) -> int:
    n = int(v)
    if n < 1:
        raise ValueError("must be at least 1")
    return n


def _non_negative_int(v: str) -> int:
    n = int(v)
    if n < 0:
        raise ValueError("must be 0 or more")
    return n


def _auto_or_int(v: str) -> int | None:
    return None if v == "auto" else _positive_int(v)


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(v: str) -> str:
        if v not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return v

    return parse


def _seconds(v: str) -> float:
    x = float(v)
    if not x > 0:
        raise ValueError("must be a positive number of seconds")
    return x


def _names(v: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in v.split(","))
    bad = [n for n in names if not n.isidentifier()]
    if bad or not names:
        raise ValueError(f"not a name: {bad[0] if bad else v!r}")
    return names


def _int(v: str) -> int:
    return int(v)


@dataclass(frozen=True)
class OptionSpec:
    key: str
    syntax: str
    parse: Callable[[str], Any] | None  # None: a flag
    magics: tuple[str, ...]
    help: str
    #: a flag that may also take a value (``dask`` or ``dask=ADDRESS``)
    value_optional: bool = False


SPECS: tuple[OptionSpec, ...] = (
    OptionSpec(
        "threads",
        "threads=N|auto",
        _auto_or_int,
        ("threaded",),
        "worker threads; auto measures the first iterations and applies "
        "TC = N x (T1 + T2) / T1 (N cores, T1 CPU time, T2 waiting time)",
    ),
    OptionSpec(
        "tasks",
        "tasks=N",
        _positive_int,
        ("threaded",),
        "for a body that awaits: at most N asyncio tasks at once (default 100)",
    ),
    OptionSpec(
        "processes",
        "processes=N",
        _positive_int,
        ("parallel",),
        "engines of the managed local cluster (default: the CPU count)",
    ),
    OptionSpec(
        "profile",
        "profile=NAME",
        str,
        ("parallel",),
        "use the running ipyparallel cluster of this profile instead",
    ),
    OptionSpec(
        "cluster_id",
        "cluster_id=ID",
        str,
        ("parallel",),
        "use the running ipyparallel cluster with this id instead",
    ),
    OptionSpec(
        "dask",
        "dask|dask=ADDRESS",
        str,
        ("parallel",),
        "run on a Dask cluster: the notebook's distributed Client (or a local one "
        "parloop starts and owns), or the scheduler at ADDRESS (tcp://HOST:PORT or a "
        "scheduler.json file)",
        value_optional=True,
    ),
    OptionSpec(
        "ray",
        "ray|ray=ADDRESS",
        str,
        ("parallel",),
        "run on a Ray cluster: the one ray.init() connected to (or a local one parloop "
        "starts and owns), or the cluster at ADDRESS",
        value_optional=True,
    ),
    OptionSpec(
        "retries",
        "retries=N",
        _non_negative_int,
        ("parallel",),
        "re-run the iterations of a lost engine up to N times (default 1)",
    ),
    OptionSpec(
        "timeout",
        "timeout=SECONDS",
        _seconds,
        ("parallel",),
        "per-iteration limit; a longer iteration is reported and its engine interrupted",
    ),
    OptionSpec(
        "chunksize",
        "chunksize=auto|N",
        _auto_or_int,
        ("threaded", "parallel"),
        "iterations per chunk; auto sizes chunks from measured iteration times",
    ),
    OptionSpec(
        "progress",
        "progress=widget|text|off",
        _choice("widget", "text", "off"),
        ("threaded", "parallel"),
        "live view: a widget, a tqdm text bar, or nothing (default: widget in a "
        f"widget-capable frontend, text otherwise; ${PROGRESS_ENV} overrides)",
    ),
    OptionSpec(
        "on_error",
        "on_error=raise|skip|collect",
        _choice("raise", "skip", "collect"),
        ("threaded", "parallel"),
        "raise: re-raise the first failing iteration's exception (default); skip: "
        "drop failing iterations' effects; collect: keep going, errors in "
        "parloop.last_run.errors",
    ),
    OptionSpec(
        "seed",
        "seed=N",
        _int,
        ("threaded", "parallel"),
        "per-iteration random and numpy.random streams derived from (N, index)",
    ),
    OptionSpec(
        "private",
        "private=NAME[,NAME...]",
        _names,
        ("threaded", "parallel"),
        "each iteration works on its own copy of these outside objects (as they "
        "were before the loop); afterwards each name holds the last iteration's copy",
    ),
    OptionSpec(
        "explain",
        "explain",
        None,
        ("threaded", "parallel"),
        "print the analysis (every name's role and how it travels); run nothing",
    ),
    OptionSpec(
        "serial",
        "serial",
        None,
        ("threaded", "parallel"),
        "run the rewritten loop in the kernel, one iteration at a time "
        "(same semantics; for debugging)",
    ),
)


@dataclass
class Options:
    """Parsed options of one magic call, defaults filled in."""

    magic: str
    threads: int | None = None
    tasks: int = 100
    processes: int | None = None
    profile: str | None = None
    cluster_id: str | None = None
    #: True (the notebook's client, or a local cluster parloop owns) or an address
    dask: bool | str | None = None
    ray: bool | str | None = None
    retries: int = 1
    timeout: float | None = None
    chunksize: int | None = None
    progress: str | None = None
    on_error: str = "raise"
    seed: int | None = None
    private: tuple[str, ...] = ()
    explain: bool = False
    serial: bool = False
    given: dict[str, Any] = field(default_factory=dict)

    def with_defaults(self, **defaults: Any) -> "Options":
        """Fill options the user did not give from configured defaults."""
        fill = {k: v for k, v in defaults.items() if k not in self.given and v is not None}
        return replace(self, **fill)

    def resolved_progress(self, widget_capable: bool) -> str:
        if self.progress is not None:
            return self.progress
        env = os.environ.get(PROGRESS_ENV, "").strip().lower()
        if env in ("widget", "text", "off"):
            return "text" if env == "widget" and not widget_capable else env
        return "widget" if widget_capable else "text"


def valid_for(magic: str) -> list[OptionSpec]:
    return [s for s in SPECS if magic in s.magics]


def _valid_list(magic: str) -> str:
    return ", ".join(s.syntax for s in valid_for(magic))


def parse_options(line: str, magic: str) -> Options:
    """Parse a magic line such as ``threads=8 chunksize=auto explain``."""
    specs = {s.key: s for s in valid_for(magic)}
    opts = Options(magic=magic)
    given: dict[str, Any] = {}
    for word in line.split():
        key, eq, value = word.partition("=")
        spec = specs.get(key)
        if spec is None:
            other = [s for s in SPECS if s.key == key]
            why = (
                f"`{key}` is an option of %%{other[0].magics[0]}, not %%{magic}"
                if other
                else f"unknown option `{word}`"
            )
            raise UsageError(f"%%{magic}: {why}. Valid options: {_valid_list(magic)}")
        if key in given:
            raise UsageError(f"%%{magic}: option `{key}` given twice")
        if spec.value_optional and not eq:
            given[key] = True
            continue
        if spec.parse is None:
            if eq:
                raise UsageError(
                    f"%%{magic}: `{key}` is a flag and takes no value "
                    f"(got `{word}`). Valid options: {_valid_list(magic)}"
                )
            given[key] = True
            continue
        if not eq or value == "":
            raise UsageError(
                f"%%{magic}: option `{key}` needs a value: {spec.syntax}. "
                f"Valid options: {_valid_list(magic)}"
            )
        try:
            given[key] = spec.parse(value)
        except ValueError as e:
            raise UsageError(
                f"%%{magic}: bad value in `{word}` ({e}); expected {spec.syntax}"
            ) from None
    if "processes" in given and ("profile" in given or "cluster_id" in given):
        raise UsageError(
            f"%%{magic}: `processes` sizes the managed local cluster and "
            "cannot be combined with `profile`/`cluster_id`"
        )
    _check_cluster_choice(magic, given)
    opts = replace(opts, given=given, **given)
    return opts


def _check_cluster_choice(magic: str, given: dict[str, Any]) -> None:
    """One place to run: ipyparallel (processes/profile/cluster_id), Dask or Ray."""
    others = [k for k in ("dask", "ray") if k in given]
    if len(others) > 1:
        raise UsageError(f"%%{magic}: choose one of `dask` and `ray`, not both")
    if not others:
        return
    which = others[0]
    clash = [k for k in ("profile", "cluster_id") if k in given]
    if clash:
        raise UsageError(
            f"%%{magic}: `{which}` runs on a {which.capitalize()} cluster; `{clash[0]}` names an "
            "ipyparallel cluster: give one of them"
        )
    if "processes" in given and given[which] is not True:
        raise UsageError(
            f"%%{magic}: `processes` sizes the local cluster parloop starts; with "
            f"`{which}={given[which]}` the cluster is already there"
        )
    if "timeout" in given:
        raise UsageError(
            f"%%{magic}: `timeout` needs ipyparallel engines (an alarm signal in the "
            f"process running the iteration); {which.capitalize()} runs iterations in "
            "worker threads, where no signal can stop them. Leave out `timeout`, or use "
            "the engines (no `dask`/`ray`)"
        )


def manual(magic: str) -> str:
    """The option part of the magic's docstring (``%%threaded?``)."""
    lines = []
    for s in valid_for(magic):
        lines.append(f"  {s.syntax}")
        lines.append(f"      {s.help}")
    return "\n".join(lines)
