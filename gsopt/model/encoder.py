"""Granite Speech conformer encoder (block attention with Shaw relative positions), masked.

Parameter names equal transformers' `GraniteSpeechCTCEncoder`, so its state dict loads strictly.
Unlike the reference, the encoder takes a frame mask: padded frames are never attended to and
never reach the depthwise convolution, so a clip inside a padded batch gives the same output on
its real frames as the clip alone. All padding is shape arithmetic (no `.item()`, no branches on
the data), so the forward compiles with `torch.compile(fullgraph=True)`.

The attention inside each block of C frames is pluggable (`set_block_attention`; the
implementations are listed in `gsopt.engine.attention`) so a fused kernel can replace the
torch ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from gsopt.errors import GsoptError
from gsopt.model.config import ConformerConfig, check_cat_hidden_layers

# fn(q, k, v, rel_pos, valid_len, scale) -> out. q, k, v: [N, H, C, d] (N = batch x blocks);
# rel_pos: [2C + 1, d], row i - j + C holds distance i - j; valid_len: int32 [N], the number of
# valid keys of each block (a prefix); out: [N, H, C, d]. score(i, j) = scale * (q_i . k_j +
# q_i . rel_pos[i - j + C]) for j < valid_len, masked otherwise. Rows i >= valid_len are
# don't-care but must be finite, also when valid_len is 0.
BlockAttentionFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, float], Tensor]


def _masked_position_bias(pos: Tensor, valid_len: Tensor) -> Tensor:
    """Keep the position scores of valid keys; the rest get the most negative finite value.

    A block without valid keys keeps its first key, so its (discarded) rows stay finite in
    every dtype instead of softmaxing a row of -max plus a large negative q.k (-inf in fp16).
    """
    keys = torch.arange(pos.shape[-1], device=pos.device)
    valid = keys < valid_len.clamp(min=1)[:, None, None, None]
    return torch.where(valid, pos, torch.finfo(pos.dtype).min)


def sdpa_block_attention(
    q: Tensor, k: Tensor, v: Tensor, rel_pos: Tensor, valid_len: Tensor, scale: float
) -> Tensor:
    """Relative positions as q @ rel_pos^T ([C, 2C + 1] scores), skewed to [C, C] by a view.

    With the table reversed, column m of row i holds distance C - m, and the flat element
    C + i * 2C + j of the [C, 2C + 1] scores is row i, column C - i + j: distance i - j. So
    the relative-to-absolute step is a strided view, with no [C, C, d] gather.
    """
    ctx = q.shape[-2]
    pos = q @ rel_pos.flip(0).transpose(0, 1)
    pos = pos.flatten(-2)[..., ctx:].unflatten(-1, (ctx, 2 * ctx))[..., :ctx]
    bias = _masked_position_bias(pos * scale, valid_len)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def math_block_attention(
    q: Tensor, k: Tensor, v: Tensor, rel_pos: Tensor, valid_len: Tensor, scale: float
) -> Tensor:
    """The reference's computation: gather [C, C, d] embeddings, einsum, SDPA's MATH backend."""
    ctx = q.shape[-2]
    seq = torch.arange(ctx, device=q.device)
    rel = rel_pos[seq[:, None] - seq[None, :] + ctx]
    pos = torch.einsum("bhcd,crd->bhcr", q, rel) * scale
    bias = _masked_position_bias(pos, valid_len)
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def encoder_frame_mask(lengths: Tensor, num_frames: int) -> Tensor:
    """[B, num_frames] bool, True on the first `lengths[b]` frames of each clip."""
    return torch.arange(num_frames, device=lengths.device) < lengths[:, None]


def block_valid_lengths(frame_mask: Tensor, context_size: int) -> Tensor:
    """Valid frames of each block of `context_size` frames, int32 [B * num_blocks].

    `frame_mask` must be a prefix mask per clip (as from `encoder_frame_mask`), so the valid
    frames of every block are a prefix of it.
    """
    batch, frames = frame_mask.shape
    num_blocks = -(-frames // context_size)
    padded = F.pad(frame_mask, (0, num_blocks * context_size - frames))
    return padded.view(batch * num_blocks, context_size).sum(-1, dtype=torch.int32)


class ConformerFeedForward(nn.Module):
    def __init__(self, config: ConformerConfig):
        super().__init__()
        inner = config.hidden_dim * config.feedforward_mult
        self.pre_norm = nn.LayerNorm(config.hidden_dim)
        self.up_proj = nn.Linear(config.hidden_dim, inner)
        self.down_proj = nn.Linear(inner, config.hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.up_proj(self.pre_norm(x))))


class ShawBlockAttention(nn.Module):
    """What every Granite Speech encoder attention shares: blocks of `context_size` frames,
    Shaw relative positions (`rel_pos_emb`) and a pluggable `block_attention` function.
    Subclasses own the projections and call `pad_to_blocks` and `attend`."""

    def __init__(self, num_heads: int, dim_head: int, context_size: int, max_pos_emb: int):
        super().__init__()
        if not 0 < context_size <= max_pos_emb:
            raise GsoptError(
                f"encoder context_size {context_size} must be in 1..max_pos_emb ({max_pos_emb})"
            )
        self.context_size = context_size
        self.max_pos_emb = max_pos_emb
        self.num_heads = num_heads
        self.dim_head = dim_head
        self.scale = dim_head**-0.5
        self.rel_pos_emb = nn.Embedding(2 * max_pos_emb + 1, dim_head)
        self.block_attention: BlockAttentionFn = sdpa_block_attention

    def pad_to_blocks(self, h: Tensor) -> Tensor:
        """[B, T, D] -> [B, ceil(T / C) * C, D], zeros at the end."""
        frames = h.shape[1]
        return F.pad(h, (0, 0, 0, -(-frames // self.context_size) * self.context_size - frames))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, valid_len: Tensor) -> Tensor:
        """q, k, v [B, T, H * d] with T a multiple of C -> [B, T, H * d], each block alone.

        valid_len: int32 [B * T / C] from `block_valid_lengths`.
        """
        ctx = self.context_size
        batch, frames, _ = q.shape
        q, k, v = (
            t.reshape(batch * (frames // ctx), ctx, self.num_heads, self.dim_head).transpose(1, 2)
            for t in (q, k, v)
        )
        centre = self.max_pos_emb
        rel_pos = self.rel_pos_emb.weight[centre - ctx : centre + ctx + 1]
        out = self.block_attention(q, k, v, rel_pos, valid_len, self.scale)
        return out.transpose(1, 2).reshape(batch, frames, -1)


class ConformerAttention(ShawBlockAttention):
    """Pre-norm block attention of the Granite Speech 3.x/4.x encoder (fused k/v)."""

    def __init__(self, config: ConformerConfig):
        super().__init__(config.num_heads, config.dim_head, config.context_size, config.max_pos_emb)
        inner = config.num_heads * config.dim_head
        self.pre_norm = nn.LayerNorm(config.hidden_dim)
        self.to_q = nn.Linear(config.hidden_dim, inner, bias=False)
        self.to_kv = nn.Linear(config.hidden_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, config.hidden_dim)

    def forward(self, x: Tensor, valid_len: Tensor) -> Tensor:
        """x [B, T, D]; valid_len int32 [B * ceil(T / C)] from `block_valid_lengths`."""
        h = self.pad_to_blocks(self.pre_norm(x))
        k, v = self.to_kv(h).chunk(2, dim=-1)
        out = self.attend(self.to_q(h), k, v, valid_len)
        # Crop after the projection: a cropped input would make compile guard on T % C.
        return self.to_out(out)[:, : x.shape[1]]


class DepthWiseConv1d(nn.Module):
    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        # The reference's padding: symmetric for odd kernels, one less on the right for even.
        self.padding = (kernel_size // 2, kernel_size // 2 - (kernel_size + 1) % 2)
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, self.padding))


POINTWISE_CONVS = ("up_conv", "down_conv")


def pointwise_weight(name: str, tensor: Tensor) -> Tensor:
    """A checkpoint's kernel-1 Conv1d weight [out, in, 1] as the Linear weight [out, in] that
    gsopt's conv module holds in its place (other tensors unchanged)."""
    module, _, kind = name.rpartition(".")
    if kind == "weight" and module.rpartition(".")[2] in POINTWISE_CONVS and tensor.dim() == 3:
        return tensor.squeeze(-1)
    return tensor


