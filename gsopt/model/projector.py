"""Granite Speech projector: a BLIP-2 Q-Former run on fixed windows of encoder frames.

Parameter names equal transformers' `GraniteSpeechEncoderProjector` (its `qformer` is a
`Blip2QFormerModel` used on learned queries only), so its state dict loads strictly. Each
window of W encoder frames becomes Q = W / downsample_rate rows in the text embedding space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gsopt.model.config import QFormerConfig


class QFormerMultiHeadAttention(nn.Module):
    def __init__(self, config: QFormerConfig, kv_dim: int):
        super().__init__()
        self.num_heads = config.num_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_dim, config.hidden_size)
        self.value = nn.Linear(kv_dim, config.hidden_size)

    def forward(self, x: Tensor, states: Tensor) -> Tensor:
        """x [Bq, Lq, H] attends to states [N, Lk, kv_dim]; Bq is 1 or N (queries broadcast)."""
        q, k, v = (
            t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
            for t in (self.query(x), self.key(states), self.value(states))
        )
        q = q.expand(k.shape[0], -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).flatten(-2)


class QFormerAddNorm(nn.Module):
    """Post-norm residual: LayerNorm(x + dense(h))."""

    def __init__(self, in_dim: int, config: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(in_dim, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, h: Tensor, x: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(h) + x)


class QFormerAttention(nn.Module):
    def __init__(self, config: QFormerConfig, kv_dim: int):
        super().__init__()
        self.attention = QFormerMultiHeadAttention(config, kv_dim)
        self.output = QFormerAddNorm(config.hidden_size, config)

    def forward(self, x: Tensor, states: Tensor) -> Tensor:
        return self.output(self.attention(x, states), x)


class QFormerIntermediate(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class QFormerLayer(nn.Module):
    def __init__(self, config: QFormerConfig, layer_idx: int):
        super().__init__()
        self.attention = QFormerAttention(config, config.hidden_size)
        self.has_cross_attention = layer_idx % config.cross_attention_frequency == 0
        if self.has_cross_attention:
            self.crossattention = QFormerAttention(config, config.encoder_hidden_size)
        self.intermediate_query = QFormerIntermediate(config)
        self.output_query = QFormerAddNorm(config.intermediate_size, config)

    def forward(self, x: Tensor, windows: Tensor) -> Tensor:
        x = self.attention(x, x)
        if self.has_cross_attention:
            x = self.crossattention(x, windows)
        return self.output_query(self.intermediate_query(x), x)


class QFormerEncoder(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.layer = nn.ModuleList([QFormerLayer(config, i) for i in range(config.num_layers)])


class QFormer(nn.Module):
    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = QFormerEncoder(config)

    def forward(self, queries: Tensor, windows: Tensor) -> Tensor:
        """queries [1, Q, H], windows [N, W, D] -> [N, Q, H]."""
        x = self.layernorm(queries)
        for layer in self.encoder.layer:
            x = layer(x, windows)
        return x.expand(windows.shape[0], -1, -1)


class QFormerProjector(nn.Module):
    """Encoder frames [B, T, D] -> audio embeddings [B, ceil(T / W) * Q, out_dim].

    The last window is zero-padded, as in the reference. In a padded batch the caller must
    zero the encoder output at padded frames first: a clip's last window then holds the same
    values as when the clip runs alone, so its first `output_lengths` rows equal the lone
    result. Windows made only of padding yield rows to drop.
    """

    def __init__(self, config: QFormerConfig, out_dim: int):
        super().__init__()
        self.config = config
        self.query = nn.Parameter(torch.zeros(1, config.num_queries, config.hidden_size))
        self.qformer = QFormer(config)
        self.linear = nn.Linear(config.hidden_size, out_dim)

    def output_lengths(self, encoder_lengths: Tensor) -> Tensor:
        """Audio embedding rows of each clip: ceil(frames / W) * Q."""
        window = self.config.window_size
        return (encoder_lengths + window - 1) // window * self.config.num_queries

    def forward(self, encoder_out: Tensor) -> Tensor:
        batch, frames, dim = encoder_out.shape
        window = self.config.window_size
        num_windows = -(-frames // window)
        windows = F.pad(encoder_out, (0, 0, 0, num_windows * window - frames))
        windows = windows.view(batch * num_windows, window, dim)
        out = self.qformer(self.query, windows)
        return self.linear(out.reshape(batch, num_windows * self.config.num_queries, -1))
