"""Granite Speech on FMS: conformer encoder -> Q-Former projector -> `fms.models.granite`.

Laid out like FMS's own model files: the model, the named variants registered with
`register_model`, then the `hf` checkpoint adapter built from small named steps.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from fms import models
from fms.distributed.strategy import DistributedStrategy, NoOpStrategy
from fms.models.granite import Granite
from fms.utils import serialization
from torch import nn

from gsopt.model.config import SPEECH_LLM_MODEL_TYPES, VARIANTS, GraniteSpeechConfig
from gsopt.model.encoder import ConformerEncoder, pointwise_weight
from gsopt.model.family import SPEECH_LLM_STAGES, Family, register_family
from gsopt.model.lora import set_lora_enabled
from gsopt.model.projector import QFormerProjector

ARCHITECTURE = "granite_speech"


def scatter_audio(
    is_audio: torch.Tensor, text_embeds: torch.Tensor, audio_embeds: torch.Tensor
) -> torch.Tensor:
    """Put row b's audio embeddings, in order, at row b's audio slots (`is_audio` [B, L]).

    A gather by per-row running count instead of `masked_scatter`: no host sync, no
    data-dependent shape, so it compiles with fullgraph=True.
    """
    index = (torch.cumsum(is_audio, dim=1) - 1).clamp(0, audio_embeds.shape[1] - 1)
    gathered = audio_embeds.gather(1, index.unsqueeze(-1).expand(-1, -1, audio_embeds.shape[-1]))
    return torch.where(is_audio.unsqueeze(-1), gathered.to(text_embeds.dtype), text_embeds)


class GraniteSpeech(nn.Module):
    """Speech in, next-token logits out. `forward` follows transformers' contract, except that
    `input_features_mask` marks real encoder frames [B, T] (transformers' marks projector
    outputs and never masks the encoder, so a batched clip differs from the clip alone)."""

    def __init__(
        self,
        config: GraniteSpeechConfig | None = None,
        distributed_strategy: DistributedStrategy = NoOpStrategy,
        **kwargs: Any,
    ):
        """`distributed_strategy` is FMS's: with `get_model(..., distributed_strategy="tp")`
        the decoder's layers are sharded across the group (FMS's tensor parallelism); the
        encoder, projector, embedding and head stay whole on every rank."""
        super().__init__()
        self.config = (config or GraniteSpeechConfig()).updated(**kwargs)
        self.encoder = ConformerEncoder(self.config.encoder)
        self.projector = QFormerProjector(self.config.projector, self.config.decoder.emb_dim)
        self.decoder = Granite(self.config.decoder, distributed_strategy=distributed_strategy)
        self.lora_mode = "none"

    @classmethod
    def from_config(cls, config: GraniteSpeechConfig) -> GraniteSpeech:
        return cls(config)

    def get_config(self) -> GraniteSpeechConfig:
        return self.config

    def reset_parameters(self) -> None:
        """Random weights for named variants (FMS calls this after `to_empty`)."""
        for module in [*self.encoder.modules(), *self.projector.modules()]:
            if isinstance(module, nn.BatchNorm1d):
                module.reset_running_stats()
                module.reset_parameters()
            elif isinstance(module, (nn.Linear, nn.Conv1d, nn.LayerNorm, nn.Embedding)):
                module.reset_parameters()
        nn.init.normal_(self.projector.query)
        self.decoder.reset_parameters()

    def post_init(self) -> None:
        """Tie the head and build RoPE tables on the real device (FMS's contract)."""
        self.decoder.post_init()

    def encode(self, input_features: torch.Tensor, frame_mask: torch.Tensor | None = None):
        """The encoder's output, with padded frames zeroed (the projector sees whole windows,
        and a padded clip must look like the clip alone), and its middle block's CTC
        posteriors (for CTC drafts)."""
        hidden, posteriors = self.encoder.forward_with_posteriors(input_features, frame_mask)
        if frame_mask is not None:
            hidden = hidden * frame_mask.unsqueeze(-1).to(hidden.dtype)
        return hidden, posteriors

    def embed_audio(self, input_features: torch.Tensor, frame_mask: torch.Tensor | None = None):
        """Encoder + projector: the rows that replace the audio tokens."""
        return self.projector(self.encode(input_features, frame_mask)[0])

    def use_audio_lora(self, enabled: bool) -> None:
        """A live LoRA follows transformers' rule: on only for inputs that carry audio."""
        if self.lora_mode == "live":
            set_lora_enabled(self, enabled)

    def embed(
        self,
        input_ids: torch.Tensor,
        audio_embeds: torch.Tensor | None,
        text_from: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text embeddings (the audio id reads as token 0, as in transformers), with the audio
        rows at the audio slots. `text_from` [B]: where each row's prompt ends; a token past
        it (a speculative draft's) is text even when it equals the audio id, as verify and
        decode steps embed it, never an audio slot."""
        is_audio = input_ids == self.config.audio_token_id
        text_embeds = self.decoder.base_model.embedding(torch.where(is_audio, 0, input_ids))
        if audio_embeds is None:
            return text_embeds
        if text_from is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            is_audio = is_audio & (positions < text_from[:, None])
        return scatter_audio(is_audio, text_embeds, audio_embeds)

    def forward(
        self,
        input_ids: torch.Tensor,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        *,
        use_lora: bool | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_value_states: list | None = None,
        use_cache: bool = False,
        last_n_tokens: int = 0,
        **attn_kwargs: Any,
    ):
        """Logits [B, L, vocab], divided by logits_scaling as Granite defines them.

        The live LoRA is on when the call carries audio, or when `use_lora` says so (decode
        steps after an audio prefill carry no features but still belong to an audio input).
        """
        self.use_audio_lora(input_features is not None if use_lora is None else use_lora)
        audio = None
        if input_features is not None:
            audio = self.embed_audio(
                input_features.to(self.projector.query.dtype), input_features_mask
            )
        return self.decoder(
            self.embed(input_ids, audio),
            position_ids=position_ids,
            past_key_value_states=past_key_value_states,
            use_cache=use_cache,
            last_n_tokens=last_n_tokens,
            **attn_kwargs,
        )


def _factory(config: GraniteSpeechConfig):
    def factory(**kwargs: Any) -> GraniteSpeech:
        return GraniteSpeech(config, **kwargs)

    return factory


# Importing gsopt.model runs this once; FMS's registries raise on a second registration.
for _variant, _config in VARIANTS.items():
    models.register_model(ARCHITECTURE, _variant, _factory(_config))
register_family(
    Family(
        name="speech-llm",
        config=GraniteSpeechConfig,
        model=GraniteSpeech,
        architecture=ARCHITECTURE,
        model_types=SPEECH_LLM_MODEL_TYPES,
        variants=VARIANTS,
        stages=SPEECH_LLM_STAGES,
        decoder=True,
        parts=("encoder", "projector", "decoder"),
    )
)


# --- the `hf` adapter: Hugging Face Granite Speech checkpoint -> gsopt/FMS names -------------

_DECODER_PREFIX = re.compile(r"^(?:language_model\.model\.(?:model\.)?|model\.language_model\.)")
_HEAD_PREFIX = re.compile(r"^(?:language_model\.)?lm_head\.")
_AUDIO_PREFIX = re.compile(r"^(?:model\.)?(encoder|projector)\.")


def _hf_to_gsopt_names(input_sd: Mapping[str, Any], **kwargs: Any) -> dict[str, Any]:
    """The layouts seen in the wild (transformers 4.x `language_model.model.*`, 5.x
    `model.language_model.*`, and `language_model.model.model.*` as transformers 5.17's
    save_pretrained writes it) -> `encoder.*`, `projector.*`, and granite's own hf names
    under `decoder.` for the next step; the encoder's kernel-1 convolutions' weights as its
    Linears'. Adapter (LoRA) tensors are not weights: dropped."""
    new_sd = {}
    for name, tensor in input_sd.items():
        if "lora_" in name:
            continue
        name = _AUDIO_PREFIX.sub(r"\1.", name)
        name = _DECODER_PREFIX.sub("decoder.model.", name)
        name = _HEAD_PREFIX.sub("decoder.lm_head.", name)
        new_sd[name] = pointwise_weight(name, tensor)
    return new_sd


def _granite_decoder(
    input_sd: Mapping[str, Any], model_config: GraniteSpeechConfig | None = None, **kwargs: Any
) -> dict[str, Any]:
    """Run FMS's own granite `hf` adapter (names, RoPE permutation, qkv fusion) on the decoder."""
    granite_hf = serialization._get_adapter("granite", "hf")
    decoder_sd = {
        k.removeprefix("decoder."): v for k, v in input_sd.items() if k.startswith("decoder.")
    }
    new_sd = {k: v for k, v in input_sd.items() if not k.startswith("decoder.")}
    if decoder_sd:
        decoder_config = model_config.decoder if model_config is not None else None
        adapted = granite_hf(decoder_sd, model_config=decoder_config)
        new_sd.update({f"decoder.{k}": v for k, v in adapted.items()})
    return new_sd


serialization.register_adapter_step(ARCHITECTURE, "hf_to_gsopt_names", _hf_to_gsopt_names)
serialization.register_adapter_step(ARCHITECTURE, "granite_decoder", _granite_decoder)
serialization.register_adapter(ARCHITECTURE, "hf", ["hf_to_gsopt_names", "granite_decoder"])

__all__ = ["ARCHITECTURE", "GraniteSpeech", "scatter_audio"]
