"""Granite Speech configuration: FMS-style dataclasses, the published variants, config.json.

The three parts mirror the model: a conformer encoder, a windowed Q-Former projector and a
Granite decoder (FMS's own `GraniteConfig`). `from_hf_config` reads every field it needs
from a checkpoint's config.json and refuses what it does not understand, so nothing about
a real checkpoint is assumed.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fms.models.granite import GraniteConfig
from fms.utils.config import ModelConfig

from gsopt.errors import GsoptError

# RoPE tables are precomputed up to this many positions; speech prompts are far shorter.
MAX_DECODER_POSITIONS = 8192


@dataclass
class ConformerConfig(ModelConfig):
    input_dim: int = 160
    num_layers: int = 16
    hidden_dim: int = 1024
    feedforward_mult: int = 4
    num_heads: int = 8
    dim_head: int = 128
    output_dim: int = 256
    context_size: int = 200
    max_pos_emb: int = 512
    conv_kernel_size: int = 15
    conv_expansion_factor: int = 2


@dataclass
class QFormerConfig(ModelConfig):
    hidden_size: int = 1024
    num_layers: int = 2
    num_heads: int = 16
    intermediate_size: int = 4096
    layer_norm_eps: float = 1e-12
    encoder_hidden_size: int = 1024
    cross_attention_frequency: int = 1
    window_size: int = 15
    downsample_rate: int = 5

    @property
    def num_queries(self) -> int:
        return self.window_size // self.downsample_rate


@dataclass
class GraniteSpeechConfig(ModelConfig):
    encoder: ConformerConfig = field(default_factory=ConformerConfig)
    projector: QFormerConfig = field(default_factory=QFormerConfig)
    decoder: GraniteConfig = field(default_factory=GraniteConfig)
    audio_token_id: int = 49159
    eos_token_id: int = 0
    lora_rank: int = 0
    lora_alpha: float = 0.0

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    def audio_tokens(self, num_samples: int) -> int:
        """Audio tokens for a clip of `num_samples` 16 kHz samples (the published formula)."""
        from gsopt.frontend import num_audio_tokens

        return num_audio_tokens(
            num_samples, self.projector.window_size, self.projector.downsample_rate
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _decoder(**fields: Any) -> GraniteConfig:
    """A Granite decoder config with the speech checkpoints' conventions filled in."""
    ffn = fields.pop("ffn")
    emb_dim = fields["emb_dim"]
    return GraniteConfig(
        hidden_grow_factor=ffn / emb_dim,
        multiple_of=1,
        norm_eps=1e-5,
        max_expected_seq_len=MAX_DECODER_POSITIONS,
        p_dropout=0.0,
        embedding_multiplier=12.0,
        residual_multiplier=0.22,
        fused_weights=True,
        **fields,
    )


