"""The magics: ``%%threaded``, ``%%parallel``, ``%parallel_status``,
``%parallel_stop``.  Thin: they parse options and call :func:`parloop.run.run_cell`.

Defaults are configurable the IPython way, e.g. ``%config ParloopMagics.progress = 'off'``
or ``c.ParloopMagics.threads = '16'`` in ``ipython_config.py``; the values use
the option syntax of the magic line and are validated the same way.
"""

from __future__ import annotations

from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from traitlets import Unicode

from .backends import make_backend
from .options import SPECS, Options, manual, parse_options
from .run import Cell, Progress, run_cell

_USAGE = {
    "threaded": """Run the cell's first top-level ``for`` loop on a thread pool in the kernel.

Usage::

    %%threaded [threads=N|auto] [chunksize=auto|N] [progress=widget|text|off]
               [on_error=raise|skip|collect] [seed=N] [tasks=N] [explain] [serial]

The cell is split at its first top-level ``for``: the statements before it and
after it run in the kernel as usual; the loop's iterations run in parallel, and
the cell ends exactly as it would have without the magic.  Writes such as
``out[i] = f(x)``, ``out.append(y)``, ``total += y`` are recorded in the
workers and replayed in iteration order; ``print`` output comes out in
iteration order; names assigned in the body keep their last iteration's value;
an exception keeps its type and names the iteration that raised it.  Cells that
cannot run in parallel (``break``, ``prev = x`` carried from one iteration to
the next, ...) are rejected with ``parloop.LoopAnalysisError`` before anything
runs.  Threads suit loops that wait (I/O, sleep, C code that releases the GIL).

Options:
{options}

Examples::

    In [1]: %load_ext parloop

    In [2]: %%threaded threads=16
       ...: pages = {{}}
       ...: for url in urls:
       ...:     pages[url] = fetch(url)

    In [3]: %%threaded explain
       ...: for i, row in enumerate(rows):
       ...:     row["score"] = score(row)

After a run, ``parloop.last_run`` holds its timings, errors and options.
""",
    "parallel": """Run the cell's first top-level ``for`` loop on ipyparallel engines.

Usage::

    %%parallel [processes=N] [profile=NAME] [cluster_id=ID] [retries=N]
               [timeout=SECONDS] [chunksize=auto|N] [progress=widget|text|off]
               [on_error=raise|skip|collect] [seed=N] [explain] [serial]

Without ``profile``/``cluster_id`` a local cluster of ``processes`` engines is
started on first use and kept warm between cells (``%parallel_stop`` stops it).
Everything the loop reads from the notebook -- cell functions, lambdas, classes,
data -- travels by value, so the ``__main__`` problem of process pools does not
arise.  Results, output and errors come back in iteration order, exactly as
serial execution would leave them.

Options:
{options}

Examples::

    In [1]: %load_ext parloop

    In [2]: %%parallel processes=8
       ...: results = {{}}
       ...: for i, path in enumerate(paths):
       ...:     results[i] = expensive(path)

    In [3]: %%parallel profile=mycluster chunksize=auto
       ...: for x in xs:
       ...:     total += simulate(x)
""",
}


def _widget_capable(shell: Any) -> bool:
    """A frontend that can show widgets: a kernel (not terminal IPython) with
    ipywidgets importable."""
    if shell is None or not hasattr(shell, "kernel"):
        return False
    try:
        import ipywidgets  # noqa: F401 - importable is the question
    except ImportError:
        return False
    return True


@magics_class
class ParloopMagics(Magics):
    """parloop's magics; configurable defaults for every option."""

    threads = Unicode("", help="default of threads=N|auto for %%threaded").tag(config=True)
    processes = Unicode("", help="default of processes=N for %%parallel").tag(config=True)
    chunksize = Unicode("", help="default of chunksize=auto|N").tag(config=True)
    progress = Unicode("", help="default of progress=widget|text|off").tag(config=True)
    on_error = Unicode("", help="default of on_error=raise|skip|collect").tag(config=True)
    retries = Unicode("", help="default of retries=N for %%parallel").tag(config=True)

    def _options(self, line: str, magic: str) -> Options:
        opts = parse_options(line, magic)
        defaults: dict[str, Any] = {}
        for spec in SPECS:
            raw = getattr(self, spec.key, None) if spec.key in self.trait_names() else None
            if not raw or magic not in spec.magics:
                continue
            try:
                defaults[spec.key] = spec.parse(raw) if spec.parse else True
            except ValueError as e:
                raise UsageError(
                    f"ParloopMagics.{spec.key} = {raw!r} is not valid ({e}); expected {spec.syntax}"
                ) from None
        return opts.with_defaults(**defaults)

    def _cell(self, magic: str, line: str, cell: str) -> Cell:
        shell = self.shell
        source = shell.transform_cell(cell) if shell is not None else cell
        # registered under its own name (the outer cell's raw text would give
        # the outer cell's name and overwrite its linecache entry), numbered
        # like the cell being run so tracebacks say "Cell In[n]"
        shown = f"%%{magic} {line}\n{source}"
        if shell is None:
            return Cell(source=source, filename="<parloop-cell>", first_line=2)
        running = getattr(getattr(shell, "displayhook", None), "exec_result", None)
        number = getattr(running, "execution_count", None) or shell.execution_count
        filename = shell.compile.cache(shown, number)
        return Cell(source=source, filename=filename, first_line=2)

    def _progress(self, opts: Options) -> Progress:
        capable = _widget_capable(self.shell)
        mode = opts.resolved_progress(capable)
        if mode == "off":
            return Progress()
        if mode == "widget" and capable:
            try:
                from .progress.widget import WidgetProgress
            except ImportError:  # the widget view is not there yet
                pass
            else:
                return WidgetProgress()  # type: ignore[return-value]
        from .progress.text import TextProgress

        return TextProgress()  # type: ignore[return-value]

    def _run(self, magic: str, line: str, cell: str) -> Any:
        __tracebackhide__ = True  # IPython hides parloop's frames from tracebacks
        opts = self._options(line, magic)
        if cell is None or not cell.strip():
            raise UsageError(f"%%{magic} needs a cell with a `for` loop below the magic line")
        assert self.shell is not None
        return run_cell(
            self._cell(magic, line, cell),
            self.shell.user_ns,
            opts,
            make_backend,
            None if opts.explain else self._progress(opts),
        )

    @cell_magic
    def threaded(self, line: str, cell: str) -> Any:
        __tracebackhide__ = True
        return self._run("threaded", line, cell)

    @cell_magic
    def parallel(self, line: str, cell: str) -> Any:
        __tracebackhide__ = True
        return self._run("parallel", line, cell)

    @line_magic
    def parallel_status(self, line: str = "") -> None:
        """Show the parallel backend: engines, hosts, busy/idle, the last run."""
        from .status import status_text

        print(status_text())

    @line_magic
    def parallel_stop(self, line: str = "") -> None:
        """Stop the clusters %%parallel started (ipyparallel, Dask, Ray; never one it did not start)."""
        from .backends import stop_clusters

        print(
            "parloop: stopped the managed cluster"
            if stop_clusters()
            else "parloop: no managed cluster is running"
        )


ParloopMagics.threaded.__doc__ = _USAGE["threaded"].format(options=manual("threaded"))
ParloopMagics.parallel.__doc__ = _USAGE["parallel"].format(options=manual("parallel"))
