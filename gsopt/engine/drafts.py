"""Drafts for speculative decoding: the encoder's own CTC transcripts, and oracle drafts.

- Grapheme CTC (every checkpoint): the final encoder hidden state through the CTC head
  (`encoder.out`), softmax, argmax per frame; repeats collapsed, blanks (label 0) dropped,
  label c read as the character chr(c); the text is tokenized with the checkpoint's
  tokenizer. Confidence: the largest per-frame entropy over the clip's real frames (padded
  frames never count, so a clip in a batch gets the draft it gets alone).
- BPE CTC (granite-speech-4.1, `encoder.out_llm`): the final hidden state pooled over
  windows of 4 frames, each frame weighted by its importance (1 - blank probability of the
  middle block's CTC posteriors) over its window's sum, through `out_llm`; label i > 0 is
  text token i - 1. As IBM's script does, the tokens are decoded to text, stripped and
  encoded again, so a first piece with a leading space gets the tokenizer's own ids.
- Oracle (benchmarks with random weights, whose CTC drafts are noise): the clip's own
  greedy output with a known fraction of its tokens replaced by random ones.
The `ctc` stage (`grapheme_labels`, `bpe_labels`) runs batched on the device; collapsing
and tokenizing run on the host. `DRAFT_KINDS` is what a recipe's `[speculate] draft` may
name: a new kind of draft is a function pair and one registry line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gsopt.errors import GsoptError

BPE_WINDOW = 4


def _labels_and_confidence(
    logits: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Argmax labels [B, T] and the largest per-frame entropy over valid frames [B]."""
    probs = logits.float().softmax(-1)
    entropy = -(probs * torch.log(probs + 1e-10)).sum(-1)
    confidence = entropy.masked_fill(~valid, float("-inf")).amax(-1)
    return probs.argmax(-1), confidence


def grapheme_labels(encoder, hidden: torch.Tensor, mid_posteriors, frame_mask: torch.Tensor):
    """The grapheme CTC head over the final hidden state (the last `hidden_dim` features:
    a Plus encoder puts its exported layers before it); labels [B, T] and confidence [B].
    (`mid_posteriors` is unused: the signature is the `ctc` stage's, as `bpe_labels`.)"""
    final = hidden[..., -encoder.config.hidden_dim :]
    return _labels_and_confidence(encoder.out(final), frame_mask)


