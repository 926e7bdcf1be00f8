"""Granite Speech configuration: FMS-style dataclasses, the published variants, config.json.

Two model shapes. `GraniteSpeechConfig` (model types `granite_speech` and
`granite_speech_plus`) mirrors the speech LLM: a conformer encoder, a windowed Q-Former
projector and a Granite decoder (FMS's own `GraniteConfig`). `GraniteSpeechCTCConfig`
(`granite_speech5_ctc`, Granite Speech 5.0) is an encoder-only CTC model. `from_hf_config`
reads every field it needs from a checkpoint's config.json and refuses what it does not
understand, so nothing about a real checkpoint is assumed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fms.models.granite import GraniteConfig
from fms.utils.config import ModelConfig

from gsopt.errors import GsoptError

# RoPE tables are precomputed up to this many positions; speech prompts are far shorter.
MAX_DECODER_POSITIONS = 8192
# A static KV cache starts with this many positions (a 30 s window, its prompt and 200 new
# tokens take about 650) and doubles when a request needs more: sized at the decoder's limit
# it would hold 8192 positions a row, gigabytes for a batch of 16 that uses a tenth of them.
CACHE_POSITIONS = 1024


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
    # Granite Speech Plus: the outputs of these layers (0: the input projection, i: block i)
    # are concatenated before the final output on the feature axis.
    cat_hidden_layers: tuple[int, ...] = ()
    # Rows of the optional BPE CTC head `out_llm` that granite-speech-4.1-2b ships beside its
    # weights as out_llm.safetensors; 0: no such head. It is not in config.json: the loader
    # sets it when the file is present.
    bpe_output_dim: int = 0

    def __post_init__(self) -> None:
        check_cat_hidden_layers(self)

    @property
    def output_size(self) -> int:
        """Features per encoder frame: hidden_dim for each exported layer and the final one."""
        return self.hidden_dim * (len(self.cat_hidden_layers) + 1)


def check_cat_hidden_layers(config: ConformerConfig) -> None:
    """Exported layers must exist and be distinct (transformers would silently merge twins)."""
    layers = list(config.cat_hidden_layers)
    bad = [i for i in layers if not 0 <= i < config.num_layers] or sorted(
        {i for i in layers if layers.count(i) > 1}
    )
    if bad:
        raise GsoptError(
            f"encoder cat_hidden_layers {layers} has {bad[0]}: expected distinct indices in "
            f"0..{config.num_layers - 1} (num_layers {config.num_layers})"
        )


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

    def __post_init__(self) -> None:
        expected = self.encoder.output_size
        if self.projector.encoder_hidden_size != expected:
            raise GsoptError(
                f"projector encoder_hidden_size is {self.projector.encoder_hidden_size}, "
                f"expected {expected} (encoder hidden_dim {self.encoder.hidden_dim} x "
                f"({len(self.encoder.cat_hidden_layers)} cat_hidden_layers + 1))"
            )

    @property
    def encoder_context_size(self) -> int:
        """Frames in one encoder attention block."""
        return self.encoder.context_size

    @property
    def cache_positions(self) -> int:
        """Positions a static KV cache starts with (see CACHE_POSITIONS)."""
        return min(self.decoder.max_expected_seq_len, CACHE_POSITIONS)

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    def audio_tokens(self, num_samples: int) -> int:
        """Audio tokens for a clip of `num_samples` 16 kHz samples (the published formula)."""
        from gsopt.audio.frontend import num_audio_tokens

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


# The Granite 4 speech decoder (from granite-4.0-1b-base): 4.0-1b, 4.1-2b and 4.1-2b-plus.
_GRANITE_4_DECODER: dict[str, Any] = dict(
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
        decoder=_decoder(**_GRANITE_4_DECODER),
        audio_token_id=100352,
    ),
    # granite-speech-4.1-2b: the 4.0-1b topology (config.json facts from a public inspection
    # of the Hub snapshot at revision de575db6: encoder 16 x 1024, 8 heads x 128, conv 15,
    # context 200, output_dim 348; projector 2 layers, 16 heads, ffn 4096; text 40 layers,
    # hidden 2048, ffn 4096, 16 heads, 4 kv heads, vocab 100353, multipliers 12 / 0.22 /
    # 0.0078125 / 8; 2.31B parameters, untied head). rope_theta 1e4 and eos 100257
    # (<|end_of_text|>) as in the public granite_speech_4_1_2b_plus recipe of KerasFormers.
    # Its BPE CTC head (out_llm.safetensors, Linear 1024 -> 100353) is not in config.json, so
    # not in the variant (bpe_output_dim 0): gsopt.load_model(folder) adds it when present.
    "4.1-2b": GraniteSpeechConfig(
        encoder=ConformerConfig(output_dim=348),
        decoder=_decoder(**_GRANITE_4_DECODER),
        audio_token_id=100352,
        eos_token_id=100257,
    ),
    # granite-speech-4.1-2b-plus (model_type granite_speech_plus): 4.1-2b whose projector
    # also reads block 3's output (cat_hidden_layers [3], so the projector's
    # encoder_hidden_size is 2048) and has no audio LoRA, per two public ports that read its
    # config.json (KerasFormers' granite_speech_4_1_2b_plus recipe; a Granite Speech port
    # noting "the encoder layer-3 concat" as the only architectural delta).
    "4.1-2b-plus": GraniteSpeechConfig(
        encoder=ConformerConfig(output_dim=348, cat_hidden_layers=(3,)),
        projector=QFormerConfig(encoder_hidden_size=2048),
        decoder=_decoder(**_GRANITE_4_DECODER),
        audio_token_id=100352,
        eos_token_id=100257,
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


@dataclass
class GraniteSpeechCTCConfig(ModelConfig):
    """Granite Speech 5.0: a conformer whose `subsample_layers` halve time, and a CTC head.

    Features are 80 log-mels and their deltas with pairs of frames stacked, so the encoder
    reads 4 * num_mel_bins values a frame. The CTC head shares the self-conditioning head's
    weights (`encoder.out`) unless `tie_ctc_head` is off.
    """

    num_mel_bins: int = 80
    num_layers: int = 16
    hidden_dim: int = 1024
    intermediate_size: int = 4096
    num_heads: int = 8
    dim_head: int = 128
    context_size: int = 128
    max_pos_emb: int = 512
    conv_kernel_size: int = 7
    conv_expansion_factor: int = 2
    subsample_layers: tuple[int, ...] = (0, 1)
    ffn_bias: bool = True
    vocab_size: int = 16384
    blank_id: int = 0
    tie_ctc_head: bool = True

    def __post_init__(self) -> None:
        layers = list(self.subsample_layers)
        bad = [i for i in layers if not 0 <= i < self.num_layers or layers.count(i) > 1]
        if bad:
            raise GsoptError(
                f"encoder subsample_layers {layers} has {bad[0]}: expected distinct indices "
                f"in 0..{self.num_layers - 1} (num_hidden_layers {self.num_layers})"
            )
        if self.conv_kernel_size % 2 == 0:
            raise GsoptError(
                f"encoder conv_kernel_size is {self.conv_kernel_size}, expected an odd size "
                "(the stride-1 blocks keep their length only with 'same' padding)"
            )

    @property
    def input_dim(self) -> int:
        return 4 * self.num_mel_bins  # log-mels and deltas, two frames stacked

    @property
    def encoder_context_size(self) -> int:
        """Frames in one encoder attention block (of the first blocks, before subsampling)."""
        return self.context_size

    @property
    def time_reduction(self) -> int:
        return 2 ** len(self.subsample_layers)


# Granite Speech 5.0 (encoder-only CTC). Separate from VARIANTS: gsopt.model.granite_speech
# registers those as the speech LLM, gsopt.model.granite_speech5 registers these.
CTC_VARIANTS: dict[str, GraniteSpeechCTCConfig] = {
    # granite-speech-5.0-470m-turboctc: the defaults of transformers 5.24's
    # GraniteSpeech5EncoderConfig / GraniteSpeech5CTCConfig, documented there as this
    # checkpoint's, and matching a public port's reading of its config.json (16 x 1024,
    # 8 heads x 128, ffn 4096 with bias, conv 7, context 128, max_pos 512, subsample_layers
    # [0, 1], 16,384 BPE units with blank 0, CTC head tied to encoder.out; 473M parameters).
    "5.0-470m": GraniteSpeechCTCConfig(),
    # Unit tests: every structural feature at a tiny size, with a subsampling block after
    # the self-conditioning one (mid-layer feedback after block 2 of 4).
    "tiny-ctc": GraniteSpeechCTCConfig(
        num_layers=4,
        hidden_dim=32,
        intermediate_size=64,
        num_heads=2,
        dim_head=16,
        context_size=8,
        max_pos_emb=16,
        conv_kernel_size=7,
        subsample_layers=(0, 2),
        vocab_size=64,
    ),
}


def _checked(value: Any, key: str, where: str, kind: type | None) -> Any:
    """`value` if it is a `kind` (int; float takes ints too; bool is never a number)."""
    if kind is None or value is None:
        return value
    kinds = (int, float) if kind is float else (kind,)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise GsoptError(
            f"config.json: {where}.{key} is {type(value).__name__} {value!r:.40}, expected "
            f"{'a number' if kind is float else 'an integer'}"
        )
    return value


def _require(section: dict[str, Any], key: str, where: str, kind: type | None = int) -> Any:
    """A required setting, checked to be a `kind` (an integer unless said otherwise)."""
    if key not in section:
        raise GsoptError(
            f"config.json: {where} has no {key!r}; is this a Granite Speech checkpoint?"
        )
    return _checked(section[key], key, where, kind)


def _get(section: dict[str, Any], key: str, where: str, default: Any, kind: type = int) -> Any:
    """An optional setting (`default` when absent or null), checked to be a `kind`."""
    value = section.get(key)
    return default if value is None else _checked(value, key, where, kind)


def _section(hf: dict[str, Any], key: str) -> dict[str, Any]:
    section = _require(hf, key, "the top level", kind=None)
    if not isinstance(section, dict):
        raise GsoptError(
            f"config.json: {key} is {type(section).__name__} {section!r:.40}, expected an "
            "object of settings"
        )
    return section


def _rope_theta(text: dict[str, Any]) -> float:
    rope = text.get("rope_parameters") or {}
    scaling = text.get("rope_scaling")
    kind = rope.get("rope_type", (scaling or {}).get("rope_type", "default"))
    if kind != "default":
        raise GsoptError(f"config.json: rope type {kind!r} is not supported (only 'default')")
    theta = rope.get("rope_theta", text.get("rope_theta", 10_000.0))
    return float(_checked(theta, "rope_theta", "text_config", float))


SPEECH_LLM_MODEL_TYPES = ("granite_speech", "granite_speech_plus")
CTC_MODEL_TYPE = "granite_speech5_ctc"
MODEL_TYPES = (*SPEECH_LLM_MODEL_TYPES, CTC_MODEL_TYPE)


def from_hf_config(
    hf: dict[str, Any], adapter: dict[str, Any] | None = None
) -> GraniteSpeechConfig | GraniteSpeechCTCConfig:
    """Build the config from a checkpoint's config.json (and adapter_config.json, if any):
    a `GraniteSpeechCTCConfig` for Granite Speech 5.0, a `GraniteSpeechConfig` otherwise."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise GsoptError(
            f"config.json: model_type is {model_type!r}, expected one of "
            f"{', '.join(repr(t) for t in MODEL_TYPES)}"
        )
    if model_type == CTC_MODEL_TYPE:
        if adapter is not None:
            raise GsoptError("adapter_config.json: a Granite Speech 5.0 CTC model takes no adapter")
        return _ctc_from_hf_config(hf)
    enc = _section(hf, "encoder_config")
    proj = _section(hf, "projector_config")
    text = _section(hf, "text_config")
    req = _require

    num_heads = req(enc, "num_heads", "encoder_config")
    hidden_dim = req(enc, "hidden_dim", "encoder_config")
    encoder = ConformerConfig(
        input_dim=req(enc, "input_dim", "encoder_config"),
        num_layers=req(enc, "num_layers", "encoder_config"),
        hidden_dim=hidden_dim,
        feedforward_mult=req(enc, "feedforward_mult", "encoder_config"),
        num_heads=num_heads,
        dim_head=_get(enc, "dim_head", "encoder_config", 0) or hidden_dim // num_heads,
        output_dim=req(enc, "output_dim", "encoder_config"),
        context_size=req(enc, "context_size", "encoder_config"),
        max_pos_emb=req(enc, "max_pos_emb", "encoder_config"),
        conv_kernel_size=req(enc, "conv_kernel_size", "encoder_config"),
        conv_expansion_factor=req(enc, "conv_expansion_factor", "encoder_config"),
        # Only the Plus encoder exports layers; transformers' granite_speech one ignores this.
        cat_hidden_layers=tuple(enc.get("cat_hidden_layers") or ())
        if model_type == "granite_speech_plus"
        else (),
    )
    if proj.get("hidden_act", "gelu") != "gelu":
        raise GsoptError(f"config.json: projector hidden_act {proj['hidden_act']!r} is not 'gelu'")
    projector = QFormerConfig(
        hidden_size=req(proj, "hidden_size", "projector_config"),
        num_layers=req(proj, "num_hidden_layers", "projector_config"),
        num_heads=req(proj, "num_attention_heads", "projector_config"),
        intermediate_size=req(proj, "intermediate_size", "projector_config"),
        layer_norm_eps=req(proj, "layer_norm_eps", "projector_config", float),
        encoder_hidden_size=req(proj, "encoder_hidden_size", "projector_config"),
        cross_attention_frequency=req(proj, "cross_attention_frequency", "projector_config"),
        window_size=_get(hf, "window_size", "the top level", 15),
        downsample_rate=_get(hf, "downsample_rate", "the top level", 5),
    )
    emb_dim = req(text, "hidden_size", "text_config")
    nheads = req(text, "num_attention_heads", "text_config")
    head_dim = _get(text, "head_dim", "text_config", 0) or emb_dim // nheads
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
        norm_eps=req(text, "rms_norm_eps", "text_config", float),
        nheads=nheads,
        head_dim=head_dim,
        kvheads=_get(text, "num_key_value_heads", "text_config", 0) or nheads,
        nlayers=req(text, "num_hidden_layers", "text_config"),
        pad_id=_get(text, "pad_token_id", "text_config", 0),
        hidden_grow_factor=req(text, "intermediate_size", "text_config") / emb_dim,
        multiple_of=1,
        max_expected_seq_len=min(
            _get(text, "max_position_embeddings", "text_config", 4096), MAX_DECODER_POSITIONS
        ),
        attn_bias=text.get("attention_bias", False),
        mlp_bias=text.get("mlp_bias", False),
        tie_heads=hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)),
        rope_theta=_rope_theta(text),
        embedding_multiplier=float(_get(text, "embedding_multiplier", "text_config", 1.0, float)),
        logits_scaling=float(_get(text, "logits_scaling", "text_config", 1.0, float)),
        residual_multiplier=float(_get(text, "residual_multiplier", "text_config", 1.0, float)),
        attention_multiplier=float(_get(text, "attention_multiplier", "text_config", 1.0, float)),
        p_dropout=0.0,
        fused_weights=True,
    )
    eos = text.get("eos_token_id", hf.get("eos_token_id", 0))
    audio_index = _get(hf, "audio_token_index", "the top level", 49155)
    for token in eos if isinstance(eos, list) else [eos]:
        _checked(token, "eos_token_id", "text_config", int)
    lora_rank, lora_alpha = 0, 0.0
    if adapter is not None:
        lora_rank = _require(adapter, "r", "adapter_config.json")
        lora_alpha = float(_require(adapter, "lora_alpha", "adapter_config.json", float))
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
        audio_token_id=_get(hf, "audio_token_id", "the top level", audio_index),
        eos_token_id=eos[0] if isinstance(eos, list) else (eos if eos is not None else 0),
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
    )


