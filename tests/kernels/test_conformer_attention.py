"""conformer_attention against its plain-torch reference (interpreted on CPU, native on CUDA)."""

import pytest
import torch

from gsopt.kernels.conformer_attention import conformer_attention, conformer_attention_ref

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# On CPU the op is opaque and Inductor's C++ build would only slow the test down.
COMPILE_BACKEND = "inductor" if torch.cuda.is_available() else "aot_eager"


def make_inputs(valid_len, heads, context, dim, dtype, device, seed=0):
    """q, k, v laid out as the encoder makes them ([N, C, H, d] viewed as [N, H, C, d]).

    Keys and values past each block's valid length are NaN: the kernel must never read them.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks = len(valid_len)
    q, k, v = torch.randn(3, blocks, context, heads, dim, generator=gen).transpose(2, 3)
    rel_pos = torch.randn(2 * context + 1, dim, generator=gen)
    valid_len = torch.tensor(valid_len, dtype=torch.int32)
    past = torch.arange(context)[None, :] >= valid_len[:, None]  # [N, C] over keys
    k = k.masked_fill(past[:, None, :, None], float("nan"))
    v = v.masked_fill(past[:, None, :, None], float("nan"))
    return [t.to(device, dtype) for t in (q, k, v, rel_pos)] + [valid_len.to(device)]


CASES = [  # valid length of each block, heads, context, head dim
    ([6, 6, 6], 2, 6, 16),
    ([10, 10, 7], 2, 10, 32),  # a partial last block
    ([10, 0, 3, 1], 1, 10, 16),  # a fully padded block, a block with a single key
    ([70, 45], 2, 70, 16),  # C spans two tiles: the band crosses tile boundaries
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"C{c[2]}-d{c[3]}-{len(c[0])}blocks")
def test_matches_reference(case, dtype, tol, device, poisoned_empty):
    q, k, v, rel_pos, valid_len = make_inputs(*case, dtype, device)
    scale = case[3] ** -0.5
    out = conformer_attention(q, k, v, rel_pos, valid_len, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    assert (out[valid_len == 0] == 0).all()
    ref = conformer_attention_ref(q, k, v, rel_pos, valid_len, scale)
    torch.testing.assert_close(out.float(), ref.float(), **tol)


def test_position_term_matters(device):
    """These inputs make the position term count: a table read as R(j - i) gives other outputs."""
    q, k, v, rel_pos, valid_len = make_inputs([10, 8], 2, 10, 16, torch.float32, device)
    out = conformer_attention(q, k, v, rel_pos, valid_len, 0.25)
    flipped = conformer_attention_ref(q, k, v, rel_pos.flip(0), valid_len, 0.25)
    assert not torch.allclose(out, flipped, atol=1e-2)


def test_compiles_without_graph_break(device):
    q, k, v, rel_pos, valid_len = make_inputs([6, 4], 2, 6, 16, torch.float32, device)

    def attend(q, k, v, rel_pos, valid_len):
        return conformer_attention(q * 2.0, k, v, rel_pos, valid_len, 0.25).transpose(1, 2)

    compiled = torch.compile(attend, fullgraph=True, backend=COMPILE_BACKEND)
    out = compiled(q, k, v, rel_pos, valid_len)
    ref = conformer_attention_ref(q * 2.0, k, v, rel_pos, valid_len, 0.25).transpose(1, 2)
    torch.testing.assert_close(out, ref)


def test_rejects_wrong_rel_pos_table(device):
    q, k, v, rel_pos, valid_len = make_inputs([6], 1, 6, 16, torch.float32, device)
    with pytest.raises(ValueError, match="rel_pos"):
        conformer_attention(q, k, v, rel_pos[:-1], valid_len, 0.25)


@cuda
def test_encoder_shape_on_cuda():
    """30 s of audio: 8 blocks of 200 frames, 8 heads of 128, a partial last block, bf16."""
    inputs = make_inputs([200] * 7 + [50], 8, 200, 128, torch.bfloat16, "cuda")
    out = conformer_attention(*inputs, 128**-0.5)
    ref = conformer_attention_ref(*inputs, 128**-0.5)
    torch.testing.assert_close(out.float(), ref.float(), rtol=1e-2, atol=1e-2)
