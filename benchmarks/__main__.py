"""``python -m benchmarks [workload ...] [--rounds N]``: run the workloads and
print the Markdown table (what ``make bench`` runs; BENCHMARKS.md holds the
latest)."""

from __future__ import annotations

import argparse
import sys

from . import (
    workloads_async,
    workloads_dask,
    workloads_deps,
    workloads_engines,
    workloads_hidden,
    workloads_threads,
    workloads_throughput,
    workloads_view,
)
from .harness import shell, table

WORKLOADS = {
    "cpu": workloads_engines.cpu,
    "tiny": workloads_engines.tiny,
    "io": workloads_threads.io_sleep,
    "big_input": workloads_engines.big_input,
    "warm": workloads_engines.warm_cell,
    "cold": workloads_engines.cold_start,
    "million": workloads_engines.million,
    "cpu_overhead": workloads_threads.cpu_overhead,
    "async_sleep": workloads_async.sleep_tasks,
    "async_memory": workloads_async.task_memory,
    "view": workloads_view.widget_overhead,
    "memo": workloads_deps.memo,
    "recurrence": workloads_deps.recurrence,
    "fingerprint": workloads_hidden.fingerprint_cost,
    # issue 15: the same loops on a Dask cluster the notebook made
    "dask_cpu": workloads_dask.dask_cpu,
    "dask_tiny": workloads_dask.dask_tiny,
    "dask_throughput": workloads_dask.dask_throughput,
    "ray_cpu": workloads_dask.ray_cpu,
    # last: it grows the cluster to 64 engines (a minute or more) and stops it
    "throughput": workloads_throughput.throughput,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("workloads", nargs="*", choices=[[], *WORKLOADS], default=[])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    names = args.workloads or list(WORKLOADS)
    ip = shell()
    header = True
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        # each table as soon as its workload is done: a later failure keeps it
        text = table([WORKLOADS[name](ip, args.rounds)])
        print(text if header else text.split("\n", 2)[2], flush=True)
        header = False
    ip.run_cell("%unload_ext parloop", store_history=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