def _ctc_from_hf_config(hf: dict[str, Any]) -> GraniteSpeechCTCConfig:
    enc = _section(hf, "encoder_config")
    where = "encoder_config"
    vocab_size = _require(hf, "vocab_size", "the top level")
    if _require(enc, "vocab_size", where) != vocab_size:
        raise GsoptError(
            f"config.json: encoder_config.vocab_size is {enc['vocab_size']}, expected "
            f"{vocab_size} (the top-level vocab_size)"
        )
    hidden_dim = _require(enc, "hidden_size", where)
    num_heads = _require(enc, "num_attention_heads", where)
    kv_heads = _get(enc, "num_key_value_heads", where, 0) or num_heads
    if kv_heads != num_heads:
        raise GsoptError(
            f"config.json: encoder_config.num_key_value_heads is {kv_heads}, expected "
            f"{num_heads} (num_attention_heads: q, k and v all have that many heads)"
        )
    if enc.get("hidden_act", "silu") != "silu":
        raise GsoptError(
            f"config.json: encoder_config.hidden_act is {enc['hidden_act']!r}, expected 'silu'"
        )
    subsample = enc.get("subsample_layers")
    blank = _get(hf, "pad_token_id", "the top level", None)
    return GraniteSpeechCTCConfig(
        num_mel_bins=_require(enc, "num_mel_bins", where),
        num_layers=_require(enc, "num_hidden_layers", where),
        hidden_dim=hidden_dim,
        intermediate_size=_require(enc, "intermediate_size", where),
        num_heads=num_heads,
        dim_head=_get(enc, "head_dim", where, 0) or hidden_dim // num_heads,
        context_size=_require(enc, "context_size", where),
        max_pos_emb=_require(enc, "max_position_embeddings", where),
        conv_kernel_size=_require(enc, "conv_kernel_size", where),
        conv_expansion_factor=_require(enc, "conv_expansion_factor", where),
        # transformers' default when the field is null
        subsample_layers=tuple(subsample) if subsample is not None else (0, 1),
        ffn_bias=bool(enc.get("attention_bias", True)),
        vocab_size=vocab_size,
        blank_id=blank if blank is not None else 0,
        tie_ctc_head=bool(hf.get("tie_word_embeddings", True)),
    )


