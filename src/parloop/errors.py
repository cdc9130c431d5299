"""The exceptions of parloop's public contract (docs/design.md §1)."""

from __future__ import annotations


class LoopAnalysisError(ValueError):
    """A cell that cannot run in parallel with serial semantics.

    Raised before anything in the cell runs; the message names the line and the
    variable so the user can fix the cell.
    """

    def __init__(self, message: str, *, lineno: int | None = None, name: str | None = None):
        self.lineno = lineno
        self.name = name
        if lineno is not None and not message.startswith("line "):
            message = f"line {lineno}: {message}"
        super().__init__(message)

    def _render_traceback_(self) -> list[str]:
        # IPython shows this instead of a long traceback through parloop internals.
        return [f"LoopAnalysisError: {self}"]


class WorkerLostError(RuntimeError):
    """Iterations could not be run because the workers running them died."""
