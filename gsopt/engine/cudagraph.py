"""Manual CUDA-graph capture of a static-cache step (`decode_one_token` or `verify`).

A step is called as `step(model, *inputs, cache, kv_index)`. Its tensor inputs are copied
into static buffers before each replay; the cache and the attended span are the same
tensors every call (one cache per batch size, `gsopt.engine.kv_cache.cache_for`), so one graph
serves each input shape and cache. Every capture of the process draws from one memory pool
(`torch.cuda.graph_pool_handle()`), so a graph per batch size does not cost a private pool
each. The outputs are the graph's static buffers, which the next replay overwrites:
`gsopt.engine.generate` copies them before it feeds them back or keeps them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


@functools.cache
def shared_pool(device: torch.device):
    with torch.cuda.device(device):
        return torch.cuda.graph_pool_handle()


class CUDAGraphStep:
    def __init__(self, step: Callable, warmup: int = 2):
        self.step = step
        self.warmup = warmup
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], object]] = {}
        self.captures = 0

    def _capture(self, model, inputs, cache, kv_index):
        static = [t.clone() for t in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (and compile) outside the capture
            for _ in range(self.warmup):
                self.step(model, *static, cache, kv_index)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=shared_pool(kv_index.device)):
            out = self.step(model, *static, cache, kv_index)
        self.captures += 1
        return graph, static, out

    def __call__(self, model, *args):
        *inputs, cache, kv_index = args
        key = (
            tuple(t.shape for t in inputs),
            cache[0][0].data_ptr(),
            kv_index.data_ptr(),
            kv_index.shape[0],
        )
        if key not in self.graphs:
            self.graphs[key] = self._capture(model, inputs, cache, kv_index)
        graph, static, out = self.graphs[key]
        for buffer, value in zip(static, inputs, strict=True):
            buffer.copy_(value)
        graph.replay()
        return out
