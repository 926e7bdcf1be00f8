"""Conformer encoder and Q-Former projector against transformers, batching and compile."""

from __future__ import annotations

import pytest
import torch
from helpers import REAL_WIDTH_ENCODER, hf_config, reference_model
from torch._dynamo.testing import CompileCounterWithBackend

from gsopt.engine import attention
from gsopt.errors import GsoptError
from gsopt.model.config import from_hf_config
from gsopt.model.encoder import (
    ConformerEncoder,
    encoder_frame_mask,
    set_block_attention,
)
from gsopt.model.projector import QFormerProjector
from gsopt.recipe.settings import parse_recipe

TOL = 1e-5


def _unit_scale(model: torch.nn.Module) -> None:
    """Redraw linear, conv and embedding weights with std 1 / sqrt(fan_in).

    The reference's init (std 0.02) keeps every pre-activation near 0, where attention is
    nearly uniform and GELU's tanh and erf forms agree to 1e-6: such weights hide mistakes.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv1d | torch.nn.Embedding):
                fan_in = module.weight[0].numel()
                module.weight.normal_(0, fan_in**-0.5)


def _build(hf_cfg, seed: int = 0):
    """The transformers reference and gsopt's encoder and projector with its weights."""
    ref = reference_model(hf_cfg, seed=seed)
    _unit_scale(ref.model.encoder)
    _unit_scale(ref.model.projector)
    cfg = from_hf_config(hf_cfg.to_dict())
    enc = ConformerEncoder(cfg.encoder).eval()
    enc.load_state_dict(ref.model.encoder.state_dict(), strict=True)
    proj = QFormerProjector(cfg.projector, cfg.decoder.emb_dim).eval()
    proj.load_state_dict(ref.model.projector.state_dict(), strict=True)
    return ref.model, enc, proj


@pytest.fixture(scope="module")
def tiny():
    return _build(hf_config())


@pytest.fixture(scope="module")
def real_width():
    return _build(hf_config(encoder=REAL_WIDTH_ENCODER))


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# context_size is 8: shorter than a block, one block, blocks with and without a remainder.
@pytest.mark.parametrize("frames", [3, 8, 19, 24])
@pytest.mark.parametrize("impl", ["sdpa", "math"])
@torch.no_grad()
def test_encoder_matches_reference(tiny, frames: int, impl: str):
    ref, enc, _ = tiny
    set_block_attention(enc, ENCODER[impl].load())
    x = torch.randn(2, frames, 160, generator=torch.Generator().manual_seed(frames))
    assert _max_err(enc(x), ref.encoder(x).last_hidden_state) <= TOL
    set_block_attention(enc, ENCODER["sdpa"].load())


@pytest.mark.parametrize("frames", [150, 200, 450])
@torch.no_grad()
def test_encoder_matches_reference_real_width(real_width, frames: int):
    ref, enc, _ = real_width
    x = torch.randn(1, frames, 160, generator=torch.Generator().manual_seed(frames))
    assert _max_err(enc(x), ref.encoder(x).last_hidden_state) <= TOL


@pytest.mark.parametrize("frames", [1, 14, 15, 30, 44])
@torch.no_grad()
def test_projector_matches_reference(tiny, frames: int):
    ref, _, proj = tiny
    x = torch.randn(2, frames, 32, generator=torch.Generator().manual_seed(frames))
    out = proj(x)
    assert out.shape == (2, -(-frames // 15) * 3, 64)
    assert _max_err(out, ref.projector(x)) <= TOL


@torch.no_grad()
def test_batch_equals_one_at_a_time(tiny):
    """Garbage in the padding must not reach real frames, even through fully padded blocks."""
    ref, enc, proj = tiny
    lengths = torch.tensor([5, 8, 19, 31, 13])
    frames = int(lengths.max())
    gen = torch.Generator().manual_seed(0)
    clips = [torch.randn(1, n, 160, generator=gen) for n in lengths.tolist()]
    batch = 100 * torch.randn(len(clips), frames, 160, generator=gen)
    for i, clip in enumerate(clips):
        batch[i, : clip.shape[1]] = clip[0]
    mask = encoder_frame_mask(lengths, frames)

    out = enc(batch, mask)
    assert torch.isfinite(out).all()
    emb = proj(out.masked_fill(~mask[..., None], 0.0))
    emb_lengths = proj.output_lengths(lengths)
    for i, clip in enumerate(clips):
        n = clip.shape[1]
        alone = ref.encoder(clip).last_hidden_state
        assert _max_err(out[i : i + 1, :n], alone) <= TOL
        rows = int(emb_lengths[i])
        assert _max_err(emb[i : i + 1, :rows], ref.projector(alone)) <= TOL


def _naive_block_attention(q, k, v, rel_pos, valid_len, scale):
    """The contract written out score by score, independent of both implementations."""
    ctx = q.shape[-2]
    i = torch.arange(ctx)[:, None]
    j = torch.arange(ctx)[None, :]
    pos = (q[:, :, :, None, :] * rel_pos[i - j + ctx]).sum(-1)
    scores = scale * (q @ k.transpose(-1, -2) + pos)
    scores = scores.masked_fill(j >= valid_len[:, None, None, None], float("-inf"))
    return scores.softmax(-1) @ v


ENCODER = attention.REGISTRY["encoder"]


@torch.no_grad()
def test_block_attention_implementations_agree():
    gen = torch.Generator().manual_seed(0)
    ctx, heads, dim = 8, 2, 16
    valid_len = torch.tensor([8, 8, 3, 0, 1, 8], dtype=torch.int32)
    q, k, v = (torch.randn(len(valid_len), heads, ctx, dim, generator=gen) for _ in range(3))
    rel_pos = torch.randn(2 * ctx + 1, dim, generator=gen)
    want = _naive_block_attention(q, k, v, rel_pos, valid_len, dim**-0.5)
    native = {n: a for n, a in attention.REGISTRY["encoder"].items() if "cpu" in a.devices}
    assert set(native) == {"sdpa", "math"}
    outs = {name: a.load()(q, k, v, rel_pos, valid_len, dim**-0.5) for name, a in native.items()}
    for name, out in outs.items():
        assert torch.isfinite(out).all(), name
        for n, length in enumerate(valid_len.tolist()):
            if length == 0:
                continue  # no valid key: the rows are don't-care (but finite, checked above)
            assert _max_err(out[n, :, :length], want[n, :, :length]) <= TOL, (name, n)


def test_unknown_block_attention_is_refused_when_the_recipe_is_read():
    with pytest.raises(GsoptError, match="attention = 'nope' is not one of auto, sdpa, math"):
        parse_recipe({"encoder": {"attention": "nope"}}, "my.toml")


@torch.no_grad()
def test_encoder_compiles_fullgraph_without_recompiling(tiny):
    """One dynamic graph serves every length above one block and off a block multiple.

    Block padding is shape arithmetic, not a branch on T; only T % C == 0 and T <= C
    (contiguity and size-1 specialisation) get graphs of their own.
    """
    _, enc, _ = tiny
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(enc, backend=counter, fullgraph=True, dynamic=True)
    for frames in (13, 21, 35):
        x = torch.randn(2, frames, 160)
        mask = encoder_frame_mask(torch.tensor([frames, 5]), frames)
        assert _max_err(compiled(x, mask), enc(x, mask)) <= TOL
        if frames == 13:
            graphs = counter.frame_count
    assert counter.frame_count == graphs