VARIANTS: dict[str, GraniteSpeechConfig] = {
    "3.3-2b": GraniteSpeechConfig(
        decoder=_decoder(
            src_vocab_size=49160,
            emb_dim=2048,
            nlayers=40,
            nheads=32,
            kvheads=8,
            head_dim=64,
            ffn=8192,
            rope_theta=1e7,
            attention_multiplier=0.015625,
            logits_scaling=8.0,
            tie_heads=True,
            pad_id=0,
        ),
        audio_token_id=49159,
        lora_rank=64,
        lora_alpha=32.0,
    ),
    "3.3-8b": GraniteSpeechConfig(
        decoder=_decoder(
            src_vocab_size=49160,
            emb_dim=4096,
            nlayers=40,
            nheads=32,
            kvheads=8,
            head_dim=128,
            ffn=12800,
            rope_theta=1e7,
            attention_multiplier=0.0078125,
            logits_scaling=16.0,
            tie_heads=True,
            pad_id=0,
        ),
        audio_token_id=49159,
        lora_rank=64,
        lora_alpha=32.0,
    ),
    "4.0-1b": GraniteSpeechConfig(
        encoder=ConformerConfig(output_dim=348),
        decoder=_decoder(
            src_vocab_size=100353,
            emb_dim=2048,
            nlayers=40,
            nheads=16,
            kvheads=4,
            head_dim=128,
            ffn=4096,
            rope_theta=1e4,
            attention_multiplier=0.0078125,
            logits_scaling=8.0,
            tie_heads=False,
            pad_id=0,
        ),
        audio_token_id=100352,
    ),
    # The CPU benchmark config: the published encoder width (4 of its 16 layers), the
    # published projector, and a 1024-wide 8-layer decoder with the real 49,160-token
    # vocabulary (317M parameters; a decode step reads 0.69 GB in fp32, more than any L3).
    "cpu-real-width": GraniteSpeechConfig(
        encoder=ConformerConfig(num_layers=4),
        decoder=_decoder(
            src_vocab_size=49160,
            emb_dim=1024,
            nlayers=8,
            nheads=16,
            kvheads=4,
            head_dim=64,
            ffn=4096,
            rope_theta=1e7,
            attention_multiplier=0.015625,
            logits_scaling=8.0,
            tie_heads=True,
            pad_id=0,
        ),
        audio_token_id=49159,
        lora_rank=64,
        lora_alpha=32.0,
    ),
    # A demo size for a 2-core CPU: the published encoder geometry (context 200, 8 heads of
    # 32) at a quarter of the width, and a decoder about 1/60 of 3.3-8b's size.
    "cpu-small": GraniteSpeechConfig(
        encoder=ConformerConfig(num_layers=4, hidden_dim=256, num_heads=8, dim_head=32),
        projector=QFormerConfig(
            hidden_size=256, num_heads=8, intermediate_size=1024, encoder_hidden_size=256
        ),
        decoder=_decoder(
            src_vocab_size=49160,
            emb_dim=512,
            nlayers=8,
            nheads=8,
            kvheads=2,
            head_dim=64,
            ffn=1536,
            rope_theta=1e7,
            attention_multiplier=0.015625,
            logits_scaling=8.0,
            tie_heads=True,
            pad_id=0,
        ),
        audio_token_id=49159,
        lora_rank=16,
        lora_alpha=8.0,
    ),
    # Small enough for unit tests and CPU demos; every structural feature is still there:
    # several attention blocks, the mid-layer CTC feedback, GQA and the audio LoRA.
    "tiny": GraniteSpeechConfig(
        encoder=ConformerConfig(
            input_dim=160,
            num_layers=2,
            hidden_dim=32,
            num_heads=2,
            dim_head=16,
            output_dim=8,
            context_size=8,
            max_pos_emb=16,
            conv_kernel_size=5,
        ),
        projector=QFormerConfig(
            hidden_size=32,
            num_layers=1,
            num_heads=2,
            intermediate_size=64,
            encoder_hidden_size=32,
        ),
        decoder=_decoder(
            src_vocab_size=320,
            emb_dim=64,
            nlayers=2,
            nheads=4,
            kvheads=2,
            head_dim=16,
            ffn=128,
            rope_theta=1e4,
            attention_multiplier=0.25,
            logits_scaling=4.0,
            tie_heads=False,
            pad_id=0,
        ),
        audio_token_id=319,
        eos_token_id=0,
        lora_rank=4,
        lora_alpha=8.0,
    ),
}


def get_variant(name: str) -> GraniteSpeechConfig:
    if name not in VARIANTS:
        raise GsoptError(f"unknown variant {name!r}: choose one of {', '.join(VARIANTS)}")
    return VARIANTS[name]


def _require(section: dict[str, Any], key: str, where: str) -> Any:
    if key not in section:
        raise GsoptError(
            f"config.json: {where} has no {key!r}; is this a Granite Speech checkpoint?"
        )
    return section[key]


def _rope_theta(text: dict[str, Any]) -> float:
    rope = text.get("rope_parameters") or {}
    scaling = text.get("rope_scaling")
    kind = rope.get("rope_type", (scaling or {}).get("rope_type", "default"))
    if kind != "default":
        raise GsoptError(f"config.json: rope type {kind!r} is not supported (only 'default')")
    return float(rope.get("rope_theta", text.get("rope_theta", 10_000.0)))


