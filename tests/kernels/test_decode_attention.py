"""decode_attention against its plain-torch reference (interpreted on CPU, native on CUDA)."""

import pytest
import torch

from gsopt.kernels.decode_attention import (
    decode_attention,
    decode_attention_ref,
    pick_num_splits,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# On CPU the op is opaque and Inductor's C++ build would only slow the test down.
COMPILE_BACKEND = "inductor" if torch.cuda.is_available() else "aot_eager"


def make_inputs(batch, heads, kv_heads, max_len, dim, dtype, device, seed=0):
    """Random q and cache, per-row lengths from 1 to max_len, NaN/inf past each length."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, dim, generator=gen)
    k = torch.randn(batch, kv_heads, max_len, dim, generator=gen)
    v = torch.randn(batch, kv_heads, max_len, dim, generator=gen)
    lengths = torch.randint(1, max_len + 1, (batch,), generator=gen)
    lengths[0] = 1
    lengths[-1] = max_len
    past = torch.arange(max_len)[None, :] >= lengths[:, None]  # [B, L]
    k[past[:, None, :, None].expand_as(k)] = float("nan")
    v[past[:, None, :, None].expand_as(v)] = float("inf")
    return [t.to(device, dtype) for t in (q, k, v)] + [lengths.to(device)]


SHAPES = [  # batch, heads, kv heads, cache length, head dim
    (1, 4, 4, 7, 16),  # MHA, a cache shorter than one tile
    (2, 4, 4, 37, 16),
    (3, 8, 2, 100, 32),  # GQA 4
    (4, 4, 1, 64, 16),  # GQA 4, a power-of-two cache
]


@pytest.mark.parametrize("num_splits", [None, 1, 2, 3, 8])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, num_splits, dtype, tol, device, poisoned_empty):
    q, k, v, lengths = make_inputs(*shape, dtype, device)
    scale = shape[-1] ** -0.5
    out = decode_attention(q, k, v, lengths, scale, num_splits)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    ref = decode_attention_ref(q, k, v, lengths, scale)
    torch.testing.assert_close(out.float(), ref.float(), **tol)


def test_int32_lengths_and_strided_query(device):
    """q may be a strided view (here every other element, NaN between) and lengths int32."""
    q, k, v, lengths = make_inputs(2, 8, 2, 50, 16, torch.float32, device)
    q = torch.stack([q, torch.full_like(q, float("nan"))], -1).flatten(-2)[..., ::2]
    lengths = lengths.int()
    out = decode_attention(q, k, v, lengths, 0.25, 2)
    torch.testing.assert_close(out, decode_attention_ref(q, k, v, lengths, 0.25))


def test_splits_fill_the_gpu_but_stay_long():
    assert pick_num_splits(1, 8, 1024, num_sms=132) == 16  # 64 positions a split at least
    assert pick_num_splits(1, 8, 4096, num_sms=132) == 33  # 2 x 132 programs
    assert pick_num_splits(64, 8, 1024, num_sms=132) == 1  # batch fills the GPU already
    assert pick_num_splits(1, 8, 100, num_sms=132) == 1
    assert pick_num_splits(1, 1, 1 << 20, num_sms=132) == 64


def test_short_rows_in_a_large_cache(device, poisoned_empty):
    """Each row's own length is divided among the splits: rows of 3 and 70 positions in a
    512-position cache cut into 8 splits still give the reference's result (and the long
    rows with them)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(4, h, n, 16, generator=gen) for h, n in ((8, 1), (2, 512), (2, 512)))
    lengths = torch.tensor([3, 70, 300, 512])
    past = torch.arange(512)[None, :] >= lengths[:, None]
    k[past[:, None, :, None].expand_as(k)] = float("nan")
    q, k, v, lengths = (t.to(device) for t in (q, k, v, lengths))
    out = decode_attention(q, k, v, lengths, 0.25, 8)
    torch.testing.assert_close(out, decode_attention_ref(q, k, v, lengths, 0.25))


def test_compiles_without_graph_break(device):
    q, k, v, lengths = make_inputs(2, 4, 2, 20, 16, torch.float32, device)

    def step(q, k, v, lengths):
        return decode_attention(q * 2.0, k, v, lengths, 0.5) + 1.0

    out = torch.compile(step, fullgraph=True, backend=COMPILE_BACKEND)(q, k, v, lengths)
    torch.testing.assert_close(out, decode_attention_ref(q * 2.0, k, v, lengths, 0.5) + 1.0)


def test_rejects_mismatched_heads(device):
    q, k, v, lengths = make_inputs(1, 6, 4, 8, 16, torch.float32, device)
    with pytest.raises(ValueError, match="does not fit"):
        decode_attention(q, k, v, lengths, 1.0)


@cuda
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("max_len", [128, 1000])
def test_decoder_shapes_on_cuda(batch, max_len):
    """The 3.3-8b decoder's heads (32 over 8 kv heads of 128) in bf16."""
    q, k, v, lengths = make_inputs(batch, 32, 8, max_len, 128, torch.bfloat16, "cuda")
    out = decode_attention(q, k, v, lengths, 128**-0.5)
    ref = decode_attention_ref(q, k, v, lengths, 128**-0.5)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


@cuda
def test_cuda_graph_replay_follows_lengths():
    """A captured step must read lengths at replay time, as a static-cache decode does."""
    q, k, v, lengths = make_inputs(2, 8, 2, 256, 64, torch.float16, "cuda")
    lengths.copy_(torch.tensor([3, 17]))
    decode_attention(q, k, v, lengths, 0.125)  # warm up (compile the kernels)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, lengths, 0.125)
    k.nan_to_num_(0.0)
    v.nan_to_num_(0.0, posinf=0.0)
    lengths.copy_(torch.tensor([200, 256]))
    graph.replay()
    ref = decode_attention_ref(q, k, v, lengths, 0.125)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
