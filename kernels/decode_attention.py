"""Flash-decoding attention: one query token per row against a static KV cache.

Batch-1 decode reads the whole cache once per step, so the kernel is bound by memory
bandwidth. With few (batch x kv head) rows the GPU would sit mostly idle, so the cache
length is cut into splits (split-K); each split writes a partial output and its log-sum-exp,
and a second small kernel merges them. Each program serves one kv head and all of its
query heads (GQA), so K/V are read once per kv head and never expanded.

`decode_attention` is the op "gsopt::decode_attention", so a compiled decode step calls it
without a graph break: a `triton_op` on GPU (Inductor sees and launches the kernels
itself), an opaque `custom_op` with a fake impl under TRITON_INTERPRET=1, whose kernels
are plain Python that cannot run on fake tensors.
"""

import functools
import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from gsopt.kernels._op import kernel_op

# Each split covers at least this many cache positions: shorter splits cost more in merge
# traffic and launch than they win in parallelism.
MIN_SPLIT_LEN = 64
MAX_SPLITS = 64


@triton.jit
def _decode_split_kernel(
    Q,
    K,
    V,
    Lengths,
    OutPart,
    LsePart,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    max_len,
    KV_HEADS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Attention of GROUP query heads over one split of one kv head's cache (base-2 lse).

    The row's valid length is cut into NUM_SPLITS whole blocks, so a short row in a large
    cache still spreads over many programs; splits past the length are empty."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // KV_HEADS).to(tl.int64)  # b * stride_kb can pass 2**31 for a large cache
    kvh = pid % KV_HEADS
    length = tl.minimum(tl.load(Lengths + b).to(tl.int32), max_len)
    split_len = tl.cdiv(length, NUM_SPLITS * BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, length)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = kvh * GROUP + offs_g
    mask_g = offs_g < GROUP
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=mask_g[:, None],
        other=0.0,
    )
    k_base = K + b * stride_kb + kvh * stride_kh + offs_d[None, :] * stride_kd
    v_base = V + b * stride_vb + kvh * stride_vh + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        # Masked loads: positions at or past `length` are never read, so garbage there
        # (stale tokens, NaN) cannot leak into the result.
        k = tl.load(k_base + offs_n[:, None] * stride_kn, mask=mask_n[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn, mask=mask_n[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # An empty split (start >= length) contributes weight zero to the merge.
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    row = (b * KV_HEADS * GROUP + heads) * NUM_SPLITS + split
    tl.store(OutPart + row[:, None] * HEAD_DIM + offs_d[None, :], out, mask=mask_g[:, None])
    tl.store(LsePart + row, lse, mask=mask_g)


@triton.jit
def _decode_merge_kernel(
    OutPart,
    LsePart,
    Out,
    stride_ob,
    stride_oh,
    stride_od,
    HEADS: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Log-sum-exp weighted sum of the per-split outputs of one (batch, head)."""
    pid = tl.program_id(0)
    b = pid // HEADS
    h = pid % HEADS
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_s = offs_s < NUM_SPLITS
    lse = tl.load(LsePart + pid * NUM_SPLITS + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(lse > float("-inf"), tl.exp2(lse - m), 0.0)
    o = tl.load(
        OutPart + (pid * NUM_SPLITS + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
        mask=mask_s[:, None],
        other=0.0,
    )
    denom = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d * stride_od, out.to(Out.dtype.element_ty))


@functools.cache
def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill; the CPU interpreter counts as one."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick_num_splits(batch: int, kv_heads: int, max_len: int, num_sms: int) -> int:
    """Splits so that (batch x kv heads x splits) programs fill the GPU about twice over.

    Depends only on shapes (never on `lengths`), so it needs no host sync and a captured
    CUDA graph stays valid as the cache fills.
    """
    wanted = triton.cdiv(2 * num_sms, batch * kv_heads)
    return max(1, min(wanted, max_len // MIN_SPLIT_LEN, MAX_SPLITS))


def _check(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, lengths: torch.Tensor
) -> None:
    if q.dim() != 4 or q.shape[2] != 1:
        raise ValueError(f"q must be [B, H, 1, D], got {tuple(q.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4:
        raise ValueError(f"k/v caches differ or are not 4-D: {k_cache.shape} {v_cache.shape}")
    (batch, heads, _, dim), (kb, kv_heads, _, kd) = q.shape, k_cache.shape
    if kb != batch or kd != dim or heads % kv_heads:
        raise ValueError(f"q {tuple(q.shape)} does not fit cache {tuple(k_cache.shape)}")
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must be [{batch}], got {tuple(lengths.shape)}")
    if dim & (dim - 1) or dim < 16:
        raise ValueError(f"head dim must be a power of two >= 16, got {dim}")


def split_launch(
    batch: int,
    heads: int,
    kv_heads: int,
    max_len: int,
    dim: int,
    dtype: torch.dtype,
    num_splits: int | None,
    num_sms: int,
) -> dict:
    """The split kernel's compile-time launch settings.

    From shapes alone (never from lengths), so a captured graph stays valid as the cache
    fills; the kernel divides each row's own length among the splits. 64-position tiles
    compile for Hopper without register spills with 8 warps at head dim 128 (4 warps spill
    8 bytes there; `python -m gsopt.kernels.resources --sweep`); 128-position tiles spill.
    """
    block_n = max(16, min(64, triton.next_power_of_2(max_len)))
    if num_splits is None:
        num_splits = pick_num_splits(batch, kv_heads, max_len, num_sms)
    group = heads // kv_heads
    return {
        "KV_HEADS": kv_heads,
        "NUM_SPLITS": max(1, min(num_splits, triton.cdiv(max_len, block_n))),
        "GROUP": group,
        "BLOCK_G": max(16, triton.next_power_of_2(group)),
        "BLOCK_N": block_n,
        "HEAD_DIM": dim,
        # fp32 inputs get fp32 products, not TF32, so fp32 stays a tight reference.
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "num_warps": 8 if dim >= 128 else 4,
    }


def _decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """softmax(scale * q K^T) V over the first lengths[b] cache positions of each row.

    q [B, H, 1, D]; k_cache, v_cache [B, Hkv, Lmax, D]; lengths int [B]. Returns
    [B, H, 1, D] in q's dtype. Query head h reads kv head h // (H // Hkv).
    """
    _check(q, k_cache, v_cache, lengths)
    batch, heads, _, dim = q.shape
    kv_heads, max_len = k_cache.shape[1], k_cache.shape[2]
    launch = split_launch(
        batch, heads, kv_heads, max_len, dim, q.dtype, num_splits, _num_sms(q.device)
    )
    num_splits = launch["NUM_SPLITS"]

    out_part = torch.empty((batch, heads, num_splits, dim), device=q.device, dtype=torch.float32)
    lse_part = torch.empty((batch, heads, num_splits), device=q.device, dtype=torch.float32)
    out = torch.empty((batch, heads, 1, dim), device=q.device, dtype=q.dtype)
    wrap_triton(_decode_split_kernel)[(batch * kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        lengths,
        out_part,
        lse_part,
        scale * math.log2(math.e),
        q.stride(0),
        q.stride(1),
        q.stride(3),
        *k_cache.stride(),
        *v_cache.stride(),
        max_len,
        **launch,
    )
    wrap_triton(_decode_merge_kernel)[(batch * heads,)](
        out_part,
        lse_part,
        out,
        out.stride(0),
        out.stride(1),
        out.stride(3),
        HEADS=heads,
        NUM_SPLITS=num_splits,
        BLOCK_S=triton.next_power_of_2(num_splits),
        HEAD_DIM=dim,
    )
    return out


def _decode_attention_fake(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    return q.new_empty(q.shape)


decode_attention = kernel_op(
    "gsopt::decode_attention", _decode_attention, _decode_attention_fake, _decode_split_kernel
)


def decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Plain torch: expand K/V to every query head, mask past lengths, softmax in fp32."""
    del num_splits  # same signature as the kernel; splitting does not change the math
    group = q.shape[1] // k_cache.shape[1]
    k = k_cache.float().repeat_interleave(group, dim=1)
    v = v_cache.float().repeat_interleave(group, dim=1)
    valid = torch.arange(k.shape[2], device=q.device)[None, :] < lengths[:, None]  # [B, L]
    scores = (q.float() @ k.transpose(-1, -2)) * scale  # [B, H, 1, L]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    # Zero the masked values too: the cache may hold NaN there and 0 * NaN is NaN.
    v = v.masked_fill(~valid[:, None, :, None], 0.0)
    return (scores.softmax(-1) @ v).to(q.dtype)
