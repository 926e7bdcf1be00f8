"""Tiny transformers references for the Granite Speech 4.1, 4.1 Plus and 5.0 checkpoints.

Built like tests/helpers.py's: every weight random (BatchNorm statistics and norms too), saved
with save_pretrained the way real snapshots are, so gsopt reads exactly what transformers ran.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from helpers import AUDIO_TOKEN_ID, TINY_ENCODER, TINY_PROJECTOR, TINY_TEXT
from safetensors.torch import save_file
from transformers import (
    GraniteSpeech5ForCTC,
    GraniteSpeechPlusConfig,
    GraniteSpeechPlusForConditionalGeneration,
)

from gsopt.model.config import GraniteSpeechCTCConfig, to_hf_config

# Layer 0 is the input projection; layer 2 is the middle block of 4, whose export transformers
# takes before adding the CTC feedback to the same tensor in place.
PLUS_CAT_LAYERS = (0, 2)
PLUS_ENCODER = dict(TINY_ENCODER, num_layers=4, cat_hidden_layers=list(PLUS_CAT_LAYERS))
PLUS_WIDTH = TINY_ENCODER["hidden_dim"] * (len(PLUS_CAT_LAYERS) + 1)


def randomize_(model: torch.nn.Module, unit_scale: bool = False) -> torch.nn.Module:
    """Random BatchNorm statistics and norm weights; with `unit_scale`, linear, conv and
    embedding weights of std 1 / sqrt(fan_in), so attention and softmaxes are far from
    uniform (transformers' std 0.02 init hides mistakes there)."""
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
        if unit_scale:
            for module in model.modules():
                if isinstance(module, torch.nn.Linear | torch.nn.Conv1d | torch.nn.Embedding):
                    module.weight.normal_(0, module.weight[0].numel() ** -0.5)
    return model.eval()


def plus_hf_config(**projector) -> GraniteSpeechPlusConfig:
    return GraniteSpeechPlusConfig(
        encoder_config=PLUS_ENCODER,
        projector_config=dict(TINY_PROJECTOR, encoder_hidden_size=PLUS_WIDTH, **projector),
        text_config=TINY_TEXT,
        audio_token_index=AUDIO_TOKEN_ID,
        has_lora_adapter=False,
        tie_word_embeddings=False,
        window_size=15,
        downsample_rate=5,
    )


def reference_plus_model(seed: int = 0) -> GraniteSpeechPlusForConditionalGeneration:
    torch.manual_seed(seed)
    return randomize_(GraniteSpeechPlusForConditionalGeneration(plus_hf_config()))


def reference_ctc_model(config: GraniteSpeechCTCConfig, seed: int = 0) -> GraniteSpeech5ForCTC:
    torch.manual_seed(seed)
    return randomize_(GraniteSpeech5ForCTC(to_hf_config(config)), unit_scale=True)


def save_out_llm(folder: Path, rows: int, hidden: int, seed: int = 0) -> torch.nn.Linear:
    """A random BPE CTC head written as granite-speech-4.1 ships it: `weight` and `bias`."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(hidden, rows)
    save_file(
        {"weight": head.weight.detach().clone(), "bias": head.bias.detach().clone()},
        folder / "out_llm.safetensors",
    )
    return head


@torch.no_grad()
def greedy_tokens(model, ids: torch.Tensor, features: torch.Tensor, steps: int, eos: int):
    """`steps` greedy tokens from full forwards of a gsopt model, with end-of-text suppressed
    as transformers' min_new_tokens does (so the two decode the same number of steps)."""
    tokens = ids
    for _ in range(steps):
        logits = model(tokens[None], features)[0, -1]
        logits[eos] = -torch.inf
        tokens = torch.cat([tokens, logits.argmax()[None]])
    return tokens[len(ids) :].tolist()


@torch.no_grad()
def reference_transcripts(ref: GraniteSpeech5ForCTC, features, attention_mask=None):
    """transformers' CTC labels: generate (argmax, padded frames set to the pad id), then
    ParakeetTokenizer._decode's collapse (itertools.groupby) and blank removal."""
    sequences = ref.generate(input_features=features, attention_mask=attention_mask)
    blank = ref.config.pad_token_id
    return [
        [label for label, _ in itertools.groupby(row.tolist()) if label != blank]
        for row in sequences
    ]
