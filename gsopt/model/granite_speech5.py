"""Granite Speech 5.0 on FMS: an encoder-only conformer with a CTC head, masked.

Laid out like FMS's model files: the blocks, the model, the named variants registered with
`register_model`, then the `hf` checkpoint adapter. Parameter names equal transformers'
`GraniteSpeech5ForCTC`, so its checkpoints load as they are.

Differences from the 3.x/4.x encoder (gsopt.model.encoder): the blocks in `subsample_layers` halve
time (a stride-2 depthwise convolution plus the residual mean-pooled over pairs of frames,
an odd last frame dropped), q/k/v are separate projections, the conv module's pointwise
stages are Linear layers and its BatchNorm stays in float32. The self-conditioning feedback
after block N // 2 runs over the 16,384 BPE units, and the final CTC head shares its weights.

A frame mask keeps padding out of every clip's real frames (attention keys, conv inputs,
pairs pooled), as transformers' reference does, so a clip in a padded batch gives the same
logits on its own output frames as the clip alone. Shapes come from tensor sizes only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from fms import models
from fms.utils import serialization
from torch import Tensor, nn

from gsopt.audio.frontend import HOP_LENGTH
from gsopt.errors import GsoptError
from gsopt.model.config import CTC_MODEL_TYPE, CTC_VARIANTS, GraniteSpeechCTCConfig
from gsopt.model.encoder import ShawBlockAttention, block_valid_lengths, check_frame_mask
from gsopt.model.family import Family, register_family

ARCHITECTURE = CTC_MODEL_TYPE


class FP32BatchNorm1d(nn.BatchNorm1d):
    """BatchNorm computed and stored in float32 whatever the model's dtype.

    transformers keeps these modules in float32 (`_keep_in_fp32_modules_strict`); the
    statistics lose too much in bfloat16. Moves and casts of the model move these tensors
    but never cast them: a cast keeps the original float32 values, not a rounded copy.
    """

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.float()).to(x.dtype)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> FP32BatchNorm1d:
        def keep_fp32(t: Tensor) -> Tensor:
            moved = fn(t)
            if not t.is_floating_point() or moved.dtype == torch.float32:
                return moved
            return moved.float() if t.is_meta else t.to(moved.device, torch.float32)

        return super()._apply(keep_fp32, recurse)


class CTCFeedForward(nn.Module):
    def __init__(self, config: GraniteSpeechCTCConfig):
        super().__init__()
        self.linear1 = nn.Linear(config.hidden_dim, config.intermediate_size, config.ffn_bias)
        self.linear2 = nn.Linear(config.intermediate_size, config.hidden_dim, config.ffn_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(F.silu(self.linear1(x)))


class CTCAttention(ShawBlockAttention):
    """Block attention with separate q/k/v projections (no bias) and an output bias."""

    def __init__(self, config: GraniteSpeechCTCConfig):
        super().__init__(config.num_heads, config.dim_head, config.context_size, config.max_pos_emb)
        inner = config.num_heads * config.dim_head
        self.q_proj = nn.Linear(config.hidden_dim, inner, bias=False)
        self.k_proj = nn.Linear(config.hidden_dim, inner, bias=False)
        self.v_proj = nn.Linear(config.hidden_dim, inner, bias=False)
        self.o_proj = nn.Linear(inner, config.hidden_dim)

    def forward(self, x: Tensor, valid_len: Tensor) -> Tensor:
        """x [B, T, D], already normalised; valid_len from `block_valid_lengths`."""
        h = self.pad_to_blocks(x)
        out = self.attend(self.q_proj(h), self.k_proj(h), self.v_proj(h), valid_len)
        return self.o_proj(out)[:, : x.shape[1]]


class CTCConvModule(nn.Module):
    """Pointwise (Linear) -> GLU -> depthwise conv (stride 1 or 2) -> BatchNorm -> SiLU ->
    pointwise. Stride 2 gives ceil(T / 2) frames; the block keeps the first T // 2."""

    def __init__(self, config: GraniteSpeechCTCConfig, stride: int):
        super().__init__()
        inner = config.hidden_dim * config.conv_expansion_factor
        kernel = config.conv_kernel_size
        self.pointwise_lin1 = nn.Linear(config.hidden_dim, 2 * inner)
        self.depthwise_conv = nn.Conv1d(
            inner, inner, kernel, stride=stride, padding=(kernel - 1) // 2, groups=inner, bias=False
        )
        self.norm = FP32BatchNorm1d(inner, dtype=torch.float32)
        self.pointwise_lin2 = nn.Linear(inner, config.hidden_dim)

    def forward(self, x: Tensor, frame_mask: Tensor | None) -> Tensor:
        h = F.glu(self.pointwise_lin1(x), dim=-1)
        if frame_mask is not None:
            # A lone clip is zero-padded at its end: padded frames must look the same.
            h = h.masked_fill(~frame_mask[..., None], 0.0)
        h = F.silu(self.norm(self.depthwise_conv(h.transpose(1, 2))))
        return self.pointwise_lin2(h.transpose(1, 2))