class ConformerConvModule(nn.Module):
    """The reference's kernel-1 convolutions (`up_conv`, `down_conv`) are Linears over
    channels-last frames: the same product, which the recipes' linear kernels (oneDNN, int8
    activations, bf16) then reach; checkpoints' [out, in, 1] weights load squeezed."""

    def __init__(self, config: ConformerConfig):
        super().__init__()
        inner = config.hidden_dim * config.conv_expansion_factor
        self.norm = nn.LayerNorm(config.hidden_dim)
        self.up_conv = nn.Linear(config.hidden_dim, 2 * inner)
        self.depth_conv = DepthWiseConv1d(inner, config.conv_kernel_size)
        self.batch_norm = nn.BatchNorm1d(inner)
        self.down_conv = nn.Linear(inner, config.hidden_dim)
        self._register_load_state_dict_pre_hook(self._squeeze_pointwise)

    @staticmethod
    def _squeeze_pointwise(state_dict, prefix, *args) -> None:
        for conv in POINTWISE_CONVS:
            key = f"{prefix}{conv}.weight"
            if key in state_dict:
                state_dict[key] = pointwise_weight(key, state_dict[key])

    def forward(self, x: Tensor, frame_mask: Tensor | None) -> Tensor:
        h = F.glu(self.up_conv(self.norm(x)), dim=-1)
        if frame_mask is not None:
            # A lone clip is zero-padded at its end: padded frames must look the same.
            h = h.masked_fill(~frame_mask[:, :, None], 0.0)
        h = F.silu(self.batch_norm(self.depth_conv(h.transpose(1, 2))))
        return self.down_conv(h.transpose(1, 2))


