"""Interleaved timing, shared by `gsopt apply` and `gsopt bench`.

Round r calls every runner once, so a slow spell on the machine hits all of them alike and
the ratios of medians stay fair; round 0 is a warm-up (it compiles) and is kept apart.
Ratios are also taken per round, so a speed-up comes with its spread over the rounds.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gsopt.engine.timing import StageTimer


@dataclass
class Call:
    """One run of a pipeline: seconds per stage call (decode: one entry per step), the whole
    call's seconds, and its tokens."""

    stages: dict[str, list[float]]
    total: float
    tokens: torch.Tensor | None = None

    def stage_s(self, stage: str) -> float:
        return sum(self.stages.get(stage, [0.0]))


# runner(annotate=False) -> Call; annotate names each stage in a torch.profiler trace.
Runner = Callable[..., Call]


def pipeline_runner(
    pipeline, waves, template: list[int], max_new_tokens: int, **call_kwargs
) -> Runner:
    """A pipeline at fixed length (end-of-text ignored), so every call does the same work;
    `call_kwargs` go to each call (oracle drafts, say)."""

    def call(annotate: bool = False) -> Call:
        timer = StageTimer(pipeline.device, annotate)
        with timer("total"):
            tokens = pipeline(waves, template, max_new_tokens, timer=timer, **call_kwargs)
        total = timer.times.pop("total")[0]
        return Call(dict(timer.times), total, tokens)

    return call


def interleave(
    runners: dict[str, Runner],
    rounds: int,
    *,
    before_call: Callable[[str], None] | None = None,
    after_call: Callable[[str, Call | None], None] | None = None,
    on_error: Callable[[str, Exception], None] | None = None,
) -> dict[str, list[Call]]:
    """`rounds` rounds (the first is the warm-up). A runner that raises is dropped from
    later rounds when `on_error` takes the exception; without it the exception propagates."""
    calls: dict[str, list[Call]] = {name: [] for name in runners}
    live = dict(runners)
    for _ in range(rounds):
        for name in list(live):
            if before_call is not None:
                before_call(name)
            call = None
            try:
                call = live[name]()
            except Exception as e:
                if on_error is None:
                    raise
                on_error(name, e)
                del live[name]
            finally:
                if after_call is not None:
                    after_call(name, call)
            if call is not None:
                calls[name].append(call)
    return calls


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def stats_ms(values_s: list[float]) -> dict[str, float]:
    """Median and p90 of seconds, in ms."""
    return {
        "median_ms": 1e3 * statistics.median(values_s),
        "p90_ms": 1e3 * percentile(values_s, 90),
    }


def ratio_spread(base: list[float], mine: list[float]) -> dict[str, float | bool]:
    """Per-round ratios base / mine: median, 10th-90th percentile, and whether the spread
    straddles 1.0 (then the figure is within noise)."""
    ratios = [b / m for b, m in zip(base, mine, strict=True) if m > 0]
    low, high = percentile(ratios, 10), percentile(ratios, 90)
    return {
        "median": statistics.median(ratios),
        "p10": low,
        "p90": high,
        "within_noise": low <= 1.0 <= high,
    }
