"""A static KV cache for FMS's Granite, plugged in through FMS's attention-op registry.

FMS's stock op grows the cache with `torch.cat` and rebuilds the mask every step, so every
decode step has new shapes. Here each layer owns preallocated K/V buffers [B, Hkv, Lmax, D];
a step writes its keys in place at each row's own position and attends with a length mask.
Rows are right-padded and keep their own positions, so a batched row is computed exactly as
the same prompt alone. The decode step has fixed shapes: it compiles once and can be
captured in a CUDA graph (the buffers never move).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from fms.modules.attention import register_attention_op

ATTN_NAME = "gsopt_static"


class StaticKVCache:
    """Per-layer K/V buffers; `layers` is what FMS takes as `past_key_value_states`."""

    def __init__(
        self,
        batch: int,
        max_len: int,
        nlayers: int,
        kvheads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (batch, kvheads, max_len, head_dim)
        self.layers = [
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(nlayers)
        ]
        for buffers in self.layers:
            for buffer in buffers:
                # Written in place every step: tell cudagraphs (reduce-overhead) the address is
                # stable, or inductor skips the graph for "mutated inputs".
                torch._dynamo.mark_static_address(buffer)
        self.max_len = max_len

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch: int, max_len: int) -> StaticKVCache:
        dec = model.config.decoder
        weight = model.decoder.base_model.embedding.weight
        return cls(
            batch,
            max_len,
            dec.nlayers,
            dec.kvheads or dec.nheads,
            dec.head_dim,
            weight.dtype,
            weight.device,
        )

    @classmethod
    def pooled(cls, model: torch.nn.Module, batch: int, max_len: int) -> StaticKVCache:
        """One cache per shape, kept on the model: stable addresses for captured graphs and no
        reallocation per request. Stale entries need no clearing: a row attends only to
        slots it has written in this request."""
        pool = model.__dict__.setdefault("_kv_cache_pool", {})
        weight = model.decoder.base_model.embedding.weight
        key = (batch, max_len, weight.dtype, weight.device)
        if key not in pool:
            pool[key] = cls.for_model(model, batch, max_len)
        return pool[key]

    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.layers)


def _store(
    keys: torch.Tensor,
    values: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    *,
    cache_positions: torch.Tensor,
    prefill: bool = False,
    **_,
):
    """Write [B, L, Hkv, D] keys/values at cache_positions [B, L]; attend over the fresh
    keys in prefill (they are the whole prefix) and over the cache in decode."""
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)
    index = cache_positions[:, None, :, None].expand_as(keys)
    key_cache.scatter_(2, index, keys)
    value_cache.scatter_(2, index, values)
    if prefill:
        return keys, values, key_cache, value_cache
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
    never see them."""
    out = F.scaled_dot_product_attention(
        query.transpose(1, 2),
        keys,
        values,
        is_causal=True,
        scale=scale,
        enable_gqa=nheads != kvheads,
    )
    return out.transpose(1, 2)


def decode_kwargs(positions: torch.Tensor, max_len: int, decode_attention: str) -> dict:
    """What every layer's decode attention reads, built once per step rather than per layer:
    each row's valid length (`position + 1`) and the matching mask over the cache."""
    lengths = positions + 1
    valid = torch.arange(max_len, device=positions.device) < lengths[:, None]
    return {
        "cache_positions": positions[:, None],
        "decode_lengths": lengths,
        "decode_mask": valid[:, None, None, :],
        "decode_attention": decode_attention,
    }


def _decode_sdpa(query, key_cache, value_cache, lengths, mask, scale, gqa):
    return F.scaled_dot_product_attention(
        query, key_cache, value_cache, attn_mask=mask, scale=scale, enable_gqa=gqa
    )


def _decode_math(query, key_cache, value_cache, lengths, mask, scale, gqa):
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return _decode_sdpa(query, key_cache, value_cache, lengths, mask, scale, gqa)


def _decode_triton(query, key_cache, value_cache, lengths, mask, scale, gqa):
    from gsopt.kernels.decode_attention import decode_attention

    return decode_attention(query, key_cache, value_cache, lengths, scale)


_DECODE_IMPLS: dict[str, Callable[..., torch.Tensor]] = {
    "sdpa": _decode_sdpa,
    "math": _decode_math,
    "triton": _decode_triton,
}


def _decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    nheads: int,
    kvheads: int,
    p_dropout: float,
    scale: float,
    *,
    decode_lengths: torch.Tensor,
    decode_mask: torch.Tensor,
    decode_attention: str = "sdpa",
    **_,
) -> torch.Tensor:
    """One query per row against that row's first `position + 1` cache slots."""
    impl = _DECODE_IMPLS[decode_attention]
    out = impl(
        query.transpose(1, 2),
        key_cache,
        value_cache,
        decode_lengths,
        decode_mask,
        scale,
        nheads != kvheads,
    )
    return out.transpose(1, 2)


def _is_prefill(*, prefill: bool = False, **_) -> bool:
    return prefill


register_attention_op(
    ATTN_NAME, _store, _prefill, is_prefill_op=_is_prefill, compute_decode_op=_decode
)


def bucket(length: int, multiple: int) -> int:
    """Round up to a multiple, to bound the number of distinct compiled shapes."""
    return -(-length // multiple) * multiple
