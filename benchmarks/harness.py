"""What every benchmark shares: the timing harness (warm-up calls, then timed repeats, summarised by the median)
and the package versions each record carries."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def time_repeats(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Seconds taken by each of `repeats` calls of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def median_and_iqr(times: list[float]) -> tuple[float, float]:
    """The median and the interquartile range of a list of timings."""
    if len(times) < 2:
        return times[0], 0.0
    quartiles = statistics.quantiles(times, n=4)
    return statistics.median(times), quartiles[2] - quartiles[0]


def versions() -> dict:
    """The versions of the packages a benchmark result depends on."""
    import platform

    import peft
    import torch
    import transformers

    import peft_prompt_transfer

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "peft_prompt_transfer": peft_prompt_transfer.__version__, "python": platform.python_version()}