class ConformerBlock(nn.Module):
    def __init__(self, config: ConformerConfig):
        super().__init__()
        self.ff1 = ConformerFeedForward(config)
        self.attn = ConformerAttention(config)
        self.conv = ConformerConvModule(config)
        self.ff2 = ConformerFeedForward(config)
        self.post_norm = nn.LayerNorm(config.hidden_dim)

    def forward(self, x: Tensor, valid_len: Tensor, frame_mask: Tensor | None) -> Tensor:
        x = x + 0.5 * self.ff1(x)
        x = x + self.attn(x, valid_len)
        x = x + self.conv(x, frame_mask)
        x = x + 0.5 * self.ff2(x)
        return self.post_norm(x)


def check_frame_mask(features: Tensor, frame_mask: Tensor | None) -> Tensor | None:
    """The mask as bool, or a one-line GsoptError when it does not mark the feature rows.

    transformers' Granite Speech processor makes `input_features_mask` over projector outputs
    (audio tokens); gsopt's marks the rows of `input_features`, so that mask cannot be
    passed on as it is.
    """
    if frame_mask is None:
        return None
    if frame_mask.shape != features.shape[:2]:
        raise GsoptError(
            f"input_features_mask has shape {tuple(frame_mask.shape)}, expected "
            f"{tuple(features.shape[:2])} (batch x feature frames, one per row of "
            "input_features, not one per audio token): build it with "
            "gsopt.model.encoder.encoder_frame_mask(feature_lengths, frames)"
        )
    return frame_mask.bool()


class ConformerEncoder(nn.Module):
    """features [B, T, input_dim] -> [B, T, config.output_size], 50 frames a second.

    The output is the last block's (hidden_dim wide), preceded on the feature axis by the
    outputs of `cat_hidden_layers` (Granite Speech Plus). With a frame mask the outputs at
    padded frames are finite but meaningless: zero them before the projector (which sees
    whole windows) to get the same result as a clip alone. Compiled with dynamic shapes, one
    graph serves every T > C off a multiple of C; T <= C and T % C == 0 specialise (size-1
    and contiguity guards), so at most three graphs.
    """

    def __init__(self, config: ConformerConfig):
        super().__init__()
        check_cat_hidden_layers(config)
        self.config = config
        self.input_linear = nn.Linear(config.input_dim, config.hidden_dim)
        self.layers = nn.ModuleList([ConformerBlock(config) for _ in range(config.num_layers)])
        # CTC head: only its feedback after the middle block is used.
        self.out = nn.Linear(config.hidden_dim, config.output_dim)
        self.out_mid = nn.Linear(config.output_dim, config.hidden_dim)
        # granite-speech-4.1's BPE CTC head over the final hidden states (CTC drafts): label
        # 0 is the blank, label i > 0 is text token i - 1. The forward does not use it.
        self.out_llm = (
            nn.Linear(config.hidden_dim, config.bpe_output_dim) if config.bpe_output_dim else None
        )

    def forward(self, features: Tensor, frame_mask: Tensor | None = None) -> Tensor:
        """frame_mask: [B, T] bool, a prefix of True per clip (see `encoder_frame_mask`)."""
        return self.forward_with_posteriors(features, frame_mask)[0]

    def forward_with_posteriors(
        self, features: Tensor, frame_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """The output and the middle block's CTC posteriors [B, T, output_dim] (the softmax
        its feedback adds back): the BPE CTC draft weighs frames by their blank probability."""
        frame_mask = check_frame_mask(features, frame_mask)
        block_mask = frame_mask
        if block_mask is None:
            block_mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        valid_len = block_valid_lengths(block_mask, self.config.context_size)
        x = self.input_linear(features)
        exported = [x] if 0 in self.config.cat_hidden_layers else []
        mid = len(self.layers) // 2
        posteriors = None  # a one-block encoder has no middle feedback
        for idx, layer in enumerate(self.layers, start=1):
            x = layer(x, valid_len, frame_mask)
            if idx == mid:
                posteriors = self.out(x).softmax(dim=-1)
                x = x + self.out_mid(posteriors)
            # After the feedback: transformers exports the middle block's output and then
            # adds the feedback to that same tensor in place, so its export includes it.
            if idx in self.config.cat_hidden_layers:
                exported.append(x)
        return (torch.cat([*exported, x], dim=-1) if exported else x), posteriors


def set_block_attention(encoder: nn.Module, impl: BlockAttentionFn) -> None:
    """Use `impl` in every block attention of `encoder` (3.x/4.x conformers and the 5.0 CTC
    model alike)."""
    for module in encoder.modules():
        if isinstance(module, ShawBlockAttention):
            module.block_attention = impl
