"""One-off measurements behind statements in the docs, each run by `python -m benchmarks study NAME`."""
