"""The versions a kernel and its remote workers must share (Ray, Dask).

Everything that crosses between them is pickled: the chunk function's code
(an AST compiled on the worker), notebook functions and classes by value
(cloudpickle), the results back.  A worker on another Python minor version
cannot load the code objects; another cloudpickle may not rebuild what this
one wrote; another parloop runs chunks under a different contract.  The
failures that follow are obscure (``bad marshal data``, an ``AttributeError``
deep in an unpickler), and may come after part of the loop ran -- so the
backends ask one worker for its versions on first contact and call
:func:`check_versions` before anything runs.
"""

from __future__ import annotations

from typing import Any

__all__ = ["VersionMismatchError", "check_versions", "local_versions", "process_versions"]

#: what is compared, in the order a message lists the differences
COMPARED = ("python", "cloudpickle", "parloop")


class VersionMismatchError(RuntimeError):
    """The workers run other versions of Python, cloudpickle or parloop than
    the kernel."""


def process_versions() -> dict[str, Any]:
    """The versions of the process this runs in: ``{"python": "3.11",
    "cloudpickle": "3.1.3", "parloop": "0.1.0"}``, None for a package that is
    not installed.

    Self-contained (it imports what it needs inside, and travels by value: see
    below), so that a backend can run this very function on a worker where
    parloop is not installed and still get an answer, rather than an import
    error that hides what is missing."""
    import importlib
    import sys

    out: dict[str, Any] = {"python": "%d.%d" % sys.version_info[:2]}
    for package in ("cloudpickle", "parloop"):
        try:
            out[package] = importlib.import_module(package).__version__
        except Exception:  # noqa: BLE001 - not installed (or broken) there: reported as missing
            out[package] = None
    return out


# cloudpickle (and Ray, Dask through it) send __main__ functions by value: the
# workers need not be able to import parloop to answer
process_versions.__module__ = "__main__"


def local_versions() -> dict[str, Any]:
    """The kernel's versions, what :func:`check_versions` compares against
    (a name of its own, so that a test can pretend the kernel runs others)."""
    return process_versions()


def check_versions(remote: dict, where: str) -> None:
    """Raise :class:`VersionMismatchError` saying what differs between the
    kernel and ``remote`` (a worker's :func:`process_versions`); ``where``
    names the workers in the message ("a Ray worker of 10.0.0.5:6379")."""
    local = local_versions()
    diffs = []
    for key in COMPARED:
        mine, theirs = local.get(key), remote.get(key)
        if mine == theirs:
            continue
        label = "Python" if key == "python" else key
        if theirs is None:
            diffs.append(f"{label} is not installed there ({mine} here)")
        elif mine is None:
            diffs.append(f"{label} {theirs} there, not installed here")
        else:
            diffs.append(f"{label} {theirs} there, {mine} here")
    if diffs:
        raise VersionMismatchError(
            f"parloop: what {where} runs differs from this kernel: {'; '.join(diffs)}. Code, notebook "
            "functions and results travel pickled between them: install the same Python "
            "(major.minor), cloudpickle and parloop on both sides."
        )
