"""The benchmarks behind the docs' evidence: see `benchmarks/README.md` for the layout."""