class CTCConformerBlock(nn.Module):
    """Macaron conformer block; with `subsample`, T frames in and T // 2 out."""

    def __init__(self, config: GraniteSpeechCTCConfig, subsample: bool):
        super().__init__()
        self.subsample = subsample
        self.feed_forward1 = CTCFeedForward(config)
        self.self_attn = CTCAttention(config)
        self.conv = CTCConvModule(config, stride=2 if subsample else 1)
        self.feed_forward2 = CTCFeedForward(config)
        self.norm_feed_forward1 = nn.LayerNorm(config.hidden_dim)
        self.norm_self_att = nn.LayerNorm(config.hidden_dim)
        self.norm_conv = nn.LayerNorm(config.hidden_dim)
        self.norm_feed_forward2 = nn.LayerNorm(config.hidden_dim)
        self.norm_out = nn.LayerNorm(config.hidden_dim)

    def forward(self, x: Tensor, valid_len: Tensor, frame_mask: Tensor | None) -> Tensor:
        x = x + 0.5 * self.feed_forward1(self.norm_feed_forward1(x))
        x = x + self.self_attn(self.norm_self_att(x), valid_len)
        conv = self.conv(self.norm_conv(x), frame_mask)
        if self.subsample:
            x = x.unfold(1, 2, 2).mean(-1)  # pairs of frames; an odd last frame is dropped
            conv = conv[:, : x.shape[1]]
        x = x + conv
        x = x + 0.5 * self.feed_forward2(self.norm_feed_forward2(x))
        return self.norm_out(x)


