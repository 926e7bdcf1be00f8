"""Manual CUDA-graph capture of the static-cache decode step.

One graph per (batch, cache length, cache buffers): the step reads its token and position
from static input buffers and writes the cache in place. Its output is the graph's static
buffer, which the next replay overwrites: the decode loop (`generate`) copies each token it
keeps, one copy per step that also covers torch.compile's reduce-overhead. The cache comes
from `StaticKVCache.pooled`, so every generate call with the same shape sees the same
addresses and replays the same graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class CUDAGraphDecode:
    def __init__(self, step: Callable, warmup: int = 2):
        self.step = step
        self.warmup = warmup
        self.graphs: dict[
            tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]
        ] = {}
        self.captures = 0

    def _capture(self, model, tokens, positions, cache, decode_attention):
        static_tokens, static_positions = tokens.clone(), positions.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (and compile) outside the capture
            for _ in range(self.warmup):
                self.step(model, static_tokens, static_positions, cache, decode_attention)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.step(model, static_tokens, static_positions, cache, decode_attention)
        self.captures += 1
        return graph, static_tokens, static_positions, out

    def __call__(
        self,
        model,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: list,
        decode_attention: str,
    ) -> torch.Tensor:
        key = (tokens.shape[0], cache[0][0].shape[2], cache[0][0].data_ptr(), decode_attention)
        if key not in self.graphs:
            self.graphs[key] = self._capture(model, tokens, positions, cache, decode_attention)
        graph, static_tokens, static_positions, out = self.graphs[key]
        static_tokens.copy_(tokens)
        static_positions.copy_(positions)
        graph.replay()
        return out  # overwritten by the next replay: `generate` keeps a copy of each token
