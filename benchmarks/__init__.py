"""parloop's benchmarks: parloop against the tools users would pick instead,
measured side by side in one run, reported as ratios (``make bench``)."""