def posterior_weighted_pool(
    hidden: torch.Tensor, importance: torch.Tensor, window: int = BPE_WINDOW
) -> torch.Tensor:
    """[B, T, D] -> [B, ceil(T / window), D]: each window's frames weighted by their share
    of the window's importance."""
    pad = -hidden.shape[1] % window
    hidden = F.pad(hidden, (0, 0, 0, pad))
    importance = F.pad(importance, (0, pad))
    batch, frames, dim = hidden.shape
    hidden = hidden.view(batch, frames // window, window, dim)
    importance = importance.view(batch, frames // window, window)
    weights = importance / (importance.sum(-1, keepdim=True) + 1e-8)
    return (hidden * weights.unsqueeze(-1)).sum(2)


def bpe_labels(encoder, hidden: torch.Tensor, mid_posteriors: torch.Tensor, frame_mask):
    """The BPE CTC head (`out_llm`) over the posterior-weighted pooled final hidden state;
    labels [B, ceil(T / 4)] and confidence over the windows holding a real frame."""
    if encoder.out_llm is None:
        raise GsoptError(
            "draft 'ctc-bpe' needs the BPE CTC head: put the checkpoint's out_llm.safetensors "
            "beside its weights, or use draft = 'ctc'"
        )
    importance = (1.0 - mid_posteriors[..., 0]) * frame_mask
    final = hidden[..., -encoder.config.hidden_dim :]
    pooled = posterior_weighted_pool(final, importance)
    valid = F.pad(frame_mask, (0, -frame_mask.shape[1] % BPE_WINDOW))
    valid = valid.view(valid.shape[0], -1, BPE_WINDOW).any(-1)
    return _labels_and_confidence(encoder.out_llm(pooled), valid)


def collapse(labels: list[int]) -> list[int]:
    """CTC's greedy reading: repeats collapsed, blanks (0) dropped."""
    out = []
    previous = None
    for label in labels:
        if label != previous and label != 0:
            out.append(label)
        previous = label
    return out


def grapheme_tokens(labels: torch.Tensor, frames: torch.Tensor, tokenizer) -> list[list[int]]:
    """Each row's draft text (chr of each label) tokenized; `frames` its real frames."""
    drafts = []
    for row, n in zip(labels.tolist(), frames.tolist(), strict=True):
        text = "".join(chr(c) for c in collapse(row[:n])).strip()
        drafts.append(tokenizer.encode(text, add_special_tokens=False) if text else [])
    return drafts


def bpe_tokens(labels: torch.Tensor, frames: torch.Tensor, tokenizer) -> list[list[int]]:
    """Each row's BPE labels (label i is token i - 1) through IBM's text round trip: decoded,
    stripped, encoded again."""
    windows = (frames + BPE_WINDOW - 1) // BPE_WINDOW
    drafts = []
    for row, n in zip(labels.tolist(), windows.tolist(), strict=True):
        text = tokenizer.decode([c - 1 for c in collapse(row[:n])]).strip()
        drafts.append(tokenizer.encode(text, add_special_tokens=False) if text else [])
    return drafts


def oracle(tokens: list[list[int]], accuracy: float, vocab: int, seed: int = 0) -> list[list[int]]:
    """The given tokens with a fraction 1 - accuracy of them (chosen at random, seeded)
    replaced by random tokens: drafts of a known accuracy."""
    generator = torch.Generator().manual_seed(seed)
    drafts = []
    for row in tokens:
        keep = torch.rand(len(row), generator=generator) < accuracy
        noise = torch.randint(vocab, (len(row),), generator=generator)
        drafts.append(
            [t if k else int(n) for t, k, n in zip(row, keep.tolist(), noise, strict=True)]
        )
    return drafts


def _needs_bpe_head(model) -> str | None:
    if getattr(model.encoder, "out_llm", None) is None:
        return (
            "needs the BPE CTC head: put the checkpoint's out_llm.safetensors beside its "
            "weights, or use draft = 'ctc'"
        )
    return None


@dataclass(frozen=True)
class DraftKind:
    """Where speculation's proposals come from. An encoder draft has a `labels` stage (the
    `ctc` stage: encoder, hidden, middle posteriors, frame mask -> labels, confidence) and a
    host-side `tokens` reading (labels, frames, tokenizer -> each row's draft tokens);
    without them the proposals come from a draft model. `unsupported` says why a model
    cannot give this draft (None: it can). `thresholds`: the relaxed mode's
    (ctc_threshold, confidence_threshold) as IBM published them for this head, the defaults
    of a recipe that names none (None: no CTC draft, no relaxed mode)."""

    name: str
    labels: Callable | None = None
    tokens: Callable | None = None
    unsupported: Callable[[object], str | None] = lambda model: None
    thresholds: tuple[float, float] | None = None

    @property
    def from_encoder(self) -> bool:
        return self.labels is not None


# Thresholds: IBM's leaderboard runs (open_asr_leaderboard granite/run_speculative.sh),
# 4.0-1b with the grapheme head and 4.1-2b with the BPE head.
DRAFT_KINDS: dict[str, DraftKind] = {
    "ctc": DraftKind("ctc", grapheme_labels, grapheme_tokens, thresholds=(0.7, 0.2)),
    "ctc-bpe": DraftKind(
        "ctc-bpe", bpe_labels, bpe_tokens, unsupported=_needs_bpe_head, thresholds=(0.0, 0.4)
    ),
    "model": DraftKind("model"),
}
