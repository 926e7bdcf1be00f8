"""Per-stage wall-clock timing with a device sync at each boundary."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch


class StageTimer:
    """Synchronised `perf_counter` around each stage call. CUDA events alone would hide the
    host overhead (Python, kernel launches) that graph capture and compile remove."""

    def __init__(self, device: torch.device | str, annotate: bool = False, per_step: bool = True):
        self.device = torch.device(device)
        self.annotate = annotate  # name each stage in a torch.profiler trace
        # Time each decode step (a device sync per token: benchmarks), or the decode loop as a
        # whole (one sync: serving).
        self.per_step = per_step
        self.times: dict[str, list[float]] = defaultdict(list)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        with torch.profiler.record_function(f"gsopt/{stage}") if self.annotate else nullcontext():
            yield
            self._sync()
        self.times[stage].append(time.perf_counter() - start)


def stage(timer: StageTimer | None, name: str) -> AbstractContextManager:
    return timer(name) if timer is not None else nullcontext()