def to_hf_config(config: GraniteSpeechConfig | GraniteSpeechCTCConfig):
    """The transformers config of the same architecture (no LoRA adapter): the inverse of
    `from_hf_config`, for building reference models with identical shapes."""
    if isinstance(config, GraniteSpeechCTCConfig):
        return _ctc_to_hf_config(config)
    from transformers import GraniteSpeechConfig, GraniteSpeechPlusConfig

    e, p, d = config.encoder, config.projector, config.decoder
    plus = dict(cat_hidden_layers=list(e.cat_hidden_layers)) if e.cat_hidden_layers else {}
    HFConfig = GraniteSpeechPlusConfig if plus else GraniteSpeechConfig
    return HFConfig(
        encoder_config=dict(
            **plus,
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


def hf_model_class(config: GraniteSpeechConfig | GraniteSpeechCTCConfig):
    """transformers' class for a config: the speech LLM, its Plus form, or the 5.0 CTC."""
    import transformers

    if isinstance(config, GraniteSpeechCTCConfig):
        return transformers.GraniteSpeech5ForCTC
    if config.encoder.cat_hidden_layers:
        return transformers.GraniteSpeechPlusForConditionalGeneration
    return transformers.GraniteSpeechForConditionalGeneration


def _ctc_to_hf_config(config: GraniteSpeechCTCConfig):
    from transformers import GraniteSpeech5CTCConfig

    return GraniteSpeech5CTCConfig(
        vocab_size=config.vocab_size,
        pad_token_id=config.blank_id,
        tie_word_embeddings=config.tie_ctc_head,
        encoder_config=dict(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_dim,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_heads,
            num_mel_bins=config.num_mel_bins,
            head_dim=config.dim_head,
            hidden_act="silu",
            max_position_embeddings=config.max_pos_emb,
            context_size=config.context_size,
            conv_kernel_size=config.conv_kernel_size,
            conv_expansion_factor=config.conv_expansion_factor,
            subsample_layers=list(config.subsample_layers),
            attention_bias=config.ffn_bias,
        ),
    )
