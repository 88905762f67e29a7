"""`python -m benchmarks.cost [...]`, as the recorded cost results name it: the same as `python -m benchmarks cost`."""

import sys

from benchmarks.__main__ import main

sys.exit(main(["cost", *sys.argv[1:]]))
