"""A stage as its settings say to run it: eager, compiled, or compiled and captured.

`CompiledStage` counts its own graphs, graph breaks, recompiles and CUDA-graph skips, which
the reports print; `portable` turns settings that need CUDA into the nearest form this
machine runs, noting each fallback.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch

from gsopt.engine import cpu_gemv
from gsopt.recipe.settings import StageRecipe

log = logging.getLogger(__name__)
# Stages whose compiled CPU code computes weight-times-few-rows products (`cpu_gemv`).
GEMV_STAGES = ("prefill", "decode")


def _counters() -> tuple[int, int, int]:
    counters = torch._dynamo.utils.counters
    return (
        counters["stats"]["unique_graphs"],
        sum(counters["graph_break"].values()),
        counters["inductor"]["cudagraph_skips"],
    )


class CompiledStage:
    """A compiled stage that counts its own graphs, graph breaks, recompiles and CUDA-graph
    skips (inductor skips them silently, e.g. for mutated inputs)."""

    def __init__(self, fn: Callable, **compile_kwargs: Any):
        _allow_another_compile_of(fn)
        self.fn = torch.compile(fn, **compile_kwargs)
        self.graphs = self.graph_breaks = self.recompiles = self.cudagraph_skips = 0
        self.calls = 0

    def __call__(self, *args):
        before = _counters()
        try:
            out = self.fn(*args)
        except Exception as error:
            if not _compile_failure(error) or not _fresh_cache(error):
                raise
            out = self.fn(*args)
        new_graphs, new_breaks, new_skips = (
            after - then for after, then in zip(_counters(), before, strict=True)
        )
        if self.calls:
            self.recompiles += new_graphs
        self.graphs += new_graphs
        self.graph_breaks += new_breaks
        self.cudagraph_skips += new_skips
        self.calls += 1
        return out


# Graphs dynamo keeps per function before it gives up (its default recompile_limit).
GRAPHS_PER_STAGE = 8
_stages_of: collections.Counter = collections.Counter()


def _allow_another_compile_of(fn: Callable) -> None:
    """Every pipeline compiles the same step functions (`decode_one_token`, ...) for its own
    model, and dynamo counts all their graphs against one limit per function: a process
    holding several compiled pipelines (bench's interleaved recipes) would fail the seventh
    one's fullgraph compile. Each stage raises the limit by its own allowance."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    code = getattr(getattr(fn, "__func__", fn), "__code__", fn)
    _stages_of[code] += 1
    config = torch._dynamo.config
    needed = GRAPHS_PER_STAGE * _stages_of[code]
    config.recompile_limit = max(config.recompile_limit, needed)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4 * needed)


def _compile_failure(error: Exception) -> bool:
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import InductorError

    return isinstance(error, BackendCompilerFailed | InductorError)


_fresh_caches: list[str] = []


def _fresh_cache(error: Exception) -> bool:
    """After inductor failed to build or load code, once per process: a killed run can leave
    half-written files in the shared cache (an `invalid ELF header` on the next start).
    Compile again in a fresh private cache; a real compiler bug fails there too and is
    raised as it is."""
    if _fresh_caches:
        return False
    from torch._inductor.runtime.cache_dir_utils import cache_dir
    from torch._inductor.utils import clear_inductor_caches

    stale = cache_dir()
    _fresh_caches.append(tempfile.mkdtemp(prefix="gsopt-inductor-"))
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _fresh_caches[0]
    first = str(error).strip().splitlines()[0][:160] if str(error).strip() else ""
    log.warning(
        "the compile cache at %s looks corrupt (%s); compiling again in %s",
        stale,
        first or type(error).__name__,
        _fresh_caches[0],
    )
    torch._dynamo.reset()
    clear_inductor_caches()
    return True


def portable(stage: str, settings: StageRecipe, device: torch.device, notes: list[str]):
    """The nearest form of a stage's compile settings that this device runs: without CUDA,
    a captured step runs compiled, and the CUDA-graph modes run their graph-free forms."""
    if device.type == "cuda":
        return settings
    changes: dict[str, Any] = {}
    if settings.cudagraph:
        changes.update(cudagraph=False, backend="compile")
        notes.append(f"{stage}: cudagraph needs CUDA; ran a compiled step instead")
    if settings.mode in ("reduce-overhead", "max-autotune"):
        changes["mode"] = (
            "default" if settings.mode == "reduce-overhead" else "max-autotune-no-cudagraphs"
        )
        notes.append(
            f"{stage}: mode {settings.mode} uses CUDA graphs; ran mode {changes['mode']} instead"
        )
    return dataclasses.replace(settings, **changes)


def wrap(fn: Callable, settings: StageRecipe, cpu_gemv_products: bool = False) -> Callable:
    """Eager, compiled or captured, as the stage's settings say. With `cpu_gemv_products`,
    the few-row products of a stage compiled for the CPU (all of a decode or verify step's,
    the prefill's lm head over the rows it reads) become inductor reductions."""
    if settings.backend == "eager":
        return fn
    kwargs: dict[str, Any] = dict(fullgraph=settings.fullgraph, dynamic=settings.dynamic)
    options = cpu_gemv.inductor_options() if cpu_gemv_products else {}
    if settings.mode != "default" and options:
        options.update(torch._inductor.list_mode_options(settings.mode))
    elif settings.mode != "default":
        kwargs["mode"] = settings.mode
    if options:
        kwargs["options"] = options
    compiled = CompiledStage(fn, **kwargs)
    if settings.cudagraph:
        from gsopt.engine.cudagraph import CUDAGraphStep

        return CUDAGraphStep(compiled)
    return compiled


def describe(settings: StageRecipe, attention: str | None = None) -> str:
    """A short label of what actually runs for a stage, for reports."""
    parts = [settings.backend if settings.mode == "default" else f"compile/{settings.mode}"]
    if settings.backend == "eager":
        parts = ["eager"]
    if settings.cudagraph:
        parts.append("cudagraph")
    if attention not in (None, "sdpa"):
        parts.append(f"{attention} attention")
    return " + ".join(parts)


def compiles(fn: Callable) -> bool:
    """Whether a stage callable is compiled (a captured step wraps a compiled one)."""
    return isinstance(getattr(fn, "step", fn), CompiledStage)
