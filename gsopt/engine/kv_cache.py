"""A static KV cache for FMS's Granite, and gsopt's attention implementations as FMS ops.

FMS's stock op grows the cache with `torch.cat` and rebuilds the mask every step, so every
decode step has new shapes. Here each layer owns preallocated K/V buffers [B, Hkv, C, D],
one set per batch size, sized once (and doubled only if a request needs more). A step
writes its keys in place at each row's own positions; rows are right-padded and keep their
own positions, so a batched row is computed exactly as the same prompt alone.

Each attention implementation is one FMS attention op, chosen by `attn_name`:
- `gsopt_static_sdpa`: SDPA with the GQA group folded into the query axis ([B, Hkv, G*L, D]
  against [B, Hkv, S, D]), so K/V are read once, in the cache's dtype, never expanded. A
  boolean mask with GQA would send CUDA's SDPA to its math backend, which expands K/V per
  query head and upcasts the whole cache; the folded layout is plain multi-head attention
  that the fused backends (efficient on CUDA, flash on CPU) take with a mask. It reads the
  span `kv_index` names: the valid prefix (a dynamic size: one compiled graph for every
  length) or, in captured steps that need fixed shapes, the whole cache.
- `gsopt_static_triton`: the flash-decoding kernel (`gsopt.kernels.decode_attention`),
  which reads only each row's valid length with fixed shapes, so a captured step stays
  valid as the cache fills. The default on CUDA. Multi-token verification steps use the
  SDPA path (the kernel takes one query per row).
Prefill attends over the fresh keys (the whole prefix) with a causal mask in both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from fms.modules.attention import register_attention_op

SDPA = "gsopt_static_sdpa"
TRITON = "gsopt_static_triton"


class StaticKVCache:
    """Per-layer K/V buffers; `layers` is what FMS takes as `past_key_value_states`.
    `kv_index` is arange(capacity): steps attend over a prefix view of it."""

    def __init__(
        self,
        batch: int,
        capacity: int,
        nlayers: int,
        kvheads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (batch, kvheads, capacity, head_dim)
        # Zeros, not empty: masked-out slots still enter SDPA's P @ V with weight 0, and
        # 0 * NaN would poison the row.
        self.layers = [
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(nlayers)
        ]
        self.kv_index = torch.arange(capacity, device=device)
        for buffers in self.layers:
            for buffer in buffers:
                # Written in place every step: tell cudagraphs (reduce-overhead) the address is
                # stable, or inductor skips the graph for "mutated inputs".
                torch._dynamo.mark_static_address(buffer)
        self.capacity = capacity

    def span(self, length: int, fixed: bool) -> torch.Tensor:
        """The cache positions a step attends over: the first `length` (a dynamic size, so a
        compiled step does not recompile as it grows), or all of them when `fixed`."""
        if fixed:
            return self.kv_index
        index = self.kv_index[:length]
        torch._dynamo.maybe_mark_dynamic(index, 0)
        return index


def cache_for(model: torch.nn.Module, batch: int, needed: int, max_seq_len: int) -> StaticKVCache:
    """The model's cache for this batch size: made once at `max_seq_len` positions, doubled
    only when a request needs more than it holds. Stale slots need no clearing: a row
    attends only to slots it has written in this request."""
    caches: dict = model.__dict__.setdefault("_kv_caches", {})
    weight = model.decoder.base_model.embedding.weight
    key = (batch, weight.dtype, weight.device)
    cache = caches.get(key)
    if cache is None or cache.capacity < needed:
        capacity = cache.capacity if cache is not None else max_seq_len
        while capacity < needed:
            capacity *= 2
        caches.pop(key, None)  # free the old buffers before the new ones are made
        dec = model.config.decoder
        # The layers' own kv heads: under tensor parallelism each rank holds its share.
        kvheads = model.decoder.base_model.layers[0].attn.kvheads
        cache = caches[key] = StaticKVCache(
            batch, capacity, dec.nlayers, kvheads, dec.head_dim, weight.dtype, weight.device
        )
    return cache


def _store(
    keys: torch.Tensor,
    values: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    *,
    cache_positions: torch.Tensor,
    prefill: bool = False,
    cache_rows: torch.Tensor | None = None,
    **_,
):
    """Write [B, L, Hkv, D] keys/values at cache_positions [B, L], into cache rows
    `cache_rows` [B] (default the first B: a continuous batch prefills its new requests
    into whichever slots are free, `gsopt.engine.scheduler`).

    An indexed in-place write (index_put_): inductor keeps it in place. A `scatter_` would be
    functionalised into clone + scatter, a copy of the whole cache every step."""
    if cache_rows is None:
        cache_rows = torch.arange(keys.shape[0], device=keys.device)
    rows = cache_rows[:, None]
    key_cache[rows, :, cache_positions] = keys
    value_cache[rows, :, cache_positions] = values
    if prefill:
        return keys.transpose(1, 2), values.transpose(1, 2), key_cache, value_cache
    return key_cache, value_cache, key_cache, value_cache


def _prefill(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    nheads: int,
    kvheads: int,
    p_dropout: float,
    scale: float,
    **_,
) -> torch.Tensor:
    """Causal attention within the (right-padded) prompt; pads come last, so real tokens
    never see them. Contiguous out: FMS views the result as [B, L, H * D]."""
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2),
        keys,
        values,
        is_causal=True,
        scale=scale,
        enable_gqa=nheads != kvheads,
    )
    return out.transpose(1, 2).contiguous()


def cache_mask(cache_positions: torch.Tensor, kv_index: torch.Tensor, group: int):
    """[B, 1, L * G, S]: query j of row b (repeated for the G heads of its GQA group) sees
    the span's positions up to its own. Built once per step; every layer reads it."""
    visible = kv_index[None, None, :] <= cache_positions[:, :, None]  # [B, L, S]
    return visible.repeat_interleave(group, dim=1)[:, None]