def halve_frame_mask(frame_mask: Tensor) -> Tensor:
    """The mask after a subsampling block: a pooled frame is real when both inputs are."""
    batch, frames = frame_mask.shape
    return frame_mask[:, : frames // 2 * 2].reshape(batch, frames // 2, 2).all(dim=-1)


class CTCEncoder(nn.Module):
    """features [B, T, 4 * num_mel_bins] -> hidden [B, T // time_reduction, hidden_dim]."""

    def __init__(self, config: GraniteSpeechCTCConfig):
        super().__init__()
        self.config = config
        self.input_linear = nn.Linear(config.input_dim, config.hidden_dim)
        self.layers = nn.ModuleList(
            CTCConformerBlock(config, subsample=i in config.subsample_layers)
            for i in range(config.num_layers)
        )
        # The CTC head over BPE units; here for its feedback after the middle block.
        self.out = nn.Linear(config.hidden_dim, config.vocab_size)
        self.out_mid = nn.Linear(config.vocab_size, config.hidden_dim)

    def forward(self, features: Tensor, frame_mask: Tensor | None = None) -> Tensor:
        """frame_mask: [B, T] bool, a prefix of True per clip; outputs past each clip's
        `GraniteSpeechCTC.output_lengths` are finite but meaningless."""
        x = self.input_linear(features)
        if frame_mask is not None:
            x = x.masked_fill(~frame_mask[..., None], 0.0)
        mid = len(self.layers) // 2
        valid_len = self._valid_len(x, frame_mask)
        for idx, layer in enumerate(self.layers, start=1):
            x = layer(x, valid_len, frame_mask)
            if layer.subsample:
                frame_mask = halve_frame_mask(frame_mask) if frame_mask is not None else None
                valid_len = self._valid_len(x, frame_mask)
            if idx == mid:
                x = x + self.out_mid(self.out(x).softmax(dim=-1))
        return x

    def _valid_len(self, x: Tensor, frame_mask: Tensor | None) -> Tensor:
        if frame_mask is None:
            frame_mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return block_valid_lengths(frame_mask, self.config.context_size)


class GraniteSpeechCTC(nn.Module):
    """Granite Speech 5.0: features -> CTC logits over `vocab_size` BPE units (blank
    `config.blank_id`), one frame per `time_reduction` feature frames.

    `input_features_mask` marks the real feature frames [B, T], as the feature extractor's
    `attention_mask` does (see `gsopt.audio.frontend.LogMelDeltaFrontend`); decode with
    `ctc_greedy_decode(logits, model.output_lengths(feature_lengths))`.
    """

    def __init__(self, config: GraniteSpeechCTCConfig | None = None, **kwargs: Any):
        super().__init__()
        self.config = (config or GraniteSpeechCTCConfig()).updated(**kwargs)
        self.encoder = CTCEncoder(self.config)
        # Tied (the published checkpoint): the head is encoder.out itself.
        self.ctc_head = (
            None
            if self.config.tie_ctc_head
            else nn.Linear(self.config.hidden_dim, self.config.vocab_size)
        )

    @classmethod
    def from_config(cls, config: GraniteSpeechCTCConfig) -> GraniteSpeechCTC:
        return cls(config)

    def get_config(self) -> GraniteSpeechCTCConfig:
        return self.config

    def reset_parameters(self) -> None:
        """Random weights for named variants (FMS calls this after `to_empty`)."""
        for module in self.modules():
            if isinstance(module, nn.BatchNorm1d):
                module.reset_running_stats()
                module.reset_parameters()
            elif isinstance(module, (nn.Linear, nn.Conv1d, nn.LayerNorm, nn.Embedding)):
                module.reset_parameters()

    def post_init(self) -> None:
        """FMS's loader materialises every tensor in the model's dtype: restore float32."""
        for module in self.modules():
            if isinstance(module, FP32BatchNorm1d):
                module.float()

    def output_lengths(self, feature_lengths: Tensor) -> Tensor:
        """Valid output frames of each clip: each subsampling block halves, rounding down."""
        return feature_lengths // self.config.time_reduction

    def forward(self, input_features: Tensor, input_features_mask: Tensor | None = None) -> Tensor:
        """input_features [B, T, 4 * num_mel_bins] -> logits [B, T // time_reduction, vocab].

        T must be at least `time_reduction` (every halving needs a pair of frames); a shorter
        clip in a longer batch simply has no output frames.
        """
        frames, needed = input_features.shape[1], self.config.time_reduction
        if frames < needed:
            raise GsoptError(
                f"input_features has {frames} frame(s), expected at least {needed} (one "
                f"output frame per {needed}; {needed * 2 * HOP_LENGTH} samples of audio)"
            )
        frame_mask = check_frame_mask(input_features, input_features_mask)
        weight = self.encoder.input_linear.weight
        hidden = self.encoder(input_features.to(weight.dtype), frame_mask)
        head = self.ctc_head if self.ctc_head is not None else self.encoder.out
        return head(hidden)


def ctc_greedy_decode(
    logits: Tensor, lengths: Tensor | None = None, blank: int = 0
) -> list[list[int]]:
    """Best-path CTC labels per row: argmax per frame, repeats collapsed, blanks dropped.

    Row b reads its first `lengths[b]` frames only (all of them when lengths is None), so
    padding never adds labels. A label repeated across a blank counts twice, as in CTC.
    The argmax stays on the logits' device; one transfer brings the labels back.
    """
    labels = logits.argmax(dim=-1)
    previous = F.pad(labels[:, :-1], (1, 0), value=-1)
    keep = (labels != blank) & (labels != previous)
    if lengths is not None:
        frames = torch.arange(labels.shape[1], device=labels.device)
        keep &= frames < lengths.to(labels.device)[:, None]
    labels, keep = labels.cpu(), keep.cpu()
    return [row[row_keep].tolist() for row, row_keep in zip(labels, keep, strict=True)]


def _factory(config: GraniteSpeechCTCConfig):
    def factory(**kwargs: Any) -> GraniteSpeechCTC:
        return GraniteSpeechCTC(config, **kwargs)

    return factory


# Importing gsopt.model runs this once; FMS's registries raise on a second registration.
for _variant, _config in CTC_VARIANTS.items():
    models.register_model(ARCHITECTURE, _variant, _factory(_config))
register_family(
    Family(
        name="ctc",
        config=GraniteSpeechCTCConfig,
        model=GraniteSpeechCTC,
        architecture=ARCHITECTURE,
        model_types=(CTC_MODEL_TYPE,),
        variants=CTC_VARIANTS,
        stages=("frontend", "encoder"),
        decoder=False,
        parts=("encoder",),
    )
)


# --- the `hf` adapter: transformers' GraniteSpeech5ForCTC checkpoint -> gsopt -------------


def _tied_ctc_head(
    input_sd: Mapping[str, Any],
    model_config: GraniteSpeechCTCConfig | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """The names already match; a tied model has no `ctc_head` of its own, so a copy of
    `encoder.out` saved under that name (transformers usually omits it) is dropped."""
    tied = model_config is None or model_config.tie_ctc_head
    return {k: v for k, v in input_sd.items() if not (tied and k.startswith("ctc_head."))}


serialization.register_adapter_step(ARCHITECTURE, "tied_ctc_head", _tied_ctc_head)
serialization.register_adapter(ARCHITECTURE, "hf", ["tied_ctc_head"])

__all__ = ["ARCHITECTURE", "GraniteSpeechCTC", "ctc_greedy_decode"]