def from_hf_config(
    hf: dict[str, Any], adapter: dict[str, Any] | None = None
) -> GraniteSpeechConfig:
    """Build the config from a checkpoint's config.json (and adapter_config.json, if any)."""
    if hf.get("model_type") != "granite_speech":
        raise GsoptError(
            f"config.json: model_type is {hf.get('model_type')!r}, expected 'granite_speech'"
        )
    enc = _require(hf, "encoder_config", "the top level")
    proj = _require(hf, "projector_config", "the top level")
    text = _require(hf, "text_config", "the top level")
    req = _require

    num_heads = req(enc, "num_heads", "encoder_config")
    hidden_dim = req(enc, "hidden_dim", "encoder_config")
    encoder = ConformerConfig(
        input_dim=req(enc, "input_dim", "encoder_config"),
        num_layers=req(enc, "num_layers", "encoder_config"),
        hidden_dim=hidden_dim,
        feedforward_mult=req(enc, "feedforward_mult", "encoder_config"),
        num_heads=num_heads,
        dim_head=enc.get("dim_head") or hidden_dim // num_heads,
        output_dim=req(enc, "output_dim", "encoder_config"),
        context_size=req(enc, "context_size", "encoder_config"),
        max_pos_emb=req(enc, "max_pos_emb", "encoder_config"),
        conv_kernel_size=req(enc, "conv_kernel_size", "encoder_config"),
        conv_expansion_factor=req(enc, "conv_expansion_factor", "encoder_config"),
    )
    if proj.get("hidden_act", "gelu") != "gelu":
        raise GsoptError(f"config.json: projector hidden_act {proj['hidden_act']!r} is not 'gelu'")
    projector = QFormerConfig(
        hidden_size=req(proj, "hidden_size", "projector_config"),
        num_layers=req(proj, "num_hidden_layers", "projector_config"),
        num_heads=req(proj, "num_attention_heads", "projector_config"),
        intermediate_size=req(proj, "intermediate_size", "projector_config"),
        layer_norm_eps=req(proj, "layer_norm_eps", "projector_config"),
        encoder_hidden_size=req(proj, "encoder_hidden_size", "projector_config"),
        cross_attention_frequency=req(proj, "cross_attention_frequency", "projector_config"),
        window_size=hf.get("window_size", 15),
        downsample_rate=hf.get("downsample_rate", 5),
    )
    emb_dim = req(text, "hidden_size", "text_config")
    nheads = req(text, "num_attention_heads", "text_config")
    head_dim = text.get("head_dim") or emb_dim // nheads
    if head_dim * nheads != emb_dim:
        raise GsoptError(
            f"config.json: head_dim {head_dim} x {nheads} heads != hidden_size {emb_dim}; "
            "FMS's granite RoPE conversion needs them equal"
        )
    if text.get("hidden_act", "silu") != "silu":
        raise GsoptError(f"config.json: decoder hidden_act {text['hidden_act']!r} is not 'silu'")
    decoder = GraniteConfig(
        src_vocab_size=req(text, "vocab_size", "text_config"),
        emb_dim=emb_dim,
        norm_eps=req(text, "rms_norm_eps", "text_config"),
        nheads=nheads,
        head_dim=head_dim,
        kvheads=text.get("num_key_value_heads") or nheads,
        nlayers=req(text, "num_hidden_layers", "text_config"),
        pad_id=text.get("pad_token_id") if text.get("pad_token_id") is not None else 0,
        hidden_grow_factor=req(text, "intermediate_size", "text_config") / emb_dim,
        multiple_of=1,
        max_expected_seq_len=min(text.get("max_position_embeddings", 4096), MAX_DECODER_POSITIONS),
        attn_bias=text.get("attention_bias", False),
        mlp_bias=text.get("mlp_bias", False),
        tie_heads=hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)),
        rope_theta=_rope_theta(text),
        embedding_multiplier=float(text.get("embedding_multiplier", 1.0)),
        logits_scaling=float(text.get("logits_scaling", 1.0)),
        residual_multiplier=float(text.get("residual_multiplier", 1.0)),
        attention_multiplier=float(text.get("attention_multiplier", 1.0)),
        p_dropout=0.0,
        fused_weights=True,
    )
    eos = text.get("eos_token_id", hf.get("eos_token_id", 0))
    lora_rank, lora_alpha = 0, 0.0
    if adapter is not None:
        lora_rank, lora_alpha = int(adapter["r"]), float(adapter["lora_alpha"])
        targets = set(adapter.get("target_modules") or [])
        if (
            not targets <= {"q_proj", "v_proj"}
            or adapter.get("use_rslora")
            or adapter.get("use_dora")
        ):
            raise GsoptError(
                "adapter_config.json: only a plain LoRA on q_proj/v_proj is supported, got "
                f"target_modules={sorted(targets)}"
            )
    return GraniteSpeechConfig(
        encoder=encoder,
        projector=projector,
        decoder=decoder,
        audio_token_id=hf.get("audio_token_id", hf.get("audio_token_index", 49155)),
        eos_token_id=eos[0] if isinstance(eos, list) else (eos if eos is not None else 0),
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
    )