def _attend_cache(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    kvheads: int,
    scale: float,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Queries [B, L, H, D] against the cache over the span `mask` covers ([B, 1, L * G, S]
    from `cache_mask`). The GQA group folds into the query axis."""
    batch, length, heads, dim = query.shape
    group = heads // kvheads
    span = mask.shape[-1]
    folded = (
        query.view(batch, length, kvheads, group, dim)
        .permute(0, 2, 1, 3, 4)
        .reshape(batch, kvheads, length * group, dim)
    )
    keys, values = key_cache[:, :, :span], value_cache[:, :, :span]
    if query.device.type == "cpu" and torch.compiler.is_compiling():
        out = _attend_in_graph(folded, keys, values, mask, scale)
    else:
        out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask, scale=scale)
    return (
        out.view(batch, kvheads, length, group, dim)
        .permute(0, 2, 1, 3, 4)
        .reshape(batch, length, heads, dim)
    )


def _attend_in_graph(query, keys, values, mask, scale: float) -> torch.Tensor:
    """Attention written out, for a compiled CPU step: inductor fuses it into a few
    reductions over the span, where SDPA's CPU flash kernel is an opaque call that costs
    about 0.1 ms per layer for a handful of queries (measured: 8 layers, 190 positions)."""
    scores = (query @ keys.transpose(-1, -2)) * scale
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return weights @ values


def _decode_sdpa(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    nheads: int,
    kvheads: int,
    p_dropout: float,
    scale: float,
    *,
    cache_mask: torch.Tensor,
    **_,
) -> torch.Tensor:
    return _attend_cache(query, key_cache, value_cache, kvheads, scale, cache_mask)


def _decode_triton(
    query, key_cache, value_cache, nheads, kvheads, p_dropout, scale, **kwargs
) -> torch.Tensor:
    """The kernel for one query per row; a verification step (several) goes to SDPA."""
    if query.shape[1] != 1:
        return _decode_sdpa(
            query, key_cache, value_cache, nheads, kvheads, p_dropout, scale, **kwargs
        )
    from gsopt.kernels.decode_attention import decode_attention

    lengths = kwargs["cache_positions"][:, 0] + 1
    out = decode_attention(query.transpose(1, 2), key_cache, value_cache, lengths, scale)
    return out.transpose(1, 2)


def _is_prefill(*, prefill: bool = False, **_) -> bool:
    return prefill


for _name, _decode in ((SDPA, _decode_sdpa), (TRITON, _decode_triton)):
    register_attention_op(
        _name, _store, _prefill, is_prefill_op=_is_prefill, compute_decode_op=_decode
    )


def bucket(length: int, multiple: int) -> int:
    """Round up to a multiple, to bound the number of distinct compiled shapes."""
    return -(-length // multiple) * multiple
