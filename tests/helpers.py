"""Tiny random transformers reference models, saved the way real checkpoints are.

Every test that compares gsopt against transformers builds its reference here, so the two
sides always share one set of random weights.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from transformers import GraniteSpeechConfig, GraniteSpeechForConditionalGeneration

TINY_ENCODER = dict(
    input_dim=160,
    num_layers=2,
    hidden_dim=32,
    feedforward_mult=4,
    num_heads=2,
    dim_head=16,
    output_dim=8,
    context_size=8,
    max_pos_emb=16,
    conv_kernel_size=5,
    conv_expansion_factor=2,
    dropout=0.0,
)
# The published encoder width (1024, 8 heads of 128, context 200) with few layers.
REAL_WIDTH_ENCODER = dict(
    TINY_ENCODER,
    num_layers=2,
    hidden_dim=1024,
    num_heads=8,
    dim_head=128,
    output_dim=16,
    context_size=200,
    max_pos_emb=512,
    conv_kernel_size=15,
)
TINY_PROJECTOR = dict(
    model_type="blip_2_qformer",
    hidden_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=64,
    layer_norm_eps=1e-12,
    encoder_hidden_size=32,
    cross_attention_frequency=1,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
    hidden_act="gelu",
)
TINY_TEXT = dict(
    model_type="granite",
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    max_position_embeddings=512,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    embedding_multiplier=12.0,
    residual_multiplier=0.22,
    attention_multiplier=0.25,
    logits_scaling=4.0,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=0,
)
AUDIO_TOKEN_ID = 319


def hf_config(
    encoder: dict | None = None, projector: dict | None = None, **text
) -> GraniteSpeechConfig:
    enc = dict(TINY_ENCODER, **(encoder or {}))
    proj = dict(TINY_PROJECTOR, encoder_hidden_size=enc["hidden_dim"], **(projector or {}))
    return GraniteSpeechConfig(
        encoder_config=enc,
        projector_config=proj,
        text_config=dict(TINY_TEXT, **text),
        audio_token_index=AUDIO_TOKEN_ID,
        has_lora_adapter=False,
        tie_word_embeddings=text.get("tie_word_embeddings", TINY_TEXT["tie_word_embeddings"]),
        window_size=15,
        downsample_rate=5,
    )


def reference_model(config: GraniteSpeechConfig | None = None, seed: int = 0):
    """A transformers model with every weight random, BatchNorm statistics included."""
    torch.manual_seed(seed)
    model = GraniteSpeechForConditionalGeneration(config or hf_config()).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 1.5)
        for name, p in model.named_parameters():
            if "batch_norm" in name or "LayerNorm" in name or "norm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
    return model


def add_lora(model, r: int = 4, alpha: int = 8, seed: int = 1):
    """Attach a random peft LoRA to the language model (as the released adapters are)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lm = get_peft_model(
        model.model.language_model,
        LoraConfig(r=r, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.2)
    return lm


def save_checkpoint(model, path: Path, lora=None, max_shard_size: str | None = None) -> Path:
    """Save base weights (and a LoRA adapter beside them) like a Hub snapshot."""
    path.mkdir(parents=True, exist_ok=True)
    if lora is not None:
        base_sd = {
            k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in model.state_dict().items()
            if "lora_" not in k
        }
        kwargs = {"state_dict": base_sd}
    else:
        kwargs = {}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    if lora is not None:
        lora.save_pretrained(path / "_adapter")
        for f in (path / "_adapter").iterdir():
            f.rename(path / f.name)
        (path / "_adapter").rmdir()
    return path


def allocations_of_at_least(code: str, numel: int) -> list[str]:
    """The `empty_strided_*((shape), ...)` calls in generated code whose size is at least
    `numel` elements."""
    found = []
    for match in re.finditer(r"empty_strided_\w+\(\(([\d, ]*)\)", code):
        dims = [int(d) for d in match.group(1).replace(" ", "").split(",") if d]
        size = 1
        for d in dims:
            size *= d
        if size >= numel:
            found.append(match.group(0))
    return found
