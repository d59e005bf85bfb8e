"""The peak memory of one step, measured in a process of its own (``hf-prope bench``'s distill and long_window rows).

``python -m hf_prope.memory_probe OBJECTIVE DEVICE QUICK`` builds the step of
:func:`hf_prope.benchmarks.distill_step` (``lm`` or ``distill``), or with OBJECTIVE
``window-chunked`` / ``window-whole`` the scoring of one long window
(:func:`hf_prope.benchmarks.window_step`), runs it once and prints ``{"peak_bytes": N,
"seconds": S}``: on CUDA the allocator's peak beyond what was allocated before the step, on Linux
CPUs the growth of the peak resident set. A fresh process for each, so one's freed memory cannot
hide the other's peak.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence

import torch


def _status(key: str) -> int:
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


def peak_bytes(objective: str, device: str, quick: bool) -> int:
    """One step of ``objective`` on ``device``: its peak memory in bytes."""
    from .benchmarks import distill_step, window_step

    if objective.startswith("window-"):
        step = window_step(objective.removeprefix("window-"), torch.device(device), quick)
    else:
        step = distill_step(objective, torch.device(device), quick)
    if device.startswith("cuda"):
        step()  # warm-up: the caching allocator's pools
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # Linux: writing 5 to clear_refs resets the peak resident set (VmHWM) to the current one. No
    # warm-up here: glibc keeps some freed memory resident, which would hide a second step's peak.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status("VmRSS")
    step()
    return _status("VmHWM") - base


def main(argv: Sequence[str] | None = None) -> int:
    import time

    objective, device, quick = list(sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    peak = peak_bytes(objective, device, quick == "1")
    print(json.dumps({"peak_bytes": peak, "seconds": time.perf_counter() - started}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
