"""How far a lossy recipe moved the model: a teacher-forced pass over the reference's tokens.

Greedy tokens are a coarse measure on random weights, whose nearly flat distributions flip
their argmax at the slightest change; the next-token distribution's KL divergence and the
logits' relative RMS error, at every position of the same token sequence, are the honest
ones. Both models read the same audio and the same tokens (the reference's greedy output),
so every position compares like with like.
"""

from __future__ import annotations

import statistics

import torch

from gsopt.engine import generate
from gsopt.engine.pipeline import Pipeline, Stages


@torch.no_grad()
def logits_along(model, waveforms, template, tokens: torch.Tensor) -> torch.Tensor:
    """Logits [B, n, vocab] (float32) predicting tokens[:, j] after the prompt and
    tokens[:, :j], in one teacher-forced forward."""
    pipeline = Pipeline(model, Stages.eager(model))
    audio = pipeline.embed_audio(waveforms, pipeline.stages)[0]
    prompts = pipeline.prompts(waveforms, template)
    rows = [torch.cat([p, t[:-1].cpu()]) for p, t in zip(prompts, tokens, strict=True)]
    ids, _ = generate.right_pad(rows, max(model.config.decoder.pad_id, 0))
    starts = torch.tensor([len(p) - 1 for p in prompts])
    read_at = starts[:, None] + torch.arange(tokens.shape[1])
    device = pipeline.device
    cache = generate.setup_cache(model, len(rows), ids.shape[1] + 1)
    text_from = torch.tensor([len(p) for p in prompts], device=device)
    logits = generate.prefill(
        model, ids.to(device), read_at.to(device), audio, cache.layers, text_from
    )
    return logits.float()


@torch.no_grad()
def stage_errors(reference, model, waveforms) -> dict[str, float]:
    """Relative RMS error of the audio stages' outputs (the encoder's frames where the mask
    keeps them, the projector's audio rows) against the reference's, on the same audio: where
    a lossy recipe's drift starts, beside the logits' figures."""
    outputs = []
    for m in (reference, model):
        pipeline = Pipeline(m, Stages.eager(m))
        audio, hidden, _, frame_mask, _ = pipeline.embed_audio(waveforms, pipeline.stages)
        outputs.append((hidden[frame_mask].double().cpu(), audio.double().cpu()))
    (ref_hidden, ref_audio), (hidden, audio) = outputs
    return {
        "encoder": float((hidden - ref_hidden).norm() / ref_hidden.norm()),
        "projector": float((audio - ref_audio).norm() / ref_audio.norm()),
    }


def teacher_forced(reference, model, waveforms, template, tokens: torch.Tensor) -> dict:
    """Per position: KL(p_reference || p_model) of the next-token distribution and the
    logits' relative RMS error; their medians and maxima over every position of every row."""
    ref = logits_along(reference, waveforms, template, tokens)
    mine = logits_along(model, waveforms, template, tokens).to(ref.device)
    log_ref, log_mine = ref.double().log_softmax(-1), mine.double().log_softmax(-1)
    kl = (log_ref.exp() * (log_ref - log_mine)).sum(-1).clamp(min=0).flatten().tolist()
    rms = ((mine - ref).norm(dim=-1) / ref.norm(dim=-1)).flatten().tolist()
    return {
        "positions": len(kl),
        "kl_median": statistics.median(kl),
        "kl_max": max(kl),
        "logits_rel_rms_median": statistics.median(rms),
        "logits_rel_rms_max": max(rms),
    }