def to_hf_config(config: GraniteSpeechConfig):
    """The transformers config of the same architecture (no LoRA adapter): the inverse of
    `from_hf_config`, for building reference models with identical shapes."""
    from transformers import GraniteSpeechConfig as HFConfig

    e, p, d = config.encoder, config.projector, config.decoder
    return HFConfig(
        encoder_config=dict(
            input_dim=e.input_dim,
            num_layers=e.num_layers,
            hidden_dim=e.hidden_dim,
            feedforward_mult=e.feedforward_mult,
            num_heads=e.num_heads,
            dim_head=e.dim_head,
            output_dim=e.output_dim,
            context_size=e.context_size,
            max_pos_emb=e.max_pos_emb,
            conv_kernel_size=e.conv_kernel_size,
            conv_expansion_factor=e.conv_expansion_factor,
            dropout=0.0,
        ),
        projector_config=dict(
            model_type="blip_2_qformer",
            hidden_size=p.hidden_size,
            num_hidden_layers=p.num_layers,
            num_attention_heads=p.num_heads,
            intermediate_size=p.intermediate_size,
            layer_norm_eps=p.layer_norm_eps,
            encoder_hidden_size=p.encoder_hidden_size,
            cross_attention_frequency=p.cross_attention_frequency,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            hidden_act="gelu",
        ),
        text_config=dict(
            model_type="granite",
            vocab_size=d.src_vocab_size,
            hidden_size=d.emb_dim,
            intermediate_size=int(d.hidden_grow_factor * d.emb_dim),
            num_hidden_layers=d.nlayers,
            num_attention_heads=d.nheads,
            num_key_value_heads=d.kvheads,
            head_dim=d.head_dim,
            rms_norm_eps=d.norm_eps,
            max_position_embeddings=d.max_expected_seq_len,
            rope_parameters={"rope_type": "default", "rope_theta": float(d.rope_theta)},
            embedding_multiplier=d.embedding_multiplier,
            residual_multiplier=d.residual_multiplier,
            attention_multiplier=d.attention_multiplier,
            logits_scaling=d.logits_scaling,
            tie_word_embeddings=d.tie_heads,
            attention_bias=d.attn_bias,
            mlp_bias=d.mlp_bias,
            pad_token_id=d.pad_id,
            eos_token_id=config.eos_token_id,
        ),
        audio_token_index=config.audio_token_id,
        has_lora_adapter=False,
        tie_word_embeddings=d.tie_heads,
        window_size=p.window_size,
        downsample_rate=p.downsample_rate,
    )


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise GsoptError(f"{path}: not found; a checkpoint folder needs config.json") from None
    except json.JSONDecodeError as e:
        raise GsoptError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
