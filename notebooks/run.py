"""``python notebooks/run.py NOTEBOOK``: execute a notebook headless (nbclient, a
real kernel) and print what each cell showed -- what ``make demo`` runs.  It
lives outside the package: nbclient is a development dependency."""

from __future__ import annotations

import argparse
import os
import sys


def _text(output: dict) -> str:
    kind = output.get("output_type")
    if kind == "stream":
        return output.get("text", "")
    if kind in ("execute_result", "display_data"):
        data = output.get("data", {})
        return data.get("text/plain", "") + "\n"
    if kind == "error":
        return f"{output.get('ename')}: {output.get('evalue')}\n"
    return ""


def main(argv: list[str] | None = None) -> int:
    import nbformat
    from nbclient import NotebookClient

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("notebook")
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--kernel", default="python3")
    args = parser.parse_args(argv)

    nb = nbformat.read(args.notebook, as_version=4)
    os.environ.setdefault("PARLOOP_PROGRESS", "text")
    client = NotebookClient(
        nb,
        timeout=args.timeout,
        kernel_name=args.kernel,
        resources={"metadata": {"path": os.path.dirname(os.path.abspath(args.notebook))}},
    )
    client.execute()
    n = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        n += 1
        print(f"--- In [{n}] " + "-" * 50)
        print(cell.source)
        out = "".join(_text(o) for o in cell.get("outputs", []))
        if out.strip():
            print(f"--- Out [{n}]")
            print(out.rstrip())
    print(f"\n{args.notebook}: {n} code cells executed without error")
    return 0


if __name__ == "__main__":
    sys.exit(main())
