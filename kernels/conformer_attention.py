"""Fused conformer block attention with Shaw relative positions.

transformers builds the position term as a [N, H, C, C] bias (an einsum against a
gathered [C, C, d] embedding tensor) and runs SDPA's MATH path on it. Here one kernel
computes score(i, j) = scale * (q_i . k_j + q_i . rel_pos[i - j + C]) tile by tile with an
online softmax, so neither the bias nor the gathered embeddings ever reach memory.

For a tile of queries i0..i0+BM and keys j0..j0+BN the distances i - j cover a band of
BM + BN - 1 rows of the rel_pos table. The kernel multiplies the query tile by that band
(one more tensor-core matmul) and gathers each (i, j) entry from column i - j + BN - 1 of
the product, which depends only on the offsets inside the tile.

`conformer_attention` is the op "gsopt::conformer_attention" so the compiled encoder calls it
without a graph break: a `triton_op` on GPU, an opaque `custom_op` with a fake impl under
TRITON_INTERPRET=1, whose kernels are plain Python that cannot run on fake tensors.
"""

import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from gsopt.kernels._op import kernel_op


@triton.jit
def _conformer_attention_kernel(
    Q,
    K,
    V,
    RelPos,
    ValidLen,
    Out,
    qk_scale,
    stride_qn,
    stride_qh,
    stride_qc,
    stride_qd,
    stride_kn,
    stride_kh,
    stride_kc,
    stride_kd,
    stride_vn,
    stride_vh,
    stride_vc,
    stride_vd,
    stride_rp,
    stride_rd,
    stride_on,
    stride_oh,
    stride_oc,
    stride_od,
    CONTEXT: tl.constexpr,
    HEADS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One tile of queries of one (block, head) against that block's valid keys."""
    pid_m = tl.program_id(0)
    pid_nh = tl.program_id(1)
    blk = (pid_nh // HEADS).to(tl.int64)  # blk * stride_qn may pass 2**31 for long batches
    h = pid_nh % HEADS
    valid = tl.minimum(tl.load(ValidLen + blk).to(tl.int32), CONTEXT)

    i0 = pid_m * BLOCK_M
    offs_m = i0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < CONTEXT
    q_base = Q + blk * stride_qn + h * stride_qh
    q = tl.load(
        q_base + offs_m[:, None] * stride_qc + offs_d[None, :] * stride_qd,
        mask=mask_m[:, None],
        other=0.0,
    )
    k_base = K + blk * stride_kn + h * stride_kh + offs_d[None, :] * stride_kd
    v_base = V + blk * stride_vn + h * stride_vh + offs_d[None, :] * stride_vd
    # Column of the (query tile x rel_pos band) product that holds distance i - j.
    band_col = tl.arange(0, BLOCK_M)[:, None] - tl.arange(0, BLOCK_N)[None, :] + (BLOCK_N - 1)
    offs_w = tl.arange(0, BLOCK_W)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for j0 in range(0, valid, BLOCK_N):
        offs_n = j0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < valid
        k = tl.load(k_base + offs_n[:, None] * stride_kc, mask=mask_n[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)

        # rel_pos rows (i - j + C) for i in the query tile and j in the key tile.
        rows = i0 - j0 - (BLOCK_N - 1) + CONTEXT + offs_w
        in_table = (rows >= 0) & (rows <= 2 * CONTEXT)
        band = tl.load(
            RelPos + rows[:, None] * stride_rp + offs_d[None, :] * stride_rd,
            mask=in_table[:, None],
            other=0.0,
        )
        pos = tl.dot(q, tl.trans(band), input_precision=PRECISION)
        s = (s + tl.gather(pos, band_col, 1)) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vc, mask=mask_n[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # A fully padded block (valid == 0) never enters the loop: l_i = 0 and the output is 0.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_base = Out + blk * stride_on + h * stride_oh
    tl.store(
        o_base + offs_m[:, None] * stride_oc + offs_d[None, :] * stride_od,
        out.to(Out.dtype.element_ty),
        mask=mask_m[:, None],
    )


def _check(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos: torch.Tensor,
    valid_len: torch.Tensor,
) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share one [N, H, C, d] shape: {q.shape} {k.shape}")
    num_blocks, _, context, dim = q.shape
    if rel_pos.shape != (2 * context + 1, dim):
        raise ValueError(f"rel_pos must be [{2 * context + 1}, {dim}], got {tuple(rel_pos.shape)}")
    if valid_len.shape != (num_blocks,):
        raise ValueError(f"valid_len must be [{num_blocks}], got {tuple(valid_len.shape)}")
    if dim & (dim - 1) or dim < 16:
        raise ValueError(f"head dim must be a power of two >= 16, got {dim}")


def _conformer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos: torch.Tensor,
    valid_len: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Block attention with Shaw relative positions over the first valid_len[n] keys.

    q, k, v [N, H, C, d]; rel_pos [2C + 1, d], row i - j + C for distance i - j;
    valid_len int [N]. Returns [N, H, C, d] in q's dtype; a block with valid_len 0 gives 0.
    """
    _check(q, k, v, rel_pos, valid_len)
    num_blocks, heads, context, dim = q.shape
    launch = conformer_launch(heads, context, dim, q.dtype)
    out = torch.empty((num_blocks, heads, context, dim), device=q.device, dtype=q.dtype)
    grid = (triton.cdiv(context, launch["BLOCK_M"]), num_blocks * heads)
    wrap_triton(_conformer_attention_kernel)[grid](
        q,
        k,
        v,
        rel_pos,
        valid_len,
        out,
        scale * math.log2(math.e),
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *rel_pos.stride(),
        *out.stride(),
        **launch,
    )
    return out


def conformer_launch(heads: int, context: int, dim: int, dtype: torch.dtype) -> dict:
    """Compile-time launch settings. The [BM, 2 * BN] fp32 position product sits in registers
    beside the scores and the accumulator: at d = 128, 32 x 32 tiles with 4 warps compile for
    Hopper without register spills, where 64 x 64 tiles spill with 4 or 8 warps
    (`python -m gsopt.kernels.resources --sweep`). Not tuned by timing: no GPU has run it."""
    # C (200 in the real encoder) need not be a power of two: tiles are padded and masked.
    block = max(16, min(32, triton.next_power_of_2(context)))
    return {
        "CONTEXT": context,
        "HEADS": heads,
        "BLOCK_M": block,
        "BLOCK_N": block,
        "BLOCK_W": 2 * block,
        "HEAD_DIM": dim,
        # fp32 inputs get fp32 products, not TF32, so fp32 stays a tight reference.
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "num_warps": 4,
    }


def _conformer_attention_fake(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos: torch.Tensor,
    valid_len: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return q.new_empty(q.shape)


conformer_attention = kernel_op(
    "gsopt::conformer_attention",
    _conformer_attention,
    _conformer_attention_fake,
    _conformer_attention_kernel,
)


def conformer_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_pos: torch.Tensor,
    valid_len: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Plain torch: gather rel_pos[i - j + C] into [C, C, d], masked softmax in fp32."""
    context = q.shape[2]
    pos = torch.arange(context, device=q.device)
    rel = rel_pos.float()[pos[:, None] - pos[None, :] + context]  # [C, C, d]
    qf = q.float()
    scores = qf @ k.float().transpose(-1, -2) + torch.einsum("nhid,ijd->nhij", qf, rel)
    valid = pos[None, :] < valid_len[:, None]  # [N, C] over keys
    scores = (scores * scale).masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = scores.softmax(-1).nan_to_num(0.0)  # a fully padded block gives zeros
    v = v.float().masked_fill(~valid[:, None, :, None], 0.0)
    return (probs @ v).to(q.dtype)
